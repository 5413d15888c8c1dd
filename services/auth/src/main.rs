//! `switchboard-auth`: the auth service binary. See `--help` for every setting.

use std::process::ExitCode;

use switchboard_auth::{Args, run};
use switchboard_common::config::parse_args;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Args = parse_args();
    if args.generate_signing_key {
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
    let config = args.validate().unwrap_or_else(|e| e.exit());
    let server = config.server.clone();
    switchboard_common::server::main("switchboard-auth", &server, |listener, shutdown| {
        run(config, listener, shutdown)
    })
    .await
}
