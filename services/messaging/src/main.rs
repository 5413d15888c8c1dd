//! `switchboard-messaging`: the messaging service binary. See `--help` for every setting.

use std::process::ExitCode;

use switchboard_common::config::{Parsed, parse_args};
use switchboard_messaging::{Args, run};

#[tokio::main]
async fn main() -> ExitCode {
    let parsed: Parsed<Args> = parse_args();
    let config = parsed.validate(Args::validate).unwrap_or_else(|e| e.exit());
    let server = config.server.clone();
    switchboard_common::server::main("switchboard-messaging", &server, |listener, shutdown| {
        run(config, listener, shutdown)
    })
    .await
}
