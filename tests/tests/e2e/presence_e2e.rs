//! Presence end to end: two presence instances and auth on one real Redis, real gRPC.

use std::time::Duration;

use switchboard_proto::auth::v1 as auth_pb;
use switchboard_proto::presence::v1 as pb;
use switchboard_proto::presence::v1::presence_service_client::PresenceServiceClient;
use switchboard_tests::auth::{authed, register_and_login};
use switchboard_tests::instance::{
    AuthOptions, ChildService, InProcess, assert_bad_config_exits_64, assert_help_lists,
    auth_client,
};
use switchboard_tests::presence::connect;
use switchboard_tests::proxy::Proxy;
use switchboard_tests::stack::{Stack, StackOptions};
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

const MS500: Duration = Duration::from_millis(500);
const SECOND: Duration = Duration::from_secs(1);

/// Auth and `n` presence instances on one Redis, with (TTL, sweep interval, reconnect grace).
async fn presence_stack(n: usize, timing: (Duration, Duration, Duration)) -> Stack {
    presence_stack_on(n, timing, false).await
}

/// [`presence_stack`] on a Redis Cluster with `redis_cluster`.
async fn presence_stack_on(
    n: usize,
    timing: (Duration, Duration, Duration),
    redis_cluster: bool,
) -> Stack {
    Stack::start(StackOptions {
        presence: n,
        presence_timing: timing,
        messaging: 0,
        cluster: redis_cluster,
        ..Default::default()
    })
    .await
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
        .watch(authed(
            pb::WatchRequest {
                user_ids: ids,
                role: 0,
            },
            token,
        ))
        .await
        .expect("watch")
        .into_inner()
}

#[tokio::test]
async fn a_watcher_on_one_instance_follows_a_user_on_the_other_and_devices_aggregate() {
    a_watcher_on_one_instance_follows_a_user_on_the_other_and_devices_aggregate_on(false).await;
}

#[tokio::test]
async fn a_watcher_on_one_instance_follows_a_user_on_the_other_and_devices_aggregate_on_a_redis_cluster()
 {
    a_watcher_on_one_instance_follows_a_user_on_the_other_and_devices_aggregate_on(true).await;
}

async fn a_watcher_on_one_instance_follows_a_user_on_the_other_and_devices_aggregate_on(
    redis_cluster: bool,
) {
    let stack = presence_stack_on(
        2,
        (Duration::from_secs(30), MS500, Duration::from_secs(1)),
        redis_cluster,
    )
    .await;
    let (auth, a, b) = (&stack.auth[0], &stack.presence[0], &stack.presence[1]);
    let (bob, bob_token) = user(auth, "pbob").await;
    let (_, watcher_token) = user(auth, "pwatcher").await;
    let never_seen = uuid::Uuid::now_v7().to_string();

    let mut w = watch(
        a.channel(),
        &watcher_token,
        vec![bob.clone(), never_seen.clone()],
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
                user_ids: vec![bob.clone(), never_seen.clone()],
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
    laptop.close().await;
    until_state(
        &mut w,
        &bob,
        pb::PresenceState::Away,
        Some(1),
        Duration::from_secs(5),
    )
    .await;
    phone.close().await;
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
    let stack = presence_stack(
        1,
        (
            Duration::from_secs(2),
            Duration::from_millis(200),
            Duration::from_secs(1),
        ),
    )
    .await;
    let (auth, survivor) = (&stack.auth[0], &stack.presence[0]);
    let mut doomed = ChildService::spawn(
        "switchboard-presence",
        &[
            ("REDIS_URL", stack.redis.one().url()),
            ("AUTH_URL", format!("http://{}", auth.addr)),
            ("PRESENCE_TTL_SECS", "2".into()),
            ("PRESENCE_SWEEP_INTERVAL_MS", "200".into()),
        ],
    )
    .expect("presence process");
    let (carol, carol_token) = user(auth, "pcarol").await;
    let (_, watcher_token) = user(auth, "pwatch2").await;
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
    let stack = presence_stack(1, (Duration::from_secs(30), SECOND, SECOND)).await;
    let (auth, p) = (&stack.auth[0], &stack.presence[0]);
    let (_, token) = user(auth, "pbad").await;
    let mut c = PresenceServiceClient::new(p.channel());
    let many: Vec<String> = (0..501).map(|i| format!("u{i}")).collect();
    let e = c
        .get(authed(pb::GetRequest { user_ids: many }, &token))
        .await
        .expect_err("501 ids");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("500"), "{}", e.message());
    let e = c
        .watch(authed(
            pb::WatchRequest {
                user_ids: vec![],
                role: 0,
            },
            &token,
        ))
        .await
        .expect_err("0 ids");
    assert_eq!(e.code(), Code::InvalidArgument);
    for (ids, role, why) in [
        (vec!["x".to_string()], auth_pb::Role::Agent as i32, "both"),
        (vec![], 42, "unknown role"),
        ((0..501).map(|i| format!("u{i}")).collect(), 0, "501 ids"),
    ] {
        let e = c
            .watch(authed(
                pb::WatchRequest {
                    user_ids: ids,
                    role,
                },
                &token,
            ))
            .await
            .expect_err(why);
        assert_eq!(e.code(), Code::InvalidArgument, "{why}: {e:?}");
    }
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
        let mut rx = device.rx;
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
    assert_help_lists(
        "switchboard-presence",
        &[
            "LISTEN_ADDR",
            "METRICS_ADDR",
            "REDIS_URL",
            "REDIS_CLUSTER_URLS",
            "AUTH_URL",
            "PRESENCE_TTL_SECS",
            "PRESENCE_SWEEP_INTERVAL_MS",
            "PRESENCE_RECONNECT_GRACE_MS",
            "SERVICE_TOKEN",
            "SHUTDOWN_GRACE_SECS",
            "PRESENCE_MAX_STREAMS_PER_USER",
            "MAX_CONCURRENT_REQUESTS",
            "UNARY_TIMEOUT_MS",
            "HANDSHAKE_TIMEOUT_MS",
        ],
    );
    assert_bad_config_exits_64(
        "switchboard-presence",
        &[
            ("PRESENCE_TTL_SECS", "0"),
            ("PRESENCE_SWEEP_INTERVAL_MS", "1"),
        ],
        &["PRESENCE_TTL_SECS", "PRESENCE_SWEEP_INTERVAL_MS"],
    );
}

#[test]
fn one_redis_or_a_cluster_is_configured_never_both_nor_a_bad_seed() {
    assert_bad_config_exits_64(
        "switchboard-presence",
        &[
            ("REDIS_URL", "redis://127.0.0.1:1/"),
            ("REDIS_CLUSTER_URLS", "redis://127.0.0.1:2/"),
        ],
        &["REDIS_URL and REDIS_CLUSTER_URLS: set one of them"],
    );
    assert_bad_config_exits_64(
        "switchboard-presence",
        &[("REDIS_CLUSTER_URLS", "redis://127.0.0.1:2/, nonsense")],
        &["REDIS_CLUSTER_URLS: URL 2 of 2 is not a Redis URL"],
    );
    assert_bad_config_exits_64(
        "switchboard-presence",
        &[("REDIS_CLUSTER_URLS", " , ")],
        &["REDIS_CLUSTER_URLS: no URL given"],
    );
}

#[tokio::test]
async fn logout_ends_device_sessions_and_the_user_goes_offline() {
    logout_ends_device_sessions_and_the_user_goes_offline_on(false).await;
}

#[tokio::test]
async fn logout_ends_device_sessions_and_the_user_goes_offline_on_a_redis_cluster() {
    logout_ends_device_sessions_and_the_user_goes_offline_on(true).await;
}

async fn logout_ends_device_sessions_and_the_user_goes_offline_on(redis_cluster: bool) {
    let stack =
        presence_stack_on(2, (Duration::from_secs(30), SECOND, SECOND), redis_cluster).await;
    let (auth, a, b) = (&stack.auth[0], &stack.presence[0], &stack.presence[1]);
    let (dave, dave_token) = user(auth, "pdave").await;
    let (_, watcher_token) = user(auth, "pwatch3").await;
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

    auth_client(auth)
        .logout(authed(auth_pb::LogoutRequest {}, &dave_token))
        .await
        .expect("logout");
    let mut rx = device.rx;
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

/// Every watch item (for `user`, if given) seen within `window`.
async fn collect(
    watch: &mut Streaming<pb::WatchResponse>,
    user: Option<&str>,
    window: Duration,
) -> Vec<pb::UserPresence> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Ok(Some(msg))) = tokio::time::timeout_at(deadline, watch.message()).await {
        let items = match msg.event {
            Some(pb::watch_response::Event::Snapshot(s)) => s.presences,
            Some(pb::watch_response::Event::Change(p)) => vec![p],
            None => vec![],
        };
        seen.extend(
            items
                .into_iter()
                .filter(|p| user.is_none_or(|u| p.user_id == u)),
        );
    }
    seen
}

#[tokio::test]
async fn a_device_that_reconnects_within_the_grace_never_looks_offline() {
    a_device_that_reconnects_within_the_grace_never_looks_offline_on(false).await;
}

#[tokio::test]
async fn a_device_that_reconnects_within_the_grace_never_looks_offline_on_a_redis_cluster() {
    a_device_that_reconnects_within_the_grace_never_looks_offline_on(true).await;
}

async fn a_device_that_reconnects_within_the_grace_never_looks_offline_on(redis_cluster: bool) {
    let grace = Duration::from_millis(1500);
    let sweep = Duration::from_millis(200);
    let stack = presence_stack_on(2, (Duration::from_secs(30), sweep, grace), redis_cluster).await;
    let (auth, a, b) = (&stack.auth[0], &stack.presence[0], &stack.presence[1]);
    let (bob, bob_token) = user(auth, "flapbob").await;
    let (_, watcher_token) = user(auth, "flapwatch").await;
    let mut w = watch(a.channel(), &watcher_token, vec![bob.clone()]).await;

    let proxy = Proxy::start(b.addr).await.expect("proxy");
    let _first = connect(proxy.channel(), &bob_token).await;
    until_state(
        &mut w,
        &bob,
        pb::PresenceState::Available,
        Some(1),
        Duration::from_secs(5),
    )
    .await;
    // The network drops (the client never closes its stream), and the device is back on
    // the other instance a moment later.
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let proxy_a = Proxy::start(a.addr).await.expect("proxy");
    let _second = connect(proxy_a.channel(), &bob_token).await;
    // Long enough for the old session to linger out and be swept.
    let seen = collect(&mut w, Some(&bob), grace + sweep * 5).await;
    assert!(
        seen.iter()
            .all(|p| p.state == pb::PresenceState::Available as i32),
        "a reconnect within the grace must not show Bob offline: {seen:?}"
    );
    assert_eq!(
        seen.last().map(|p| p.session_count),
        Some(1),
        "the broken session expired after the grace, the new one stays: {seen:?}"
    );

    // Without a reconnect, a broken stream goes offline once the grace is over.
    let broke_at = tokio::time::Instant::now();
    proxy_a.cut();
    until_state(
        &mut w,
        &bob,
        pb::PresenceState::Offline,
        Some(0),
        grace + Duration::from_secs(5),
    )
    .await;
    assert!(
        broke_at.elapsed() >= grace - Duration::from_millis(100),
        "offline after {:?}, before the grace of {grace:?}",
        broke_at.elapsed()
    );
}

#[tokio::test]
async fn a_role_watch_sees_agents_come_online_change_and_leave() {
    a_role_watch_sees_agents_come_online_change_and_leave_on(false).await;
}

#[tokio::test]
async fn a_role_watch_sees_agents_come_online_change_and_leave_on_a_redis_cluster() {
    a_role_watch_sees_agents_come_online_change_and_leave_on(true).await;
}

async fn a_role_watch_sees_agents_come_online_change_and_leave_on(redis_cluster: bool) {
    let stack = Stack::start(StackOptions {
        auth: AuthOptions {
            admin: Some(("padmin".into(), "admin password".into())),
            ..AuthOptions::default()
        },
        presence: 2,
        presence_timing: (Duration::from_secs(30), MS500, Duration::ZERO),
        messaging: 0,
        cluster: redis_cluster,
        ..Default::default()
    })
    .await;
    let (a, b) = (&stack.presence[0], &stack.presence[1]);
    let early = stack.person("early_agent", auth_pb::Role::Agent).await;
    let late = stack.person("late_agent", auth_pb::Role::Agent).await;
    let customer = stack.person("role_customer", auth_pb::Role::Customer).await;
    let _early_device = connect(b.channel(), &early.token).await;

    let mut w = PresenceServiceClient::new(a.channel())
        .watch(authed(
            pb::WatchRequest {
                user_ids: vec![],
                role: auth_pb::Role::Agent as i32,
            },
            &customer.token,
        ))
        .await
        .expect("role watch")
        .into_inner();
    let snapshot = match w.message().await.expect("frame").expect("open").event {
        Some(pb::watch_response::Event::Snapshot(s)) => s.presences,
        other => panic!("snapshot first, got {other:?}"),
    };
    assert_eq!(
        snapshot
            .iter()
            .map(|p| p.user_id.as_str())
            .collect::<Vec<_>>(),
        [early.id.as_str()],
        "the snapshot holds the online agents"
    );
    // A customer coming online is not an agent: never on this watch.
    let _customer_device = connect(b.channel(), &customer.token).await;
    let late_device = connect(b.channel(), &late.token).await;
    let mut seen = collect(&mut w, None, Duration::from_millis(1500)).await;
    late_device.set(pb::PresenceState::Away, "lunch").await;
    seen.extend(collect(&mut w, None, Duration::from_millis(1000)).await);
    late_device.close().await;
    seen.extend(collect(&mut w, None, Duration::from_millis(1000)).await);
    assert!(
        seen.iter().all(|p| p.user_id == late.id),
        "only the agent that changed: {seen:?}"
    );
    let states: Vec<i32> = seen.iter().map(|p| p.state).collect();
    assert_eq!(
        states,
        [
            pb::PresenceState::Available as i32,
            pb::PresenceState::Away as i32,
            pb::PresenceState::Offline as i32
        ],
        "{seen:?}"
    );
    assert!(
        seen.iter().all(|p| p.role == auth_pb::Role::Agent as i32),
        "the role is reported, offline too: {seen:?}"
    );
}

#[tokio::test]
async fn a_session_stream_is_steered_from_any_instance_and_ends_as_connect_does() {
    a_session_stream_is_steered_from_any_instance_and_ends_as_connect_does_on(false).await;
}

#[tokio::test]
async fn a_session_stream_is_steered_from_any_instance_and_ends_as_connect_does_on_a_redis_cluster()
{
    a_session_stream_is_steered_from_any_instance_and_ends_as_connect_does_on(true).await;
}

/// The next Presence or HeartbeatAck frame of a Session stream within `limit`.
async fn session_frame(
    stream: &mut Streaming<pb::ConnectResponse>,
    limit: Duration,
) -> pb::connect_response::Frame {
    tokio::time::timeout(limit, stream.message())
        .await
        .expect("a frame in time")
        .expect("the stream")
        .and_then(|f| f.frame)
        .expect("a frame, not the end")
}

fn set_state(state: pb::PresenceState, text: &str) -> pb::SetState {
    pb::SetState {
        state: state as i32,
        custom_text: text.into(),
        device_name: String::new(),
    }
}

async fn a_session_stream_is_steered_from_any_instance_and_ends_as_connect_does_on(
    redis_cluster: bool,
) {
    use pb::connect_response::Frame as F;
    use switchboard_common::status::reason_of;
    use switchboard_tests::bad_field;
    use switchboard_tests::presence::session;

    let ttl = Duration::from_secs(3);
    let grace = Duration::from_secs(4);
    let stack = presence_stack_on(2, (ttl, Duration::from_millis(200), grace), redis_cluster).await;
    let (auth, a, b) = (&stack.auth[0], &stack.presence[0], &stack.presence[1]);
    let (erin, erin_token) = user(auth, "serin").await;
    let (_, other_token) = user(auth, "sother").await;
    let mut w = watch(a.channel(), &other_token, vec![erin.clone()]).await;

    // Opened on b in the state asked for: watchers see AWAY, never an AVAILABLE first.
    let (id, mut stream) = session(
        b.channel(),
        &erin_token,
        set_state(pb::PresenceState::Away, "lunch"),
    )
    .await
    .expect("session");
    match session_frame(&mut stream, SECOND * 5).await {
        F::Presence(p) => assert_eq!(
            (p.state, p.custom_text.as_str()),
            (pb::PresenceState::Away as i32, "lunch")
        ),
        other => panic!("expected Presence, got {other:?}"),
    }
    let seen = collect(&mut w, Some(&erin), MS500).await;
    assert!(
        !seen.is_empty()
            && seen
                .iter()
                .all(|p| p.state == pb::PresenceState::Offline as i32
                    || p.state == pb::PresenceState::Away as i32),
        "{seen:?}"
    );

    // Steered from the other instance; the stream hears of it.
    let mut on_a = PresenceServiceClient::new(a.channel());
    on_a.set_session_state(authed(
        pb::SetSessionStateRequest {
            session_id: id.clone(),
            state: Some(set_state(pb::PresenceState::Busy, "call")),
        },
        &erin_token,
    ))
    .await
    .expect("set from a");
    let busy = loop {
        match session_frame(&mut stream, SECOND * 5).await {
            F::Presence(p) => break p,
            F::HeartbeatAck(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(busy.state, pb::PresenceState::Busy as i32);
    until_state(&mut w, &erin, pb::PresenceState::Busy, Some(1), SECOND * 5).await;

    // The client sends nothing, yet the session outlives its TTL, and the server's
    // keep-alive arrives every heartbeat interval (TTL / 3).
    let mut acks = 0;
    let until = tokio::time::Instant::now() + ttl + SECOND;
    while tokio::time::Instant::now() < until {
        if let F::HeartbeatAck(_) = session_frame(&mut stream, SECOND * 3).await {
            acks += 1;
        }
    }
    assert!(acks >= 2, "{acks} keep-alives in {:?}", ttl + SECOND);
    let now = on_a
        .get(authed(
            pb::GetRequest {
                user_ids: vec![erin.clone()],
            },
            &other_token,
        ))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(now.presences[0].state, pb::PresenceState::Busy as i32);
    assert_eq!(now.presences[0].session_count, 1);

    // Refusals name the field, or say there is no such session of the caller's.
    let refuse = |session_id: String, state: Option<pb::SetState>, token: String| {
        let mut client = on_a.clone();
        async move {
            client
                .set_session_state(authed(
                    pb::SetSessionStateRequest { session_id, state },
                    &token,
                ))
                .await
                .expect_err("refused")
        }
    };
    let e = refuse(
        id.clone(),
        Some(set_state(pb::PresenceState::Offline, "")),
        erin_token.clone(),
    )
    .await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(bad_field(&e).as_deref(), Some("state"));
    let e = refuse(id.clone(), None, erin_token.clone()).await;
    assert_eq!(bad_field(&e).as_deref(), Some("state"));
    let e = refuse(
        id.clone(),
        Some(set_state(pb::PresenceState::Away, &"t".repeat(129))),
        erin_token.clone(),
    )
    .await;
    assert_eq!(bad_field(&e).as_deref(), Some("custom_text"));
    let e = refuse(
        "x".repeat(5000),
        Some(set_state(pb::PresenceState::Away, "")),
        erin_token.clone(),
    )
    .await;
    assert_eq!(bad_field(&e).as_deref(), Some("session_id"));
    for (sid, token) in [
        (uuid::Uuid::now_v7().to_string(), erin_token.clone()),
        // Someone else's token with Erin's session id: not theirs to steer.
        (id.clone(), other_token.clone()),
    ] {
        let e = refuse(sid, Some(set_state(pb::PresenceState::Away, "")), token).await;
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert_eq!(reason_of(&e).as_deref(), Some("SESSION_NOT_FOUND"));
    }
    let e = PresenceServiceClient::new(b.channel())
        .session(authed(
            pb::SessionRequest {
                state: Some(pb::SetState {
                    device_name: "d".repeat(65),
                    ..Default::default()
                }),
            },
            &erin_token,
        ))
        .await
        .expect_err("bad session request");
    assert_eq!(bad_field(&e).as_deref(), Some("device_name"));
    // Nothing changed for the watcher through all of that.
    assert_eq!(
        collect(&mut w, Some(&erin), MS500).await,
        Vec::<pb::UserPresence>::new()
    );

    // EndSession from the other instance is the goodbye: the stream ends without an
    // error and the device is offline well before the grace would have let it go.
    let ended_at = tokio::time::Instant::now();
    on_a.end_session(authed(
        pb::EndSessionRequest {
            session_id: id.clone(),
        },
        &erin_token,
    ))
    .await
    .expect("end");
    let end = tokio::time::timeout(SECOND * 5, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                other => return other.map(|_| ()),
            }
        }
    })
    .await
    .expect("the stream ends");
    assert!(end.is_ok(), "ended with {end:?}");
    until_state(&mut w, &erin, pb::PresenceState::Offline, Some(0), grace).await;
    assert!(ended_at.elapsed() < grace, "{:?}", ended_at.elapsed());
    let e = on_a
        .end_session(authed(
            pb::EndSessionRequest { session_id: id },
            &erin_token,
        ))
        .await
        .expect_err("ended already");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // A Session stream that breaks (the page goes away) lingers for the grace.
    let proxy = Proxy::start(b.addr).await.expect("proxy");
    let (_, _lost) = session(
        proxy.channel(),
        &erin_token,
        set_state(pb::PresenceState::Available, ""),
    )
    .await
    .expect("session");
    until_state(
        &mut w,
        &erin,
        pb::PresenceState::Available,
        Some(1),
        SECOND * 5,
    )
    .await;
    let broke_at = tokio::time::Instant::now();
    proxy.cut();
    until_state(
        &mut w,
        &erin,
        pb::PresenceState::Offline,
        Some(0),
        grace + SECOND * 5,
    )
    .await;
    assert!(
        broke_at.elapsed() >= grace - Duration::from_millis(100),
        "offline after {:?}, before the grace of {grace:?}",
        broke_at.elapsed()
    );
}
