//! Messaging as a real process: `--help`, bad configuration, SIGTERM with an open stream.

use std::time::Duration;

use switchboard_common::status::reason_of;
use switchboard_tests::auth::register_and_login;
use switchboard_tests::instance::{
    AuthOptions, ChildService, assert_bad_config_exits_64, assert_help_lists, auth_client,
    spawn_auth,
};
use switchboard_tests::messaging::Connection;
use switchboard_tests::redis::RedisServer;
use tonic::Code;

#[test]
fn help_lists_every_setting_and_bad_configuration_exits_64() {
    assert_help_lists(
        "switchboard-messaging",
        &[
            "LISTEN_ADDR",
            "METRICS_ADDR",
            "REDIS_URL",
            "REDIS_CLUSTER_URLS",
            "REDIS_ACK_REPLICAS",
            "REDIS_ACK_TIMEOUT_MS",
            "MESSAGING_MAX_STREAM_AGE_SECS",
            "MESSAGING_STREAM_KEEPALIVE_SECS",
            "AUTH_URL",
            "MAX_MESSAGE_BYTES",
            "SHUTDOWN_GRACE_SECS",
            "MESSAGING_HISTORY_RETENTION",
            "MESSAGING_OUTBOUND_QUEUE",
            "MESSAGING_SEND_RATE_PER_SEC",
            "MESSAGING_SEND_BURST",
            "PRESENCE_URL",
            "SERVICE_TOKEN",
            "MESSAGING_SUPPORT_AGENT_CAPACITY",
            "MESSAGING_SUPPORT_RECHECK_SECS",
            "MESSAGING_MAX_STREAMS_PER_USER",
            "MESSAGING_MAX_GROUP_MEMBERS",
            "MAX_CONCURRENT_REQUESTS",
            "UNARY_TIMEOUT_MS",
            "HANDSHAKE_TIMEOUT_MS",
        ],
    );
    // Values that do not parse and values out of range, each named by its variable, all
    // in one report.
    assert_bad_config_exits_64(
        "switchboard-messaging",
        &[
            ("MESSAGING_OUTBOUND_QUEUE", "1"),
            ("MESSAGING_MAX_GROUP_MEMBERS", "lots"),
            ("METRICS_ADDR", "everywhere:please"),
            ("AUTH_URL", "nonsense"),
            ("PRESENCE_URL", "not a url"),
            ("REDIS_URL", "nope://x"),
            ("MESSAGING_STREAM_KEEPALIVE_SECS", "0"),
        ],
        &[
            "MESSAGING_OUTBOUND_QUEUE",
            "MESSAGING_MAX_GROUP_MEMBERS=\"lots\"",
            "METRICS_ADDR=\"everywhere:please\"",
            "or `off`",
            "AUTH_URL=\"nonsense\"",
            "PRESENCE_URL",
            "REDIS_URL",
            "MESSAGING_STREAM_KEEPALIVE_SECS: must be 1 to 3600",
        ],
    );
    // A flag given on the command line is named as the flag.
    let out = std::process::Command::new(
        switchboard_tests::instance::binary("switchboard-messaging").expect("binary"),
    )
    .arg("--metrics-addr=everywhere")
    .output()
    .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics-addr"));
}

#[tokio::test]
async fn sigterm_ends_open_streams_with_unavailable_and_exits_zero() {
    let redis = RedisServer::spawn().expect("redis");
    let auth = spawn_auth(Some(&redis), AuthOptions::default())
        .await
        .expect("auth");
    let mut messaging = ChildService::spawn(
        "switchboard-messaging",
        &[
            ("REDIS_URL", redis.url()),
            ("AUTH_URL", format!("http://{}", auth.addr)),
            ("SHUTDOWN_GRACE_SECS", "5".into()),
        ],
    )
    .expect("messaging");
    let token = register_and_login(&mut auth_client(&auth), "term")
        .await
        .expect("user")
        .access_token;
    let mut conn = Connection::open(messaging.channel(), &token)
        .await
        .expect("connect");
    conn.send(switchboard_proto::messaging::v1::connect_request::Frame::Ping(Default::default()))
        .await
        .expect("ping");
    conn.next(Duration::from_secs(5)).await.expect("pong");
    // Its server-streaming twin, with one subscription of a conversation the user lacks
    // (refused on the stream, which stays open).
    let mut sub = Connection::subscribed(
        messaging.channel(),
        &token,
        vec![switchboard_tests::messaging::from(
            &uuid::Uuid::now_v7().to_string(),
            0,
        )],
    )
    .await
    .expect("subscribe");
    sub.next(Duration::from_secs(5))
        .await
        .expect("refusal frame");

    let waiter = std::thread::spawn(move || {
        let status = messaging.terminate(Duration::from_secs(15));
        let output = messaging.output_with("background tasks done", Duration::from_secs(5));
        (status.map(|s| s.success()), output)
    });
    let ended = conn
        .next(Duration::from_secs(10))
        .await
        .expect_err("stream should end with a status");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("reconnect"), "{}", ended.message());
    let ended = sub.ended(Duration::from_secs(10)).await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert_eq!(reason_of(&ended).as_deref(), Some("SHUTTING_DOWN"));
    let (exited, output) = waiter.join().expect("waiter");
    assert!(exited.expect("exits"), "non-zero exit; output:\n{output}");
    // Without SERVICE_TOKEN the desk cannot ask presence: said once at start, and nothing
    // tries (and warns) in a loop.
    assert_eq!(
        output.matches("SERVICE_TOKEN is unset").count(),
        1,
        "{output}"
    );
    assert!(!output.contains("cannot watch agents"), "{output}");
    // Every background task (pub/sub, revocations, the stream's session) ended in time.
    assert!(output.contains("background tasks done"), "{output}");
}
