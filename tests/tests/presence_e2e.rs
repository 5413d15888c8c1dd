//! Presence end to end: two presence instances and auth on one real Redis, real gRPC.

use std::time::Duration;

use switchboard_proto::auth::v1 as auth_pb;
use switchboard_proto::presence::v1 as pb;
use switchboard_proto::presence::v1::presence_service_client::PresenceServiceClient;
use switchboard_tests::auth::{authed, register_and_login};
use switchboard_tests::instance::{
    AuthOptions, ChildService, InProcess, auth_client, spawn_auth, spawn_presence,
};
use switchboard_tests::redis::RedisServer;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

async fn user(auth: &InProcess, name: &str) -> (String, String) {
    let mut c = auth_client(auth);
    let t = register_and_login(&mut c, name).await.expect("user");
    let me = c
        .who_am_i(authed(auth_pb::WhoAmIRequest {}, &t.access_token))
        .await
        .expect("whoami")
        .into_inner();
    (me.user.expect("user").id, t.access_token)
}

/// A device session: the request sender and the response stream.
struct Device {
    tx: mpsc::Sender<pb::ConnectRequest>,
    _rx: Streaming<pb::ConnectResponse>,
}

async fn connect(channel: Channel, token: &str) -> Device {
    let (tx, rx) = mpsc::channel(8);
    let mut client = PresenceServiceClient::new(channel);
    let mut stream = client
        .connect(authed(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            token,
        ))
        .await
        .expect("connect")
        .into_inner();
    let first = stream.message().await.expect("frame").expect("connected");
    assert!(matches!(
        first.frame,
        Some(pb::connect_response::Frame::Connected(_))
    ));
    Device { tx, _rx: stream }
}

impl Device {
    async fn set(&self, state: pb::PresenceState, text: &str) {
        let set = pb::SetState {
            state: state as i32,
            custom_text: text.into(),
            device_name: String::new(),
        };
        self.tx
            .send(pb::ConnectRequest {
                frame: Some(pb::connect_request::Frame::SetState(set)),
            })
            .await
            .expect("send");
    }
}

/// Reads watch events until `user` has `state` (and `sessions`, if given).
async fn until_state(
    watch: &mut Streaming<pb::WatchResponse>,
    user: &str,
    state: pb::PresenceState,
    sessions: Option<u32>,
    limit: Duration,
) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let msg = tokio::time::timeout(left, watch.message())
            .await
            .unwrap_or_else(|_| panic!("watcher never saw {user} {state:?}"))
            .expect("watch stream")
            .expect("watch open");
        let items = match msg.event {
            Some(pb::watch_response::Event::Snapshot(s)) => s.presences,
            Some(pb::watch_response::Event::Change(p)) => vec![p],
            None => vec![],
        };
        if items.iter().any(|p| {
            p.user_id == user
                && p.state == state as i32
                && sessions.is_none_or(|n| p.session_count == n)
        }) {
            return;
        }
    }
}

async fn watch(channel: Channel, token: &str, ids: Vec<String>) -> Streaming<pb::WatchResponse> {
    PresenceServiceClient::new(channel)
        .watch(authed(pb::WatchRequest { user_ids: ids }, token))
        .await
        .expect("watch")
        .into_inner()
}

#[tokio::test]
async fn a_watcher_on_one_instance_follows_a_user_on_the_other_and_devices_aggregate() {
    let redis = RedisServer::spawn().expect("redis");
    let auth = spawn_auth(Some(&redis), AuthOptions::default())
        .await
        .expect("auth");
    let ttl = Duration::from_secs(30);
    let a = spawn_presence(Some(&redis), auth.addr, ttl, Duration::from_millis(500))
        .await
        .expect("presence a");
    let b = spawn_presence(Some(&redis), auth.addr, ttl, Duration::from_millis(500))
        .await
        .expect("presence b");
    let (bob, bob_token) = user(&auth, "pbob").await;
    let (_, watcher_token) = user(&auth, "pwatcher").await;

    let mut w = watch(
        a.channel(),
        &watcher_token,
        vec![bob.clone(), "never-seen".into()],
    )
    .await;
    until_state(
        &mut w,
        &bob,
        pb::PresenceState::Offline,
        Some(0),
        Duration::from_secs(5),
    )
    .await;

    let phone = connect(b.channel(), &bob_token).await;
    until_state(
        &mut w,
        &bob,
        pb::PresenceState::Available,
        Some(1),
        Duration::from_secs(5),
    )
    .await;
    phone.set(pb::PresenceState::Away, "lunch").await;
    until_state(
        &mut w,
        &bob,
        pb::PresenceState::Away,
        Some(1),
        Duration::from_secs(5),
    )
    .await;

    // A second device that is available makes Bob available, with two sessions.
    let laptop = connect(a.channel(), &bob_token).await;
    until_state(
        &mut w,
        &bob,
        pb::PresenceState::Available,
        Some(2),
        Duration::from_secs(5),
    )
    .await;
    let got = PresenceServiceClient::new(b.channel())
        .get(authed(
            pb::GetRequest {
                user_ids: vec![bob.clone(), "never-seen".into()],
            },
            &watcher_token,
        ))
        .await
        .expect("get")
        .into_inner()
        .presences;
    assert_eq!(
        (got[0].state, got[0].session_count),
        (pb::PresenceState::Available as i32, 2)
    );
    assert_eq!(got[1].state, pb::PresenceState::Offline as i32);

    let online = PresenceServiceClient::new(a.channel())
        .list_online(authed(
            pb::ListOnlineRequest {
                role: auth_pb::Role::Customer as i32,
                state: 0,
            },
            &watcher_token,
        ))
        .await
        .expect("list online")
        .into_inner();
    assert_eq!(
        online
            .users
            .iter()
            .map(|u| u.user_id.as_str())
            .collect::<Vec<_>>(),
        [bob.as_str()]
    );

    // Closing one stream leaves the other; closing both makes Bob offline at once.
    drop(laptop);
    until_state(
        &mut w,
        &bob,
        pb::PresenceState::Away,
        Some(1),
        Duration::from_secs(5),
    )
    .await;
    drop(phone);
    until_state(
        &mut w,
        &bob,
        pb::PresenceState::Offline,
        Some(0),
        Duration::from_secs(5),
    )
    .await;
    let got = PresenceServiceClient::new(b.channel())
        .get(authed(
            pb::GetRequest {
                user_ids: vec![bob.clone()],
            },
            &watcher_token,
        ))
        .await
        .expect("get")
        .into_inner()
        .presences;
    assert!(
        got[0].last_seen.is_some(),
        "last seen kept after the last session ended"
    );
}

#[tokio::test]
async fn sessions_of_a_killed_instance_expire_and_watchers_elsewhere_see_it() {
    let redis = RedisServer::spawn().expect("redis");
    let auth = spawn_auth(Some(&redis), AuthOptions::default())
        .await
        .expect("auth");
    let mut doomed = ChildService::spawn(
        "switchboard-presence",
        &[
            ("REDIS_URL", redis.url()),
            ("AUTH_URL", format!("http://{}", auth.addr)),
            ("PRESENCE_TTL_SECS", "2".into()),
            ("PRESENCE_SWEEP_INTERVAL_MS", "200".into()),
        ],
    )
    .expect("presence process");
    let survivor = spawn_presence(
        Some(&redis),
        auth.addr,
        Duration::from_secs(2),
        Duration::from_millis(200),
    )
    .await
    .expect("presence");
    let (carol, carol_token) = user(&auth, "pcarol").await;
    let (_, watcher_token) = user(&auth, "pwatch2").await;
    let mut w = watch(survivor.channel(), &watcher_token, vec![carol.clone()]).await;
    let device = connect(doomed.channel(), &carol_token).await;
    until_state(
        &mut w,
        &carol,
        pb::PresenceState::Available,
        Some(1),
        Duration::from_secs(5),
    )
    .await;

    // While the instance lives it keeps the session fresh past the TTL.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = PresenceServiceClient::new(survivor.channel())
        .get(authed(
            pb::GetRequest {
                user_ids: vec![carol.clone()],
            },
            &watcher_token,
        ))
        .await
        .expect("get")
        .into_inner()
        .presences;
    assert_eq!(got[0].session_count, 1, "a live session expired");

    doomed.kill();
    // TTL (2 s) + sweep interval, with margin.
    until_state(
        &mut w,
        &carol,
        pb::PresenceState::Offline,
        Some(0),
        Duration::from_secs(8),
    )
    .await;
    drop(device);
}

#[tokio::test]
async fn bad_input_gets_invalid_argument() {
    let redis = RedisServer::spawn().expect("redis");
    let auth = spawn_auth(Some(&redis), AuthOptions::default())
        .await
        .expect("auth");
    let p = spawn_presence(
        Some(&redis),
        auth.addr,
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await
    .expect("presence");
    let (_, token) = user(&auth, "pbad").await;
    let mut c = PresenceServiceClient::new(p.channel());
    let many: Vec<String> = (0..501).map(|i| format!("u{i}")).collect();
    let e = c
        .get(authed(pb::GetRequest { user_ids: many }, &token))
        .await
        .expect_err("501 ids");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("500"), "{}", e.message());
    let e = c
        .watch(authed(pb::WatchRequest { user_ids: vec![] }, &token))
        .await
        .expect_err("0 ids");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .list_online(authed(pb::ListOnlineRequest { role: 0, state: 0 }, &token))
        .await
        .expect_err("no role");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .list_online(authed(
            pb::ListOnlineRequest {
                role: auth_pb::Role::Agent as i32,
                state: pb::PresenceState::Offline as i32,
            },
            &token,
        ))
        .await
        .expect_err("offline filter");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .get(pb::GetRequest {
            user_ids: vec!["x".into()],
        })
        .await
        .expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated);

    // Unknown states end the device stream with INVALID_ARGUMENT.
    for bad in [
        pb::PresenceState::Unspecified as i32,
        pb::PresenceState::Offline as i32,
        99,
    ] {
        let device = connect(p.channel(), &token).await;
        let set = pb::SetState {
            state: bad,
            custom_text: String::new(),
            device_name: String::new(),
        };
        device
            .tx
            .send(pb::ConnectRequest {
                frame: Some(pb::connect_request::Frame::SetState(set)),
            })
            .await
            .expect("send");
        let mut rx = device._rx;
        let status = switchboard_tests::ended(&mut rx, Duration::from_secs(5)).await;
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "state {bad}: {status:?}"
        );
    }
}

#[test]
fn help_lists_every_setting_and_bad_configuration_exits_64() {
    let bin = switchboard_tests::instance::binary("switchboard-presence").expect("binary");
    let out = std::process::Command::new(&bin)
        .arg("--help")
        .output()
        .expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "LISTEN_ADDR",
        "REDIS_URL",
        "AUTH_URL",
        "PRESENCE_TTL_SECS",
        "PRESENCE_SWEEP_INTERVAL_MS",
        "SHUTDOWN_GRACE_SECS",
    ] {
        assert!(
            help.contains(&format!("[env: {var}")),
            "--help does not list {var}"
        );
    }
    let out = std::process::Command::new(&bin)
        .env("PRESENCE_TTL_SECS", "0")
        .env("PRESENCE_SWEEP_INTERVAL_MS", "1")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("PRESENCE_TTL_SECS") && stderr.contains("PRESENCE_SWEEP_INTERVAL_MS"),
        "{stderr}"
    );
}

#[tokio::test]
async fn logout_ends_device_sessions_and_the_user_goes_offline() {
    let redis = RedisServer::spawn().expect("redis");
    let auth = spawn_auth(Some(&redis), AuthOptions::default())
        .await
        .expect("auth");
    let a = spawn_presence(
        Some(&redis),
        auth.addr,
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await
    .expect("presence a");
    let b = spawn_presence(
        Some(&redis),
        auth.addr,
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await
    .expect("presence b");
    let (dave, dave_token) = user(&auth, "pdave").await;
    let (_, watcher_token) = user(&auth, "pwatch3").await;
    let mut w = watch(a.channel(), &watcher_token, vec![dave.clone()]).await;
    let device = connect(b.channel(), &dave_token).await;
    until_state(
        &mut w,
        &dave,
        pb::PresenceState::Available,
        Some(1),
        Duration::from_secs(5),
    )
    .await;

    auth_client(&auth)
        .logout(authed(auth_pb::LogoutRequest {}, &dave_token))
        .await
        .expect("logout");
    let mut rx = device._rx;
    let status = switchboard_tests::ended(&mut rx, Duration::from_secs(3)).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    until_state(
        &mut w,
        &dave,
        pb::PresenceState::Offline,
        Some(0),
        Duration::from_secs(5),
    )
    .await;
}
