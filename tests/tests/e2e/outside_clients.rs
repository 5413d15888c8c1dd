//! Real outside clients against a real auth process on Redis: the grpcurl binary (through
//! reflection) and a Python client generated from `proto/` by `buf generate` (buf.gen.yaml,
//! with grpcio-tools' generators).
//! `make test` installs both; without them these tests fail and say how to install.

use std::path::PathBuf;
use std::process::{Command, Output};

use switchboard_tests::instance::ChildService;
use switchboard_tests::redis::RedisServer;

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (run `make test`, which installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// The Python clients `buf generate` made from the protos (buf.gen.yaml).
fn generate_python() -> PathBuf {
    if let Err(e) = switchboard_tests::web::generate() {
        panic!("{e}");
    }
    switchboard_tests::web::python_dir()
}

fn auth_process(redis: &RedisServer) -> ChildService {
    ChildService::spawn(
        "switchboard-auth",
        &[
            ("REDIS_URL", redis.url()),
            ("AUTH_ARGON2_MEMORY_KIB", "1024".into()),
            ("AUTH_ARGON2_ITERATIONS", "1".into()),
        ],
    )
    .expect("auth process")
}

#[test]
fn grpcurl_lists_describes_and_calls_auth_through_reflection() {
    let redis = RedisServer::spawn().expect("redis");
    let auth = auth_process(&redis);
    let addr = auth.addr.to_string();
    let grpcurl = |args: &[&str]| {
        let mut cmd = Command::new("grpcurl");
        cmd.args(["-plaintext", "-max-time", "10"]).args(args);
        run(&mut cmd)
    };

    let list = String::from_utf8_lossy(&grpcurl(&[&addr, "list"]).stdout).to_string();
    assert!(list.contains("switchboard.auth.v1.AuthService"), "{list}");
    assert!(list.contains("grpc.health.v1.Health"), "{list}");
    assert!(
        !list.contains("MessagingService"),
        "auth advertises services it does not serve: {list}"
    );

    let describe = String::from_utf8_lossy(
        &grpcurl(&[&addr, "describe", "switchboard.auth.v1.AuthService.Login"]).stdout,
    )
    .to_string();
    assert!(describe.contains("rpc Login"), "{describe}");
    assert!(
        describe.contains("same UNAUTHENTICATED answer"),
        "proto comments missing from reflection: {describe}"
    );

    let user = json(&grpcurl(&[
        "-d",
        r#"{"username":"Curly","password":"curl password","display_name":"Curly"}"#,
        &addr,
        "switchboard.auth.v1.AuthService/Register",
    ]));
    assert_eq!(user["user"]["username"], "curly");
    let login = json(&grpcurl(&[
        "-d",
        r#"{"username":"curly","password":"curl password"}"#,
        &addr,
        "switchboard.auth.v1.AuthService/Login",
    ]));
    let token = login["tokens"]["accessToken"]
        .as_str()
        .expect("accessToken");
    let header = format!("authorization: Bearer {token}");
    let me = json(&grpcurl(&[
        "-H",
        &header,
        &addr,
        "switchboard.auth.v1.AuthService/WhoAmI",
    ]));
    assert_eq!(me["user"]["id"], user["user"]["id"]);
    assert_eq!(me["user"]["role"], "ROLE_CUSTOMER");

    let health = json(&grpcurl(&[&addr, "grpc.health.v1.Health/Check"]));
    assert_eq!(health["status"], "SERVING");

    // Without a token: a precise status, not UNKNOWN.
    let denied = Command::new("grpcurl")
        .args([
            "-plaintext",
            "-max-time",
            "10",
            &addr,
            "switchboard.auth.v1.AuthService/WhoAmI",
        ])
        .output()
        .expect("grpcurl");
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("Unauthenticated"));

    // A refusal's google.rpc details resolve through reflection: -format-error prints them.
    let refused = Command::new("grpcurl")
        .args([
            "-plaintext",
            "-max-time",
            "10",
            "-format-error",
            "-H",
            &header,
            "-d",
        ])
        .arg(r#"{"user_ids":["not-an-id"]}"#)
        .args([&addr, "switchboard.auth.v1.AuthService/GetUsers"])
        .output()
        .expect("grpcurl");
    assert!(!refused.status.success());
    let details = String::from_utf8_lossy(&refused.stdout).to_string()
        + &String::from_utf8_lossy(&refused.stderr);
    for expected in [
        r#""reason": "INVALID_ARGUMENT""#,
        r#""domain": "switchboard""#,
        r#""field": "user_ids[0]""#,
    ] {
        assert!(
            details
                .replace(['\n', ' '], "")
                .contains(&expected.replace(' ', "")),
            "{expected} missing from:\n{details}"
        );
    }
}

#[test]
fn python_client_generated_from_the_protos_talks_to_auth() {
    let redis = RedisServer::spawn().expect("redis");
    let auth = auth_process(&redis);
    let out_dir = generate_python();

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/auth_client.py");
    let result = json(&run(Command::new("python3")
        .arg(script)
        .arg(&out_dir)
        .arg(auth.addr.to_string())
        .arg("pyuser")));
    assert_eq!(result["registered_id"], result["whoami_id"]);
    assert_eq!(result["username"], "pyuser");
    assert_eq!(result["role"], "ROLE_CUSTOMER");
    assert_eq!(result["session_id"], result["token_session_id"]);
    assert_eq!(result["wrong_password"], "UNAUTHENTICATED");
    // The generated client reads the reason from the status details and matches it
    // against the generated ErrorReason constant.
    assert_eq!(result["wrong_password_reason"], "BAD_CREDENTIALS");
    assert_eq!(result["reason_is_the_constant"], true);
    assert_eq!(result["bad_request_field"], "user_ids[0]");
}

#[test]
fn python_client_runs_a_bidirectional_connect_session() {
    let redis = RedisServer::spawn().expect("redis");
    let auth = auth_process(&redis);
    let messaging = ChildService::spawn(
        "switchboard-messaging",
        &[
            ("REDIS_URL", redis.url()),
            ("AUTH_URL", format!("http://{}", auth.addr)),
        ],
    )
    .expect("messaging process");
    let out_dir = generate_python();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/messaging_client.py");
    let result = json(&run(Command::new("python3")
        .arg(script)
        .arg(&out_dir)
        .arg(auth.addr.to_string())
        .arg(messaging.addr.to_string())));
    assert_eq!(result["subscribed"], true);
    assert_eq!(result["recovered"], true);
    assert_eq!(result["send_result_seq"], 1);
    assert_eq!(result["message_seq"], 1);
    assert_eq!(result["body"], "hello from python");
}
