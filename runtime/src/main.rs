//! The `sockhost` binary: parse the command line, then hand over to the library.

use clap::Parser;

/// mimalloc, with instances' allocations apart from the connections' (instance_heap.rs).
#[global_allocator]
static ALLOCATOR: sockhost::instance_heap::SegregatingAllocator =
    sockhost::instance_heap::SegregatingAllocator;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = sockhost::Cli::parse();
    match sockhost::main(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("sockhost: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
