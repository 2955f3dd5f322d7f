//! `hcloud-simulator`: the Hetzner Cloud API simulator on its own (the same flags as
//! `vps-controller simulator`). Logs go to stderr; `RUST_LOG` sets the level (default `info`).

use std::process::ExitCode;

use clap::Parser;
use hcloud_simulator::cli::{ServeArgs, serve, shutdown_signal};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "hcloud-simulator",
    version,
    about = "Serve the Hetzner Cloud API simulator under /v1"
)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(&cli.serve, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
