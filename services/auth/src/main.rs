//! `switchboard-auth`: the auth service binary. See `--help` for every setting.

use std::process::ExitCode;

use switchboard_auth::{Args, run};
use switchboard_common::config::{Parsed, parse_args};

#[tokio::main]
async fn main() -> ExitCode {
    let parsed: Parsed<Args> = parse_args();
    if parsed.args.generate_signing_key {
        return match switchboard_auth::signing::generate_pem() {
            Ok(pem) => {
                print!("{pem}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cannot generate a key: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = parsed.validate(Args::validate).unwrap_or_else(|e| e.exit());
    let server = config.server.clone();
    switchboard_common::server::main("switchboard-auth", &server, |listener, shutdown| {
        run(config, listener, shutdown)
    })
    .await
}
