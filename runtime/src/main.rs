//! The `sockhost` binary: parse settings, then hand over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = sockhost::Cli::parse();
    sockhost::init_logging();
    let result = async {
        let config = sockhost::Config::from_cli(cli)?;
        let server = sockhost::Server::start(config).await?;
        server.run_until(sockhost::shutdown_signal()).await;
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sockhost: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
