//! Auth as a real process: crash of an instance, SIGTERM, bad configuration, `--help`.
//! Uses the built binary (`cargo build --bins`; `make test` does it).

use std::time::Duration;

use switchboard_proto::auth::v1 as pb;
use switchboard_proto::auth::v1::auth_service_client::AuthServiceClient;
use switchboard_tests::auth::{authed, register_and_login};
use switchboard_tests::instance::{
    AuthOptions, ChildService, assert_help_lists, auth_client, spawn_auth,
};
use switchboard_tests::redis::RedisServer;

#[tokio::test]
async fn tokens_of_a_killed_instance_stay_valid_on_the_survivor() {
    let redis = RedisServer::spawn().expect("redis");
    let mut doomed = ChildService::spawn(
        "switchboard-auth",
        &[
            ("REDIS_URL", redis.url()),
            ("AUTH_ARGON2_MEMORY_KIB", "1024".into()),
            ("AUTH_ARGON2_ITERATIONS", "1".into()),
        ],
    )
    .expect("child auth");
    let survivor = spawn_auth(Some(&redis), AuthOptions::default())
        .await
        .expect("in-process auth");

    let mut a = AuthServiceClient::new(doomed.channel());
    let tokens = register_and_login(&mut a, "kim")
        .await
        .expect("register and login");

    doomed.kill();

    // The survivor has never seen the dead instance's key; it finds it in the store.
    let mut b = auth_client(&survivor);
    let me = b
        .who_am_i(authed(pb::WhoAmIRequest {}, &tokens.access_token))
        .await
        .expect("token of a dead instance");
    assert_eq!(me.into_inner().user.expect("user").username, "kim");
    // The session lives in Redis, so it can be refreshed on the survivor.
    b.refresh(pb::RefreshRequest {
        refresh_token: tokens.refresh_token,
    })
    .await
    .expect("refresh on survivor");
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let mut child = ChildService::spawn("switchboard-auth", &[("SHUTDOWN_GRACE_SECS", "3".into())])
        .expect("child auth");
    let mut c = AuthServiceClient::new(child.channel());
    c.get_jwks(pb::GetJwksRequest {}).await.expect("serving");
    let status = child
        .terminate(Duration::from_secs(10))
        .expect("exits after SIGTERM");
    assert!(
        status.success(),
        "exit status {status}; output:\n{}",
        child.output()
    );
    // The key-publishing task and the revocation follower were waited for.
    let output = child.output_with("background tasks done", Duration::from_secs(5));
    assert!(output.contains("background tasks done"), "{output}");
}

#[test]
fn bad_configuration_is_reported_all_at_once_with_exit_code_64() {
    let out = switchboard_tests::instance::command("switchboard-auth")
        .expect("binary")
        .env("AUTH_ACCESS_TTL_SECS", "5")
        .env("TLS_CERT_FILE", "/nonexistent/cert.pem")
        .env("AUTH_ADMIN_USERNAME", "root")
        // Values that do not even parse are reported with the rest, by variable name.
        .env("AUTH_HASH_QUEUE", "many")
        .env("LOG_FORMAT", "xml")
        // An origin needs its scheme, and nothing after the host and port.
        .env(
            "CORS_ALLOWED_ORIGINS",
            "http://localhost:8080,shop.example,https://a.example/path",
        )
        .env_remove("TLS_KEY_FILE")
        .env_remove("AUTH_ADMIN_PASSWORD")
        .env_remove("REDIS_URL")
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(64),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for named in [
        "AUTH_ACCESS_TTL_SECS",
        "TLS_CERT_FILE",
        "AUTH_ADMIN_PASSWORD",
        "AUTH_HASH_QUEUE=\"many\"",
        "LOG_FORMAT=\"xml\": expected one of: text, json",
        "CORS_ALLOWED_ORIGINS: 'shop.example' is not an origin",
        "CORS_ALLOWED_ORIGINS: 'https://a.example/path' is not an origin",
    ] {
        assert!(stderr.contains(named), "{named} not reported in:\n{stderr}");
    }
    assert!(
        !stderr.contains("'http://localhost:8080'"),
        "a good origin refused:\n{stderr}"
    );

    let out = switchboard_tests::instance::command("switchboard-auth")
        .expect("binary")
        .arg("--listen-addr=nope")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn help_lists_every_setting_with_its_environment_variable() {
    assert_help_lists(
        "switchboard-auth",
        &[
            "LISTEN_ADDR",
            "METRICS_ADDR",
            "REDIS_URL",
            "REDIS_CLUSTER_URLS",
            "TLS_CERT_FILE",
            "TLS_KEY_FILE",
            "MAX_MESSAGE_BYTES",
            "SHUTDOWN_GRACE_SECS",
            "LOG_FORMAT",
            "AUTH_ACCESS_TTL_SECS",
            "AUTH_REFRESH_TTL_SECS",
            "AUTH_SIGNING_KEY_FILE",
            "AUTH_ADMIN_USERNAME",
            "AUTH_ADMIN_PASSWORD",
            "AUTH_ARGON2_MEMORY_KIB",
            "AUTH_ARGON2_ITERATIONS",
            "AUTH_HASH_CONCURRENCY",
            "AUTH_HASH_QUEUE",
            "AUTH_LOGIN_MAX_FAILURES_PER_USER",
            "AUTH_LOGIN_MAX_FAILURES_PER_PEER",
            "AUTH_LOGIN_FAILURE_WINDOW_SECS",
            "AUTH_REGISTRATIONS_PER_PEER",
            "AUTH_GUESTS_PER_PEER",
            "AUTH_GUEST_SESSION_TTL_SECS",
            "MAX_CONCURRENT_REQUESTS",
            "UNARY_TIMEOUT_MS",
            "HANDSHAKE_TIMEOUT_MS",
        ],
    );
}

#[tokio::test]
async fn serves_and_exits_cleanly_with_trace_export_to_a_dead_collector() {
    let dead = format!(
        "http://127.0.0.1:{}",
        switchboard_tests::free_port().expect("port")
    );
    let mut child = ChildService::spawn(
        "switchboard-auth",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", dead),
            ("SHUTDOWN_GRACE_SECS", "2".into()),
        ],
    )
    .expect("child auth with OTLP on");
    let mut c = AuthServiceClient::new(child.channel());
    let tokens = register_and_login(&mut c, "otto")
        .await
        .expect("calls succeed with the collector down");
    c.who_am_i(authed(pb::WhoAmIRequest {}, &tokens.access_token))
        .await
        .expect("whoami");
    drop(c);
    let status = child.terminate(Duration::from_secs(15)).expect("exits");
    assert!(
        status.success(),
        "exit status {status}; output:\n{}",
        child.output()
    );
}

#[test]
fn generate_signing_key_prints_a_usable_key() {
    let out = switchboard_tests::instance::command("switchboard-auth")
        .expect("binary")
        .arg("--generate-signing-key")
        .output()
        .expect("run");
    assert!(out.status.success());
    let pem = String::from_utf8(out.stdout).expect("utf-8");
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
    switchboard_auth::signing::Keyring::from_pem(&pem, 900).expect("the printed key loads");
}
