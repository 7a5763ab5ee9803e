//! The `sockhost` binary: parse the command line, then hand over to the library.

use clap::Parser;

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
