//! Hardening: what an attacker with a generated client (or a raw HTTP/2 one) or a broken
//! client can send, answered with a precise status and bounded work, on real services
//! over real gRPC and a real Redis. One test per defect of issue 12; each failed before
//! its fix.

use std::time::Duration;

use prost::Message as _;
use switchboard_common::status::reason_of;
use switchboard_proto::auth::v1 as auth_pb;
use switchboard_proto::messaging::v1 as pb;
use switchboard_proto::messaging::v1::connect_request::Frame as In;
use switchboard_proto::messaging::v1::connect_response::Frame as Out;
use switchboard_proto::presence::v1 as presence_pb;
use switchboard_proto::presence::v1::presence_service_client::PresenceServiceClient;
use switchboard_tests::auth::{Person, authed, login, person, register};
use switchboard_tests::bad_field;
use switchboard_tests::instance::{
    AuthOptions, InProcess, MessagingOptions, auth_client, messaging_client, spawn_auth,
    spawn_messaging,
};
use switchboard_tests::messaging::{Connection, create_group, send};
use switchboard_tests::raw::{RawCall, frame};
use switchboard_tests::redis::RedisServer;
use switchboard_tests::stack::{Stack, StackOptions};
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic_types::StatusExt;

const LIMIT: Duration = Duration::from_secs(10);

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

async fn customer(auth: &InProcess, name: &str) -> Person {
    person(&auth_client(auth), name, auth_pb::Role::Customer, None)
        .await
        .unwrap_or_else(|e| panic!("person {name}: {e}"))
}

/// Asserts `status` is `code` with ErrorInfo reason `reason`.
#[track_caller]
fn assert_refused(status: &tonic::Status, code: Code, reason: &str) {
    assert_eq!(
        (status.code(), reason_of(status).as_deref()),
        (code, Some(reason)),
        "{status:?}"
    );
}

/// Auth and one messaging instance on one Redis.
async fn messaging_stack() -> Stack {
    Stack::start(StackOptions {
        messaging: 1,
        ..Default::default()
    })
    .await
}

/// Auth, messaging and presence, one instance each, on one Redis.
async fn all_services() -> Stack {
    Stack::start(StackOptions {
        presence: 1,
        presence_timing: (
            Duration::from_secs(30),
            Duration::from_secs(1),
            Duration::ZERO,
        ),
        messaging: 1,
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn member_lists_are_sized_before_any_work_and_must_name_users() {
    let stack = messaging_stack().await;
    let (auth, m) = (&stack.auth[0], &stack.messaging[0]);
    let owner = customer(auth, "h1owner").await;
    let other = customer(auth, "h1other").await;
    let mut c = messaging_client(m);
    let group = |member_ids: Vec<String>| pb::CreateConversationRequest {
        kind: pb::ConversationKind::Group as i32,
        title: "team".into(),
        member_ids,
    };

    // 10,000 copies of one real user would dedupe to two members: the raw count (over the
    // default group size of 10,000 with the owner) is refused before any de-duplication.
    let e = c
        .create_conversation(authed(group(vec![other.id.clone(); 10_000]), &owner.token))
        .await
        .expect_err("10000 ids accepted");
    assert_refused(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(bad_field(&e).as_deref(), Some("member_ids"));
    assert!(e.message().contains("10000"), "{}", e.message());
    // 20k distinct ids (800 KB): refused by their count, not checked one by one.
    let many: Vec<String> = (0..20_000).map(|_| new_id()).collect();
    let e = c
        .create_conversation(authed(group(many.clone()), &owner.token))
        .await
        .expect_err("20k ids accepted");
    assert_refused(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert!(e.message().contains("20000"), "{}", e.message());

    // Ids that name nobody: NOT_FOUND naming the first unknown one by its place.
    let ghost = new_id();
    let e = c
        .create_conversation(authed(
            group(vec![other.id.clone(), ghost.clone()]),
            &owner.token,
        ))
        .await
        .expect_err("unknown member accepted");
    assert_refused(&e, Code::NotFound, "USER_NOT_FOUND");
    assert!(e.message().contains(&ghost), "{}", e.message());
    assert_eq!(bad_field(&e).as_deref(), Some("member_ids[1]"));
    let direct = pb::CreateConversationRequest {
        kind: pb::ConversationKind::Direct as i32,
        title: String::new(),
        member_ids: vec![ghost.clone()],
    };
    let e = c
        .create_conversation(authed(direct, &owner.token))
        .await
        .expect_err("direct chat with nobody");
    assert_refused(&e, Code::NotFound, "USER_NOT_FOUND");
    // A crafted id is not an id at all.
    let e = c
        .create_conversation(authed(group(vec!["x}:meta".into()]), &owner.token))
        .await
        .expect_err("crafted id accepted");
    assert_refused(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(bad_field(&e).as_deref(), Some("member_ids[0]"));

    // AddMembers: the same three rules.
    let team = create_group(
        &mut c,
        &owner.token,
        "team",
        std::slice::from_ref(&other.id),
    )
    .await
    .expect("group of real users");
    let add = |user_ids: Vec<String>| pb::AddMembersRequest {
        conversation_id: team.id.clone(),
        user_ids,
    };
    let e = c
        .add_members(authed(add(vec![other.id.clone(); 10_001]), &owner.token))
        .await
        .expect_err("10001 ids accepted");
    assert_refused(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
    let e = c
        .add_members(authed(add(vec![ghost.clone()]), &owner.token))
        .await
        .expect_err("unknown user added");
    assert_refused(&e, Code::NotFound, "USER_NOT_FOUND");
    let after = c
        .get_conversation(authed(
            pb::GetConversationRequest {
                conversation_id: team.id.clone(),
            },
            &owner.token,
        ))
        .await
        .expect("get")
        .into_inner()
        .conversation
        .expect("conversation");
    assert_eq!(after.member_ids.len(), 2, "nothing was stored");
}

#[tokio::test]
async fn the_first_admin_is_never_an_account_someone_else_registered() {
    let redis = RedisServer::spawn().expect("redis");
    // Before the operator configures the first admin, someone registers its name.
    let early = spawn_auth(Some(&redis), AuthOptions::default())
        .await
        .expect("auth");
    let mut c = auth_client(&early);
    register(&mut c, "boss", "attacker password")
        .await
        .expect("register");
    register(&mut c, "chief", "configured password")
        .await
        .expect("register");
    early.stop().await.expect("stop");

    // Auth with that name and another password refuses to start, saying why.
    let mut refused = spawn_auth(
        Some(&redis),
        AuthOptions {
            admin: Some(("boss".into(), "configured password".into())),
            ..AuthOptions::default()
        },
    )
    .await
    .expect("auth");
    let outcome = refused
        .exited(Duration::from_secs(15))
        .await
        .expect("auth kept running with a taken admin name");
    let error = format!("{:#}", outcome.expect_err("auth exited cleanly"));
    assert!(
        error.contains("AUTH_ADMIN_USERNAME") && error.contains("boss"),
        "{error}"
    );
    // The account stayed a customer.
    let probe = spawn_auth(Some(&redis), AuthOptions::default())
        .await
        .expect("auth");
    let mut c = auth_client(&probe);
    let tokens = login(&mut c, "boss", "attacker password")
        .await
        .expect("login");
    let me = c
        .who_am_i(authed(auth_pb::WhoAmIRequest {}, &tokens.access_token))
        .await
        .expect("whoami")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(me.role, auth_pb::Role::Customer as i32);

    // An account the operator registered with the configured password is promoted.
    let promoted = spawn_auth(
        Some(&redis),
        AuthOptions {
            admin: Some(("chief".into(), "configured password".into())),
            ..AuthOptions::default()
        },
    )
    .await
    .expect("auth");
    // The account existed before, so logins work at once; the role changes shortly after.
    let role = switchboard_tests::eventually(LIMIT, || {
        let mut c = auth_client(&promoted);
        async move {
            let tokens = login(&mut c, "chief", "configured password").await.ok()?;
            let me = c
                .who_am_i(authed(auth_pb::WhoAmIRequest {}, &tokens.access_token))
                .await
                .ok()?
                .into_inner()
                .user?;
            (me.role == auth_pb::Role::Admin as i32).then_some(me.role)
        }
    })
    .await;
    assert_eq!(role, Some(auth_pb::Role::Admin as i32));
}

#[tokio::test]
async fn numbers_from_the_wire_never_overflow() {
    let stack = messaging_stack().await;
    let (auth, m) = (&stack.auth[0], &stack.messaging[0]);
    let owner = customer(auth, "h3owner").await;
    let mut c = messaging_client(m);
    let group = create_group(&mut c, &owner.token, "numbers", &[])
        .await
        .expect("group");
    send(&mut c, &owner.token, &group.id, "k1", "one")
        .await
        .expect("send");

    let e = c
        .list_conversations(authed(
            pb::ListConversationsRequest {
                page_size: 100,
                page_token: (u64::MAX - 20).to_string(),
            },
            &owner.token,
        ))
        .await
        .expect_err("page token far past the end");
    assert_refused(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(bad_field(&e).as_deref(), Some("page_token"));

    let page = c
        .list_messages(authed(
            pb::ListMessagesRequest {
                conversation_id: group.id.clone(),
                after_seq: Some(u64::MAX),
                ..Default::default()
            },
            &owner.token,
        ))
        .await
        .expect("nothing after the largest seq")
        .into_inner();
    assert!(page.messages.is_empty() && !page.has_more, "{page:?}");
    let page = c
        .list_messages(authed(
            pb::ListMessagesRequest {
                conversation_id: group.id.clone(),
                before_seq: Some(0),
                ..Default::default()
            },
            &owner.token,
        ))
        .await
        .expect("nothing before seq 0")
        .into_inner();
    assert!(page.messages.is_empty(), "{page:?}");
    let read = c
        .mark_read(authed(
            pb::MarkReadRequest {
                conversation_id: group.id.clone(),
                seq: u64::MAX,
            },
            &owner.token,
        ))
        .await
        .expect("mark read past the end")
        .into_inner();
    assert_eq!(read.read_seq, 1, "capped at the last seq");

    // A stream subscribing from the largest seq is told to resync, and lives on.
    let mut conn = Connection::open(m.channel(), &owner.token)
        .await
        .expect("connect");
    conn.subscribe(&group.id, u64::MAX).await.expect("send");
    let resync = conn
        .until(LIMIT, |f| match f {
            Out::Resync(r) => Some(r),
            _ => None,
        })
        .await
        .expect("resync frame");
    assert_eq!(resync.oldest_seq, 1);
    conn.send(In::Ping(pb::Ping { nonce: 7 }))
        .await
        .expect("send");
    let pong = conn
        .until(LIMIT, |f| match f {
            Out::Pong(p) => Some(p.nonce),
            _ => None,
        })
        .await
        .expect("the stream still answers");
    assert_eq!(pong, 7);
}

/// Auth and one presence instance (grace as given) on one Redis, and a user.
async fn presence_stack(grace: Duration) -> (Stack, Person) {
    let stack = Stack::start(StackOptions {
        presence: 1,
        presence_timing: (Duration::from_secs(30), Duration::from_millis(200), grace),
        messaging: 0,
        ..Default::default()
    })
    .await;
    let user = customer(&stack.auth[0], "pdevice").await;
    (stack, user)
}

const PRESENCE_CONNECT: &str = "/switchboard.presence.v1.PresenceService/Connect";

/// A SetState frame whose custom text is `bytes` long.
fn set_state(bytes: usize) -> presence_pb::ConnectRequest {
    presence_pb::ConnectRequest {
        frame: Some(presence_pb::connect_request::Frame::SetState(
            presence_pb::SetState {
                state: presence_pb::PresenceState::Away as i32,
                custom_text: "a".repeat(bytes),
                device_name: String::new(),
            },
        )),
    }
}

#[tokio::test]
async fn presence_connect_ends_with_the_precise_status_for_bad_frames() {
    let (stack, user) = presence_stack(Duration::from_secs(5)).await;
    let p = &stack.presence[0];

    // Oversize, plain and as a gzip bomb (a few KB that inflate past the limit).
    for encoding in [None, Some(CompressionEncoding::Gzip)] {
        let mut client = PresenceServiceClient::new(p.channel());
        if let Some(e) = encoding {
            client = client.send_compressed(e);
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut stream = client
            .connect(authed(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                &user.token,
            ))
            .await
            .expect("connect")
            .into_inner();
        tx.send(set_state(3 * 1024 * 1024)).await.expect("send");
        let status = switchboard_tests::ended(&mut stream, LIMIT).await;
        assert_refused(&status, Code::ResourceExhausted, "REQUEST_TOO_LARGE");
    }

    // Bytes that are no ConnectRequest, and a compression flag that does not exist.
    let undecodable = frame(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f], false);
    let mut bad_flag = frame(&set_state(3).encode_to_vec(), false).to_vec();
    bad_flag[0] = 7;
    for bytes in [undecodable, bytes::Bytes::from(bad_flag)] {
        let mut call = RawCall::open(p.addr, PRESENCE_CONNECT, Some(&user.token), None)
            .await
            .expect("raw call");
        call.message(LIMIT)
            .await
            .expect("connected")
            .expect("frame");
        call.send(bytes, false).expect("send");
        let status = call.status(LIMIT).await.expect("status");
        assert_refused(&status, Code::InvalidArgument, "MALFORMED_REQUEST");
    }
}

/// Whether `user` is online with `sessions` device sessions, asked on `p`.
async fn sessions(p: &InProcess, viewer: &Person, user: &str) -> u32 {
    let got = PresenceServiceClient::new(p.channel())
        .get(authed(
            presence_pb::GetRequest {
                user_ids: vec![user.to_owned()],
            },
            &viewer.token,
        ))
        .await
        .expect("get")
        .into_inner()
        .presences;
    got.first().map(|p| p.session_count).unwrap_or(0)
}

#[tokio::test]
async fn a_cancelled_presence_call_lingers_for_the_grace_and_a_half_close_does_not() {
    let grace = Duration::from_secs(4);
    let (stack, viewer) = presence_stack(grace).await;
    let (auth, p) = (&stack.auth[0], &stack.presence[0]);

    // RST_STREAM(CANCEL) with the request stream still open: the client is gone without a
    // goodbye, so the device lingers. Several times, since the old behaviour was a race.
    let mut cancelled = Vec::new();
    for i in 0..5 {
        let device = customer(auth, &format!("canceller{i}")).await;
        let mut call = RawCall::open(p.addr, PRESENCE_CONNECT, Some(&device.token), None)
            .await
            .expect("raw call");
        call.message(LIMIT)
            .await
            .expect("connected")
            .expect("frame");
        assert_eq!(sessions(p, &viewer, &device.id).await, 1);
        call.cancel();
        let cancelled_at = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            sessions(p, &viewer, &device.id).await,
            1,
            "cancel {i} went offline at once instead of lingering for the grace"
        );
        cancelled.push((device, cancelled_at));
    }
    // ... and goes offline once the grace is over.
    let (first, at) = &cancelled[0];
    let offline = switchboard_tests::eventually(grace + LIMIT, || async {
        (sessions(p, &viewer, &first.id).await == 0).then_some(())
    })
    .await;
    assert!(offline.is_some(), "the cancelled device never went offline");
    assert!(at.elapsed() >= grace - Duration::from_millis(200));

    // A half-close is a goodbye: offline at once, long before the grace.
    let device = customer(auth, "halfcloser").await;
    let mut call = RawCall::open(p.addr, PRESENCE_CONNECT, Some(&device.token), None)
        .await
        .expect("raw call");
    call.message(LIMIT)
        .await
        .expect("connected")
        .expect("frame");
    call.send(bytes::Bytes::new(), true).expect("half-close");
    let status = call.status(LIMIT).await.expect("status");
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    assert_eq!(sessions(p, &viewer, &device.id).await, 0);
}

#[tokio::test]
async fn undecodable_requests_are_invalid_argument_on_every_service() {
    let stack = all_services().await;
    let (auth, m, p) = (&stack.auth[0], &stack.messaging[0], &stack.presence[0]);
    let user = customer(auth, "rawcaller").await;
    // Field 1, length-delimited, with a length far past the end.
    let garbage = frame(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f], false);
    for (addr, path) in [
        (auth.addr, "/switchboard.auth.v1.AuthService/Login"),
        (auth.addr, "/switchboard.auth.v1.AuthService/WhoAmI"),
        (
            m.addr,
            "/switchboard.messaging.v1.MessagingService/GetConversation",
        ),
        (m.addr, "/switchboard.messaging.v1.SupportService/ListQueue"),
        (p.addr, "/switchboard.presence.v1.PresenceService/Get"),
        (p.addr, "/switchboard.presence.v1.PresenceService/Watch"),
    ] {
        let mut call = RawCall::open(addr, path, Some(&user.token), None)
            .await
            .expect("raw call");
        call.send(garbage.clone(), true).expect("send");
        let status = call.status(LIMIT).await.expect("status");
        assert_refused(&status, Code::InvalidArgument, "MALFORMED_REQUEST");
        assert!(
            status.message().contains("does not decode"),
            "{path}: {status:?}"
        );
    }
    // The messaging stream: ended with the same status.
    let mut call = RawCall::open(
        m.addr,
        "/switchboard.messaging.v1.MessagingService/Connect",
        Some(&user.token),
        None,
    )
    .await
    .expect("raw call");
    call.send(garbage, false).expect("send");
    let status = call.status(LIMIT).await.expect("status");
    assert_refused(&status, Code::InvalidArgument, "MALFORMED_REQUEST");
}

#[tokio::test]
async fn a_failed_key_fetch_keeps_answering_unavailable() {
    let stack = Stack::start(StackOptions {
        messaging: 0,
        ..Default::default()
    })
    .await;
    let user = customer(&stack.auth[0], "outage").await;
    // This messaging instance can never reach auth for keys: an outage.
    let dead = std::net::SocketAddr::from((
        [127, 0, 0, 1],
        switchboard_tests::free_port().expect("port"),
    ));
    let m = spawn_messaging(Some(stack.redis.one()), dead, MessagingOptions::default())
        .await
        .expect("messaging");
    let mut c = messaging_client(&m);
    // The second call lands within the refetch interval of the first, failed fetch.
    for attempt in 0..3 {
        let e = c
            .list_conversations(authed(pb::ListConversationsRequest::default(), &user.token))
            .await
            .expect_err("served without keys");
        assert_refused(&e, Code::Unavailable, "AUTH_UNAVAILABLE");
        assert!(
            e.get_details_retry_info().is_some(),
            "attempt {attempt}: {e:?}"
        );
    }
}

#[tokio::test]
async fn two_authorization_headers_are_refused() {
    let stack = messaging_stack().await;
    let (auth, m) = (&stack.auth[0], &stack.messaging[0]);
    let user = customer(auth, "twoheads").await;
    let mut req = authed(pb::ListConversationsRequest::default(), &user.token);
    req.metadata_mut().append(
        "authorization",
        "Bearer forged".parse().expect("ascii value"),
    );
    let e = messaging_client(m)
        .list_conversations(req)
        .await
        .expect_err("two headers accepted");
    assert_refused(&e, Code::Unauthenticated, "UNAUTHENTICATED");
    assert!(
        e.message().contains("exactly one authorization header"),
        "{e:?}"
    );
    // The same on auth itself.
    let mut req = authed(auth_pb::WhoAmIRequest {}, &user.token);
    req.metadata_mut().append(
        "authorization",
        format!("Bearer {}", user.token).parse().expect("ascii"),
    );
    let e = auth_client(auth)
        .who_am_i(req)
        .await
        .expect_err("two headers accepted");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
}

#[tokio::test]
async fn huge_and_crafted_ids_are_refused_with_a_short_message() {
    let stack = all_services().await;
    let (auth, m, p) = (&stack.auth[0], &stack.messaging[0], &stack.presence[0]);
    let user = customer(auth, "idcrafter").await;
    let huge = "x".repeat(20 * 1024);
    let mut c = messaging_client(m);
    let check = |e: tonic::Status, field: &str| {
        assert_refused(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
        assert!(e.message().len() < 300, "{} bytes", e.message().len());
        assert_eq!(bad_field(&e).as_deref(), Some(field));
    };
    for id in [
        huge.as_str(),
        "x}:meta",
        "{0190d6a2-8c5e-7d3a-9f41-6b2e8a1c0d57}",
    ] {
        let e = c
            .get_conversation(authed(
                pb::GetConversationRequest {
                    conversation_id: id.into(),
                },
                &user.token,
            ))
            .await
            .expect_err("crafted id");
        check(e, "conversation_id");
        let e = send(&mut c, &user.token, id, "k", "hi")
            .await
            .expect_err("crafted id");
        check(e, "conversation_id");
        let e = PresenceServiceClient::new(p.channel())
            .get(authed(
                presence_pb::GetRequest {
                    user_ids: vec![user.id.clone(), id.into()],
                },
                &user.token,
            ))
            .await
            .expect_err("crafted id");
        check(e, "user_ids[1]");
        let e = auth_client(auth)
            .get_users(authed(
                auth_pb::GetUsersRequest {
                    user_ids: vec![id.into()],
                    ..Default::default()
                },
                &user.token,
            ))
            .await
            .expect_err("crafted id");
        check(e, "user_ids[0]");
    }
    // On the stream the refused frame does not echo the crafted id.
    let mut conn = Connection::open(m.channel(), &user.token)
        .await
        .expect("connect");
    conn.subscribe(&huge, 0).await.expect("send");
    let err = conn
        .until(LIMIT, |f| match f {
            Out::Error(e) => Some(e),
            _ => None,
        })
        .await
        .expect("error frame");
    assert_eq!(
        (err.code, err.reason.as_str(), err.conversation_id.as_str()),
        (Code::InvalidArgument as i32, "INVALID_ARGUMENT", "")
    );
    assert!(err.message.len() < 300);
}

#[tokio::test]
async fn idempotency_keys_have_a_charset_and_never_reach_redis_raw() {
    let stack = messaging_stack().await;
    let (auth, m) = (&stack.auth[0], &stack.messaging[0]);
    let owner = customer(auth, "keyowner").await;
    let mut c = messaging_client(m);
    let group = create_group(&mut c, &owner.token, "keys", &[])
        .await
        .expect("group");
    for key in ["k}:meta", "a b", "k:1", "ключ", &"k".repeat(65)] {
        let e = send(&mut c, &owner.token, &group.id, key, "hi")
            .await
            .expect_err("bad key accepted");
        assert_refused(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
        assert_eq!(bad_field(&e).as_deref(), Some("client_msg_id"), "{key}");
    }
    // On the stream too.
    let mut conn = Connection::open(m.channel(), &owner.token)
        .await
        .expect("connect");
    conn.send(In::Send(pb::Send {
        conversation_id: group.id.clone(),
        client_msg_id: "k}:meta".into(),
        body: "hi".into(),
        metadata: Default::default(),
    }))
    .await
    .expect("send");
    let result = conn
        .until(LIMIT, |f| match f {
            Out::SendResult(r) => Some(r),
            _ => None,
        })
        .await
        .expect("send result");
    match result.result {
        Some(pb::send_result::Result::Error(e)) => {
            assert_eq!(
                (e.code, e.reason.as_str()),
                (Code::InvalidArgument as i32, "INVALID_ARGUMENT")
            )
        }
        other => panic!("crafted key accepted: {other:?}"),
    }
    // Keys of the documented charset work, and the conversation is intact.
    for key in ["0190d6a2-8c5e-7d3a-9f41-6b2e8a1c0d57", "A.b_c~d-1"] {
        send(&mut c, &owner.token, &group.id, key, "fine")
            .await
            .expect("good key");
    }
    let listed = c
        .list_messages(authed(
            pb::ListMessagesRequest {
                conversation_id: group.id.clone(),
                ..Default::default()
            },
            &owner.token,
        ))
        .await
        .expect("history")
        .into_inner();
    assert_eq!(listed.messages.len(), 2);
}

#[tokio::test]
async fn refusals_carry_reasons_and_retry_info() {
    let stack = Stack::start(StackOptions {
        messaging: 1,
        messaging_options: MessagingOptions {
            send_rate: 1.0,
            send_burst: 1.0,
            ..MessagingOptions::default()
        },
        ..Default::default()
    })
    .await;
    let (auth, m) = (&stack.auth[0], &stack.messaging[0]);
    let owner = customer(auth, "reasons").await;
    let outsider = customer(auth, "outsider").await;
    let mut c = messaging_client(m);
    let group = create_group(&mut c, &owner.token, "reasons", &[])
        .await
        .expect("group");
    send(&mut c, &owner.token, &group.id, "r1", "one")
        .await
        .expect("first send");
    let e = send(&mut c, &owner.token, &group.id, "r2", "two")
        .await
        .expect_err("over the rate");
    assert_refused(&e, Code::ResourceExhausted, "RATE_LIMITED");
    let delay = e
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("retry info");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(1),
        "{delay:?}"
    );
    assert!(
        e.metadata().get("retry-after-ms").is_some(),
        "retry-after-ms is kept for older clients"
    );
    let e = send(&mut c, &outsider.token, &group.id, "r3", "three")
        .await
        .expect_err("outsider");
    assert_refused(&e, Code::PermissionDenied, "NOT_A_MEMBER");
    let e = c
        .get_conversation(authed(
            pb::GetConversationRequest {
                conversation_id: new_id(),
            },
            &owner.token,
        ))
        .await
        .expect_err("unknown conversation");
    assert_refused(&e, Code::NotFound, "CONVERSATION_NOT_FOUND");
    let e = messaging_client(m)
        .list_conversations(pb::ListConversationsRequest::default())
        .await
        .expect_err("no token");
    assert_refused(&e, Code::Unauthenticated, "UNAUTHENTICATED");
    let e = auth_client(auth)
        .login(auth_pb::LoginRequest {
            username: "reasons".into(),
            password: "wrong password".into(),
        })
        .await
        .expect_err("wrong password");
    assert_refused(&e, Code::Unauthenticated, "BAD_CREDENTIALS");
    let e = auth_client(auth)
        .register(auth_pb::RegisterRequest {
            username: "reasons".into(),
            password: "right password".into(),
            display_name: String::new(),
        })
        .await
        .expect_err("taken");
    assert_refused(&e, Code::AlreadyExists, "USERNAME_TAKEN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_over_the_concurrency_limit_are_shed_never_queued() {
    use switchboard_common::config::ServerLimits;
    // One call at a time, and logins that really hash (tens of ms each).
    let auth = spawn_auth(
        None,
        AuthOptions {
            cheap_hashing: false,
            limits: ServerLimits {
                max_concurrent_requests: Some(1),
                ..ServerLimits::default()
            },
            ..AuthOptions::default()
        },
    )
    .await
    .expect("auth");
    let mut c = auth_client(&auth);
    register(&mut c, "shedme", "right password")
        .await
        .expect("register");
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut c = auth_client(&auth);
        calls.spawn(async move { login(&mut c, "shedme", "right password").await });
    }
    let (mut served, mut shed) = (0, 0);
    while let Some(done) = tokio::time::timeout(LIMIT, calls.join_next())
        .await
        .expect("every call answered")
    {
        match done.expect("task") {
            Ok(_) => served += 1,
            Err(e) => {
                assert_refused(&e, Code::ResourceExhausted, "OVERLOADED");
                assert!(e.get_details_retry_info().is_some(), "{e:?}");
                shed += 1;
            }
        }
    }
    assert!(served >= 1 && shed >= 1, "served {served}, shed {shed}");
    // Health answers whatever the load.
    let mut health = tonic_health::pb::health_client::HealthClient::new(auth.channel());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health is never shed");
}

#[tokio::test]
async fn unary_calls_end_at_the_server_time_limit() {
    use switchboard_common::config::ServerLimits;
    let auth = spawn_auth(
        None,
        AuthOptions {
            cheap_hashing: false,
            limits: ServerLimits {
                unary_timeout: Some(Duration::from_millis(2)),
                ..ServerLimits::default()
            },
            ..AuthOptions::default()
        },
    )
    .await
    .expect("auth");
    // Hashing a password with production cost takes far longer than 2 ms.
    let e = register(&mut auth_client(&auth), "slowpoke", "right password")
        .await
        .expect_err("ran past the limit");
    assert_refused(&e, Code::DeadlineExceeded, "TIMEOUT");
    assert!(e.message().contains("UNARY_TIMEOUT_MS"), "{e:?}");
}

#[tokio::test]
async fn a_connection_that_never_sends_the_preface_is_closed() {
    use switchboard_common::config::ServerLimits;
    use tokio::io::AsyncReadExt;
    let auth = spawn_auth(
        None,
        AuthOptions {
            limits: ServerLimits {
                handshake_timeout: Some(Duration::from_millis(300)),
                ..ServerLimits::default()
            },
            ..AuthOptions::default()
        },
    )
    .await
    .expect("auth");
    // Silent, and one byte short of the preface: both are closed.
    for sent in [&b""[..], &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r"[..]] {
        let mut socket = tokio::net::TcpStream::connect(auth.addr)
            .await
            .expect("connect");
        tokio::io::AsyncWriteExt::write_all(&mut socket, sent)
            .await
            .expect("write");
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(LIMIT, async {
            loop {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "an idle connection ({} bytes) was kept open",
            sent.len()
        );
    }
    // A real client is served.
    auth_client(&auth)
        .get_jwks(auth_pb::GetJwksRequest {})
        .await
        .expect("served");
}

#[tokio::test]
async fn each_connection_is_told_how_many_streams_it_may_open() {
    use switchboard_common::config::ServerLimits;
    let default = spawn_auth(None, AuthOptions::default())
        .await
        .expect("auth");
    let announced = switchboard_tests::raw::announced_max_streams(default.addr, LIMIT)
        .await
        .expect("settings");
    assert_eq!(announced, 1000, "the default MAX_STREAMS_PER_CONNECTION");
    let tight = spawn_auth(
        None,
        AuthOptions {
            limits: ServerLimits {
                max_streams_per_connection: 3,
                ..ServerLimits::default()
            },
            ..AuthOptions::default()
        },
    )
    .await
    .expect("auth");
    let announced = switchboard_tests::raw::announced_max_streams(tight.addr, LIMIT)
        .await
        .expect("settings");
    assert_eq!(announced, 3);
}

#[tokio::test]
async fn streams_per_user_are_capped_on_each_instance() {
    let stack = Stack::start(StackOptions {
        messaging: 2,
        messaging_options: MessagingOptions {
            max_streams_per_user: Some(2),
            ..MessagingOptions::default()
        },
        ..Default::default()
    })
    .await;
    let (auth, a, b) = (&stack.auth[0], &stack.messaging[0], &stack.messaging[1]);
    let user = customer(auth, "manytabs").await;
    let first = Connection::open(a.channel(), &user.token)
        .await
        .expect("first");
    let _second = Connection::open(a.channel(), &user.token)
        .await
        .expect("second");
    let e = match Connection::open(a.channel(), &user.token).await {
        Ok(_) => panic!("a third stream was opened"),
        Err(e) => e.downcast::<tonic::Status>().expect("a status"),
    };
    assert_refused(&e, Code::ResourceExhausted, "TOO_MANY_STREAMS");
    // The cap is per instance, and a closed stream frees its place.
    Connection::open(b.channel(), &user.token)
        .await
        .expect("another instance");
    drop(first);
    let reopened = switchboard_tests::eventually(LIMIT, || async {
        Connection::open(a.channel(), &user.token).await.ok()
    })
    .await;
    assert!(
        reopened.is_some(),
        "the closed stream's place was never freed"
    );

    // Presence: device and watch streams together.
    let p = switchboard_tests::instance::spawn_presence_with(
        Some(stack.redis.one()),
        auth.addr,
        Duration::from_secs(30),
        Duration::from_secs(1),
        Duration::ZERO,
        |c| c.max_streams_per_user = Some(2),
    )
    .await
    .expect("presence");
    let _device = switchboard_tests::presence::connect(p.channel(), &user.token).await;
    let _watch = PresenceServiceClient::new(p.channel())
        .watch(authed(
            presence_pb::WatchRequest {
                user_ids: vec![user.id.clone()],
                role: 0,
            },
            &user.token,
        ))
        .await
        .expect("watch");
    let e = PresenceServiceClient::new(p.channel())
        .watch(authed(
            presence_pb::WatchRequest {
                user_ids: vec![user.id.clone()],
                role: 0,
            },
            &user.token,
        ))
        .await
        .expect_err("a third presence stream");
    assert_refused(&e, Code::ResourceExhausted, "TOO_MANY_STREAMS");
}

#[tokio::test]
async fn registrations_per_address_are_limited_across_instances() {
    let stack = Stack::start(StackOptions {
        auth: AuthOptions {
            registrations_per_peer: 3,
            ..AuthOptions::default()
        },
        auth_instances: 2,
        messaging: 0,
        ..Default::default()
    })
    .await;
    let (a, b) = (&stack.auth[0], &stack.auth[1]);
    register(&mut auth_client(a), "signup1", "right password")
        .await
        .expect("first");
    register(&mut auth_client(b), "signup2", "right password")
        .await
        .expect("second, on the other instance");
    register(&mut auth_client(a), "signup3", "right password")
        .await
        .expect("third");
    let e = register(&mut auth_client(b), "signup4", "right password")
        .await
        .expect_err("fourth from the same address");
    assert_refused(&e, Code::ResourceExhausted, "RATE_LIMITED");
    let delay = e
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("retry info");
    assert!(delay > Duration::from_secs(60), "{delay:?}");
}

/// One client frame of the property test below, from a small vocabulary that mixes good
/// and bad values.
fn frames(group: String, token: String) -> impl proptest::strategy::Strategy<Value = Vec<In>> {
    use proptest::prelude::*;
    let id = prop_oneof![
        Just(group),
        Just(String::new()),
        Just(new_id()),
        "[a-z{}:]{1,40}",
    ];
    let frame = prop_oneof![
        any::<u64>().prop_map(|nonce| In::Ping(pb::Ping { nonce })),
        (id.clone(), any::<u64>(), any::<bool>(), ".{0,40}").prop_map(
            |(conversation_id, since_seq, all_conversations, epoch)| {
                In::Subscribe(pb::Subscribe {
                    conversation_id,
                    since_seq,
                    all_conversations,
                    positions: Default::default(),
                    epoch,
                })
            }
        ),
        id.clone()
            .prop_map(|conversation_id| In::Unsubscribe(pb::Unsubscribe { conversation_id })),
        (id.clone(), "[A-Za-z0-9}:~ -]{0,70}", "(?s).{0,40}").prop_map(
            |(conversation_id, client_msg_id, body)| {
                In::Send(pb::Send {
                    conversation_id,
                    client_msg_id,
                    body,
                    metadata: Default::default(),
                })
            }
        ),
        id.clone()
            .prop_map(|conversation_id| In::Typing(pb::Typing { conversation_id })),
        (id, any::<u64>()).prop_map(|(conversation_id, seq)| In::Read(pb::Read {
            conversation_id,
            seq
        })),
        prop_oneof![Just(token), ".{0,60}"]
            .prop_map(|access_token| In::RefreshToken(pb::RefreshToken { access_token })),
    ];
    proptest::collection::vec(frame, 1..12)
}

#[test]
fn connect_frames_in_any_order_never_break_the_stream_or_answer_internal() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (auth, m, user, group) = rt.block_on(async {
        let auth = spawn_auth(None, AuthOptions::default())
            .await
            .expect("auth");
        let m = spawn_messaging(None, auth.addr, MessagingOptions::default())
            .await
            .expect("messaging");
        let user = customer(&auth, "fuzzer").await;
        let group = create_group(&mut messaging_client(&m), &user.token, "fuzz", &[])
            .await
            .expect("group");
        (auth, m, user, group)
    });
    let config = proptest::test_runner::Config {
        cases: 32,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&frames(group.id.clone(), user.token.clone()), |sequence| {
        rt.block_on(async {
            let mut conn = Connection::open(m.channel(), &user.token)
                .await
                .expect("connect");
            for f in sequence {
                conn.send(f).await.expect("send");
            }
            // A last ping: its pong proves the stream lived through every frame.
            conn.send(In::Ping(pb::Ping { nonce: u64::MAX }))
                .await
                .expect("send");
            loop {
                match conn.next(LIMIT).await {
                    Ok(Some(Out::Pong(p))) if p.nonce == u64::MAX => return Ok(()),
                    Ok(Some(Out::Error(e))) => {
                        proptest::prop_assert!(
                            ![Code::Unknown as i32, Code::Internal as i32].contains(&e.code)
                                && !e.reason.is_empty(),
                            "frame error {e:?}"
                        );
                    }
                    Ok(Some(Out::SendResult(pb::SendResult {
                        result: Some(pb::send_result::Result::Error(e)),
                        ..
                    }))) => {
                        proptest::prop_assert!(
                            ![Code::Unknown as i32, Code::Internal as i32].contains(&e.code),
                            "send error {e:?}"
                        );
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => proptest::prop_assert!(false, "stream ended without a status"),
                    Err(status) => proptest::prop_assert!(false, "stream ended: {status:?}"),
                }
            }
        })
    });
    drop((auth, m));
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[tokio::test]
async fn a_presence_outage_seen_by_the_desk_says_presence_unavailable() {
    use switchboard_proto::messaging::v1::support_service_client::SupportServiceClient;
    // No presence instance: the desk's presence is a closed port.
    let stack = switchboard_tests::stack::Stack::start(switchboard_tests::stack::StackOptions {
        auth: AuthOptions {
            admin: Some(("deskadmin".into(), "admin password".into())),
            ..AuthOptions::default()
        },
        messaging: 1,
        ..Default::default()
    })
    .await;
    let agent = stack.person("deskagent1", auth_pb::Role::Agent).await;
    let other = stack.person("deskagent2", auth_pb::Role::Agent).await;
    let buyer = stack.person("deskbuyer", auth_pb::Role::Customer).await;
    let mut desk: SupportServiceClient<_> = stack.support(0);
    let opened = desk
        .open_consultation(authed(
            pb::OpenConsultationRequest {
                topic: "refund".into(),
                first_message: "hello".into(),
            },
            &buyer.token,
        ))
        .await
        .expect("opens even while presence is down (it waits in the queue)")
        .into_inner()
        .consultation
        .expect("consultation");
    desk.accept_consultation(authed(
        pb::AcceptConsultationRequest {
            consultation_id: opened.id.clone(),
        },
        &agent.token,
    ))
    .await
    .expect("accept");
    let e = desk
        .transfer_consultation(authed(
            pb::TransferConsultationRequest {
                consultation_id: opened.id.clone(),
                to_agent_id: other.id.clone(),
                note: String::new(),
            },
            &agent.token,
        ))
        .await
        .expect_err("transfer without presence");
    assert_refused(&e, Code::Unavailable, "PRESENCE_UNAVAILABLE");
    assert!(e.message().starts_with("presence unavailable"), "{e:?}");
}
