//! `switchboard-messaging`: the messaging service binary. See `--help` for every setting.

use std::process::ExitCode;

use switchboard_common::{config::parse_args, shutdown, telemetry};
use switchboard_messaging::{Args, run};

#[tokio::main]
async fn main() -> ExitCode {
    let args: Args = parse_args();
    let config = args.validate().unwrap_or_else(|e| e.exit());
    let telemetry = match telemetry::init("switchboard-messaging", config.server.log_format) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("cannot start telemetry: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(config.server.listen_addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %config.server.listen_addr, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, "switchboard-messaging listening"),
        Err(e) => tracing::warn!(error = %e, "listening on an unknown address"),
    }
    let result = run(config, listener, shutdown::on_signal()).await;
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard-messaging failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
