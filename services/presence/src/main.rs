//! `switchboard-presence`: the presence service binary. See `--help` for every setting.

use std::process::ExitCode;

use switchboard_common::config::parse_args;
use switchboard_presence::{Args, run};

#[tokio::main]
async fn main() -> ExitCode {
    let args: Args = parse_args();
    let config = args.validate().unwrap_or_else(|e| e.exit());
    let server = config.server.clone();
    switchboard_common::server::main("switchboard-presence", &server, |listener, shutdown| {
        run(config, listener, shutdown)
    })
    .await
}
