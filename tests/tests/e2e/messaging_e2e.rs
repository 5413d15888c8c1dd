//! Messaging end to end: two messaging instances and auth on one real Redis, real gRPC.

use std::collections::HashMap;
use std::time::Duration;

use switchboard_auth::signing::{Keyring, generate_pem};
use switchboard_common::status::reason_of;
use switchboard_common::token::{Role, now_secs};
use switchboard_proto::auth::v1 as auth_pb;
use switchboard_proto::messaging::v1 as pb;
use switchboard_proto::messaging::v1::connect_request::Frame as In;
use switchboard_proto::messaging::v1::connect_response::Frame as Out;
use switchboard_tests::auth::{authed, register_and_login};
use switchboard_tests::instance::{AuthOptions, MessagingOptions, messaging_client};
use switchboard_tests::messaging::{Connection, create_group, send};
use switchboard_tests::stack::{Stack, StackOptions};
use tonic::Code;

mod subscribe;

/// Two messaging instances (the default [`Stack`]), with auth's signing key known so a
/// test can forge tokens.
struct Cluster {
    stack: Stack,
    key_pem: String,
}

/// A user: id and access token.
#[derive(Clone)]
struct User {
    id: String,
    token: String,
}

impl Cluster {
    async fn start(options: MessagingOptions) -> Self {
        Self::start_on(options, false).await
    }

    /// [`start`](Self::start) on a Redis Cluster with `redis_cluster`.
    async fn start_on(options: MessagingOptions, redis_cluster: bool) -> Self {
        let key_pem = generate_pem().expect("key");
        let stack = Stack::start(StackOptions {
            auth: AuthOptions {
                signing_key_pem: Some(key_pem.clone()),
                ..AuthOptions::default()
            },
            messaging: 2,
            messaging_options: options,
            cluster: redis_cluster,
            ..StackOptions::default()
        })
        .await;
        Self { stack, key_pem }
    }

    async fn users(&self, prefix: &str, n: usize) -> Vec<User> {
        let mut out = Vec::with_capacity(n);
        let mut c = self.stack.accounts(0);
        for i in 0..n {
            let t = register_and_login(&mut c, &format!("{prefix}{i}"))
                .await
                .expect("user");
            let me = c
                .who_am_i(authed(auth_pb::WhoAmIRequest {}, &t.access_token))
                .await
                .expect("whoami");
            out.push(User {
                id: me.into_inner().user.expect("user").id,
                token: t.access_token,
            });
        }
        out
    }

    /// A token for `user` signed with the shared key, expiring at `exp`.
    fn token_expiring(&self, user: &User, session: &str, exp: u64) -> String {
        let keyring = Keyring::from_pem(&self.key_pem, 900).expect("keyring");
        keyring
            .issue(&user.id, Role::Customer, session, exp - 900)
            .expect("issue")
            .0
    }
}

fn ids(users: &[User]) -> Vec<String> {
    users.iter().map(|u| u.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_over_two_instances_each_receive_all_5000_once_in_order() {
    fifty_clients_over_two_instances_each_receive_all_5000_once_in_order_on(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_over_two_instances_each_receive_all_5000_once_in_order_on_a_redis_cluster() {
    fifty_clients_over_two_instances_each_receive_all_5000_once_in_order_on(true).await;
}

async fn fifty_clients_over_two_instances_each_receive_all_5000_once_in_order_on(
    redis_cluster: bool,
) {
    const CLIENTS: usize = 50;
    const EACH: usize = 100;
    // Every client writes its 100 sends at once and the server stores each stream's queued
    // sends in one round trip, so each stream gets the whole 5,000 in a burst before its
    // client starts reading: the queue holds them all here. Cutting off a stream whose
    // queue overflows (and the lossless resume) has its own test below.
    let cluster = Cluster::start_on(
        MessagingOptions {
            outbound_queue: 8192,
            ..MessagingOptions::default()
        },
        redis_cluster,
    )
    .await;
    let users = cluster.users("fan", CLIENTS).await;
    let group = create_group(
        &mut messaging_client(&cluster.stack.messaging[0]),
        &users[0].token,
        "fifty",
        &ids(&users[1..]),
    )
    .await
    .expect("group");

    let mut connections = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let conn = Connection::following(
            cluster.stack.messaging[i % 2].channel(),
            &user.token,
            &group.id,
        )
        .await
        .expect("connect");
        connections.push(conn);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut conn) in connections.into_iter().enumerate() {
        let group_id = group.id.clone();
        tasks.spawn(async move {
            for k in 0..EACH {
                conn.send(In::Send(pb::Send {
                    conversation_id: group_id.clone(),
                    client_msg_id: format!("c{i}-m{k}"),
                    body: format!("hello {k} from {i}"),
                    metadata: HashMap::new(),
                }))
                .await
                .expect("send frame");
            }
            let mut seqs = Vec::with_capacity(CLIENTS * EACH);
            let mut acks = 0;
            while seqs.len() < CLIENTS * EACH || acks < EACH {
                match conn.next(Duration::from_secs(30)).await {
                    Ok(Some(Out::Message(m))) => seqs.push(m.seq),
                    Ok(Some(Out::SendResult(r))) => {
                        assert!(
                            matches!(r.result, Some(pb::send_result::Result::Message(_))),
                            "send refused: {r:?}"
                        );
                        acks += 1;
                    }
                    Ok(Some(_)) => {}
                    other => panic!(
                        "client {i}: stream ended early after {} messages: {other:?}",
                        seqs.len()
                    ),
                }
            }
            (i, seqs)
        });
    }
    let expected: Vec<u64> = (1..=(CLIENTS * EACH) as u64).collect();
    while let Some(result) = tasks.join_next().await {
        let (i, seqs) = result.expect("client task");
        assert_eq!(seqs.len(), expected.len(), "client {i} count");
        assert!(
            seqs == expected,
            "client {i} did not get 1..=5000 exactly once in order"
        );
    }
}

#[tokio::test]
async fn resume_on_the_other_instance_gets_exactly_the_missing_messages_then_live_ones() {
    resume_on_the_other_instance_gets_exactly_the_missing_messages_then_live_ones_on(false).await;
}

#[tokio::test]
async fn resume_on_the_other_instance_gets_exactly_the_missing_messages_then_live_ones_on_a_redis_cluster()
 {
    resume_on_the_other_instance_gets_exactly_the_missing_messages_then_live_ones_on(true).await;
}

async fn resume_on_the_other_instance_gets_exactly_the_missing_messages_then_live_ones_on(
    redis_cluster: bool,
) {
    let cluster = Cluster::start_on(MessagingOptions::default(), redis_cluster).await;
    let users = cluster.users("resume", 2).await;
    let (alice, bob) = (&users[0], &users[1]);
    let mut m1 = messaging_client(&cluster.stack.messaging[1]);
    let group = create_group(
        &mut messaging_client(&cluster.stack.messaging[0]),
        &alice.token,
        "resume",
        std::slice::from_ref(&bob.id),
    )
    .await
    .expect("group");

    let mut first =
        Connection::following(cluster.stack.messaging[0].channel(), &bob.token, &group.id)
            .await
            .expect("connect");
    for k in 0..5 {
        send(
            &mut m1,
            &alice.token,
            &group.id,
            &format!("early{k}"),
            "early",
        )
        .await
        .expect("send");
    }
    let mut last = 0;
    while last < 5 {
        last = first
            .until(Duration::from_secs(5), |f| match f {
                Out::Message(m) => Some(m.seq),
                _ => None,
            })
            .await
            .expect("live message");
    }
    drop(first);

    for k in 0..200 {
        send(
            &mut m1,
            &alice.token,
            &group.id,
            &format!("offline{k}"),
            &format!("offline {k}"),
        )
        .await
        .expect("send");
    }
    let mut again = Connection::open(cluster.stack.messaging[1].channel(), &bob.token)
        .await
        .expect("reconnect elsewhere");
    again.subscribe(&group.id, last).await.expect("subscribe");
    let mut replayed = Vec::new();
    let recovered = loop {
        match again.next(Duration::from_secs(10)).await.expect("frame") {
            Some(Out::Message(m)) => replayed.push(m.seq),
            Some(Out::Recovered(r)) => break r,
            Some(_) => {}
            None => panic!("stream ended"),
        }
    };
    assert_eq!(replayed, (6..=205).collect::<Vec<u64>>());
    assert_eq!((recovered.from_seq, recovered.to_seq), (6, 205));
    for k in 0..3 {
        send(
            &mut messaging_client(&cluster.stack.messaging[0]),
            &alice.token,
            &group.id,
            &format!("late{k}"),
            "late",
        )
        .await
        .expect("send");
    }
    let mut live = Vec::new();
    while live.len() < 3 {
        live.push(
            again
                .until(Duration::from_secs(5), |f| match f {
                    Out::Message(m) => Some(m.seq),
                    _ => None,
                })
                .await
                .expect("live"),
        );
    }
    assert_eq!(live, [206, 207, 208]);
}

#[tokio::test]
async fn a_retry_with_the_same_client_msg_id_returns_the_first_result_and_stores_nothing() {
    let cluster = Cluster::start(MessagingOptions::default()).await;
    let users = cluster.users("idem", 2).await;
    let group = create_group(
        &mut messaging_client(&cluster.stack.messaging[0]),
        &users[0].token,
        "idem",
        &[users[1].id.clone()],
    )
    .await
    .expect("group");
    let first = send(
        &mut messaging_client(&cluster.stack.messaging[0]),
        &users[0].token,
        &group.id,
        "k1",
        "once",
    )
    .await
    .expect("send");
    let retry = send(
        &mut messaging_client(&cluster.stack.messaging[1]),
        &users[0].token,
        &group.id,
        "k1",
        "twice?",
    )
    .await
    .expect("retry");
    assert_eq!(
        (first.seq, &first.id, first.sent_at, &first.body),
        (retry.seq, &retry.id, retry.sent_at, &retry.body),
        "a retry, even with another body, answers what the first send stored"
    );
    // The same key from another sender is another message.
    let other = send(
        &mut messaging_client(&cluster.stack.messaging[1]),
        &users[1].token,
        &group.id,
        "k1",
        "mine",
    )
    .await
    .expect("send");
    assert_eq!(other.seq, 2);
    let history = messaging_client(&cluster.stack.messaging[1])
        .list_messages(authed(
            pb::ListMessagesRequest {
                conversation_id: group.id.clone(),
                ..Default::default()
            },
            &users[0].token,
        ))
        .await
        .expect("history")
        .into_inner();
    assert_eq!(
        history.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [1, 2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_queued_on_one_stream_are_stored_and_answered_in_the_order_sent() {
    let cluster = Cluster::start(MessagingOptions::default()).await;
    let users = cluster.users("pipe", 2).await;
    let group = create_group(
        &mut messaging_client(&cluster.stack.messaging[0]),
        &users[0].token,
        "pipe",
        &[users[1].id.clone()],
    )
    .await
    .expect("group");
    let mut reader = Connection::following(
        cluster.stack.messaging[1].channel(),
        &users[1].token,
        &group.id,
    )
    .await
    .expect("reader");

    // 300 frames written back to back, as a client with many sends in flight does: new
    // sends, a retry of an earlier one, a refused one and a ping among them.
    let mut sender = Connection::open(cluster.stack.messaging[0].channel(), &users[0].token)
        .await
        .expect("sender");
    let send = |key: &str, body: &str| {
        In::Send(pb::Send {
            conversation_id: group.id.clone(),
            client_msg_id: key.into(),
            body: body.into(),
            ..Default::default()
        })
    };
    let mut keys = Vec::new();
    for i in 0..300 {
        let key = match i {
            150 => "m-10".to_owned(),
            200 => String::new(),
            _ => format!("m-{i}"),
        };
        if i == 100 {
            sender
                .send(In::Ping(pb::Ping { nonce: 7 }))
                .await
                .expect("ping");
        }
        sender
            .send(send(&key, &format!("body {i}")))
            .await
            .expect("send");
        keys.push(key);
    }
    let mut results = Vec::new();
    let mut pong_after = None;
    while results.len() < keys.len() {
        match sender.next(Duration::from_secs(10)).await {
            Ok(Some(Out::SendResult(r))) => results.push(r),
            Ok(Some(Out::Pong(p))) => {
                assert_eq!(p.nonce, 7);
                pong_after = Some(results.len());
            }
            Ok(Some(_)) => {}
            other => panic!("sender stream: {other:?}"),
        }
    }
    assert_eq!(
        pong_after,
        Some(100),
        "the ping is answered between sends 99 and 100"
    );
    assert_eq!(
        results
            .iter()
            .map(|r| r.client_msg_id.clone())
            .collect::<Vec<_>>(),
        keys,
        "one answer per send, in the order sent"
    );
    let mut seqs = Vec::new();
    for (i, r) in results.iter().enumerate() {
        match (&r.result, i) {
            (Some(pb::send_result::Result::Error(e)), 200) => {
                assert_eq!(e.code, Code::InvalidArgument as i32, "{e:?}")
            }
            (Some(pb::send_result::Result::Message(m)), 150) => {
                assert_eq!(m.seq, 11, "a retry answers with the first send's seq");
                assert_eq!(m.body, "body 10", "and with what the first send stored");
            }
            (Some(pb::send_result::Result::Message(m)), _) => {
                assert_eq!(m.body, format!("body {i}"));
                seqs.push(m.seq);
            }
            other => panic!("send {i}: {other:?}"),
        }
    }
    assert_eq!(
        seqs,
        (1..=298).collect::<Vec<u64>>(),
        "stored in the order sent"
    );
    // The other instance delivers them in that order too.
    let mut bodies = Vec::new();
    while bodies.len() < 298 {
        match reader.next(Duration::from_secs(10)).await {
            Ok(Some(Out::Message(m))) => bodies.push((m.seq, m.body)),
            Ok(Some(_)) => {}
            other => panic!("reader stream: {other:?}"),
        }
    }
    let expected: Vec<(u64, String)> = (0..300)
        .filter(|i| *i != 150 && *i != 200)
        .enumerate()
        .map(|(n, i)| (n as u64 + 1, format!("body {i}")))
        .collect();
    assert_eq!(bodies, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_group_events_leave_the_member_list_out_and_streams_still_follow_them() {
    let cluster = Cluster::start(MessagingOptions::default()).await;
    // The owner, 101 members (102 in all, over the 100 an event lists) and a newcomer.
    let users = cluster.users("big", 103).await;
    let (owner, first, newcomer) = (&users[0], &users[1], &users[102]);
    let all = || {
        In::Subscribe(pb::Subscribe {
            all_conversations: true,
            ..Default::default()
        })
    };
    let mut member = Connection::open(cluster.stack.messaging[1].channel(), &first.token)
        .await
        .expect("member");
    member.send(all()).await.expect("subscribe");
    let mut joiner = Connection::open(cluster.stack.messaging[0].channel(), &newcomer.token)
        .await
        .expect("newcomer");
    joiner.send(all()).await.expect("subscribe");
    let group = create_group(
        &mut messaging_client(&cluster.stack.messaging[0]),
        &owner.token,
        "big",
        &ids(&users[1..102]),
    )
    .await
    .expect("group");
    assert_eq!(
        group.member_ids.len(),
        102,
        "replies still list every member"
    );
    let event_of = |kind: pb::ConversationEventKind| {
        move |f: Out| match f {
            Out::ConversationEvent(e) if e.kind == kind as i32 => Some(e),
            _ => None,
        }
    };
    let created = member
        .until(
            Duration::from_secs(10),
            event_of(pb::ConversationEventKind::Created),
        )
        .await
        .expect("created");
    let c = created.conversation.expect("conversation");
    assert!(
        c.member_ids.is_empty(),
        "{} ids in the event",
        c.member_ids.len()
    );
    assert_eq!(c.member_count, 102);
    member
        .recovered(&group.id)
        .await
        .expect("followed the new group");

    messaging_client(&cluster.stack.messaging[1])
        .add_members(authed(
            pb::AddMembersRequest {
                conversation_id: group.id.clone(),
                user_ids: vec![newcomer.id.clone()],
            },
            &owner.token,
        ))
        .await
        .expect("add");
    let joined = joiner
        .until(
            Duration::from_secs(10),
            event_of(pb::ConversationEventKind::MembersJoined),
        )
        .await
        .expect("joined");
    assert_eq!(joined.user_ids, std::slice::from_ref(&newcomer.id));
    assert_eq!(joined.conversation.expect("conversation").member_count, 103);
    joiner.recovered(&group.id).await.expect("followed");
    send(
        &mut messaging_client(&cluster.stack.messaging[0]),
        &owner.token,
        &group.id,
        "k1",
        "to all",
    )
    .await
    .expect("send");
    for (who, conn) in [("member", &mut member), ("newcomer", &mut joiner)] {
        let m = conn
            .until(Duration::from_secs(10), |f| match f {
                Out::Message(m) => Some(m),
                _ => None,
            })
            .await
            .unwrap_or_else(|e| panic!("{who}: {e}"));
        assert_eq!(m.body, "to all", "{who}");
    }

    // Removed: the event names them, and their stream stops following the group.
    messaging_client(&cluster.stack.messaging[0])
        .remove_member(authed(
            pb::RemoveMemberRequest {
                conversation_id: group.id.clone(),
                user_id: first.id.clone(),
            },
            &owner.token,
        ))
        .await
        .expect("remove");
    let left = member
        .until(
            Duration::from_secs(10),
            event_of(pb::ConversationEventKind::MemberLeft),
        )
        .await
        .expect("left");
    assert_eq!(left.user_ids, std::slice::from_ref(&first.id));
    send(
        &mut messaging_client(&cluster.stack.messaging[0]),
        &owner.token,
        &group.id,
        "k2",
        "after",
    )
    .await
    .expect("send");
    let m = joiner
        .until(Duration::from_secs(10), |f| match f {
            Out::Message(m) => Some(m),
            _ => None,
        })
        .await
        .expect("newcomer still follows");
    assert_eq!(m.body, "after");
    // The removed member's stream gets nothing more of the group; a ping proves it is
    // caught up.
    member
        .send(In::Ping(pb::Ping { nonce: 9 }))
        .await
        .expect("ping");
    loop {
        match member.next(Duration::from_secs(10)).await {
            Ok(Some(Out::Pong(p))) if p.nonce == 9 => break,
            Ok(Some(Out::Message(m))) => panic!("removed member got {m:?}"),
            Ok(Some(_)) => {}
            other => panic!("member stream: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_without_slowing_others_and_resumes_without_loss() {
    // More than the transport buffers hold (hyper's client window is 2 MiB per stream,
    // the server's send buffer ~400 KiB): 400 × 16 KiB = 6.5 MB.
    const N: u64 = 400;
    let cluster = Cluster::start(MessagingOptions {
        outbound_queue: 16,
        ..MessagingOptions::default()
    })
    .await;
    let users = cluster.users("slow", 3).await;
    let group = create_group(
        &mut messaging_client(&cluster.stack.messaging[0]),
        &users[0].token,
        "slow",
        &ids(&users[1..]),
    )
    .await
    .expect("group");
    let mut slow = Connection::following(
        cluster.stack.messaging[0].channel(),
        &users[1].token,
        &group.id,
    )
    .await
    .expect("slow");
    let mut fast = Connection::following(
        cluster.stack.messaging[0].channel(),
        &users[2].token,
        &group.id,
    )
    .await
    .expect("fast");

    let body = "x".repeat(16 * 1024);
    let group_id = group.id.clone();
    let sender_token = users[0].token.clone();
    let sender_channel = cluster.stack.messaging[1].channel();
    let sending = tokio::spawn(async move {
        let mut c =
            switchboard_proto::messaging::v1::messaging_service_client::MessagingServiceClient::new(
                sender_channel,
            );
        for k in 0..N {
            send(&mut c, &sender_token, &group_id, &format!("s{k}"), &body)
                .await
                .expect("send");
        }
    });
    // The fast reader gets everything in order while the slow one reads nothing.
    let mut got = Vec::new();
    while got.len() < N as usize {
        got.push(
            fast.until(Duration::from_secs(20), |f| match f {
                Out::Message(m) => Some(m.seq),
                _ => None,
            })
            .await
            .expect("fast reader starved"),
        );
    }
    assert_eq!(got, (1..=N).collect::<Vec<_>>());
    sending.await.expect("sender");

    // It resumes from its last seq and loses nothing.
    let last = cut_off(&mut slow, N).await;
    let mut resumed = Connection::open(cluster.stack.messaging[1].channel(), &users[1].token)
        .await
        .expect("resume");
    resumed.subscribe(&group.id, last).await.expect("subscribe");
    let mut rest = Vec::new();
    loop {
        match resumed.next(Duration::from_secs(10)).await.expect("frame") {
            Some(Out::Message(m)) => rest.push(m.seq),
            Some(Out::Recovered(_)) => break,
            Some(_) => {}
            None => panic!("ended"),
        }
    }
    assert_eq!(rest, (last + 1..=N).collect::<Vec<_>>());
}

/// Reads what a stream that never read gets before it is cut off: some of the `n`
/// messages, from seq 1 without a gap, then RESOURCE_EXHAUSTED (SLOW_CONSUMER). The last
/// seq it got.
async fn cut_off(slow: &mut Connection, n: u64) -> u64 {
    let mut seqs = Vec::new();
    let status = loop {
        match slow.next(Duration::from_secs(10)).await {
            Ok(Some(Out::Message(m))) => seqs.push(m.seq),
            Ok(Some(_)) => {}
            Ok(None) => panic!("slow stream ended without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason_of(&status).as_deref(), Some("SLOW_CONSUMER"));
    assert!(
        seqs.len() < n as usize,
        "the slow consumer was never cut off"
    );
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "slow consumer got a gap before the cut"
    );
    seqs.last().copied().unwrap_or(0)
}

#[tokio::test]
async fn bad_input_gets_precise_statuses() {
    let cluster = Cluster::start(MessagingOptions::default()).await;
    let users = cluster.users("bad", 3).await;
    let (owner, member, outsider) = (&users[0], &users[1], &users[2]);
    let mut c = messaging_client(&cluster.stack.messaging[0]);
    let group = create_group(
        &mut c,
        &owner.token,
        "bad",
        std::slice::from_ref(&member.id),
    )
    .await
    .expect("group");

    let big = "x".repeat(16 * 1024 + 1);
    let e = send(&mut c, &owner.token, &group.id, "big", &big)
        .await
        .expect_err("oversize body");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("16384"), "{}", e.message());
    send(
        &mut c,
        &owner.token,
        &group.id,
        "exact",
        &"x".repeat(16 * 1024),
    )
    .await
    .expect("16 KiB is allowed");
    assert_eq!(
        send(&mut c, &owner.token, &group.id, "empty", "")
            .await
            .expect_err("empty")
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        send(&mut c, &owner.token, &group.id, "", "b")
            .await
            .expect_err("no key")
            .code(),
        Code::InvalidArgument
    );

    let e = send(&mut c, &outsider.token, &group.id, "x", "hi")
        .await
        .expect_err("outsider sends");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .get_conversation(authed(
            pb::GetConversationRequest {
                conversation_id: group.id.clone(),
            },
            &outsider.token,
        ))
        .await
        .expect_err("outsider reads");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .list_messages(authed(
            pb::ListMessagesRequest {
                conversation_id: group.id.clone(),
                ..Default::default()
            },
            &outsider.token,
        ))
        .await
        .expect_err("outsider lists");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = send(
        &mut c,
        &owner.token,
        &uuid::Uuid::now_v7().to_string(),
        "x",
        "hi",
    )
    .await
    .expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound);
    let e = send(&mut c, &owner.token, "no-such-conversation", "x", "hi")
        .await
        .expect_err("malformed id");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .list_messages(authed(
            pb::ListMessagesRequest {
                conversation_id: group.id.clone(),
                before_seq: Some(5),
                after_seq: Some(1),
                limit: 0,
            },
            &owner.token,
        ))
        .await
        .expect_err("both bounds");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .list_messages(authed(
            pb::ListMessagesRequest {
                conversation_id: group.id.clone(),
                limit: 201,
                ..Default::default()
            },
            &owner.token,
        ))
        .await
        .expect_err("limit");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .create_conversation(authed(
            pb::CreateConversationRequest {
                kind: pb::ConversationKind::Direct as i32,
                title: String::new(),
                member_ids: vec![],
            },
            &owner.token,
        ))
        .await
        .expect_err("direct without a peer");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .add_members(authed(
            pb::AddMembersRequest {
                conversation_id: group.id.clone(),
                user_ids: vec![outsider.id.clone()],
            },
            &member.token,
        ))
        .await
        .expect_err("non-owner adds");
    assert_eq!(e.code(), Code::PermissionDenied);

    // On the stream: refusals are frames, and the stream stays usable.
    let mut conn = Connection::open(cluster.stack.messaging[1].channel(), &outsider.token)
        .await
        .expect("connect");
    conn.send_empty().await.expect("send");
    let err = conn
        .until(Duration::from_secs(5), |f| {
            if let Out::Error(e) = f { Some(e) } else { None }
        })
        .await
        .expect("error frame");
    assert_eq!(err.code, Code::InvalidArgument as i32);
    conn.subscribe(&group.id, 0).await.expect("send");
    let err = conn
        .until(Duration::from_secs(5), |f| {
            if let Out::Error(e) = f { Some(e) } else { None }
        })
        .await
        .expect("error frame");
    assert_eq!(
        (err.code, err.conversation_id.as_str()),
        (Code::PermissionDenied as i32, group.id.as_str())
    );
    conn.subscribe(&uuid::Uuid::now_v7().to_string(), 0)
        .await
        .expect("send");
    let err = conn
        .until(Duration::from_secs(5), |f| {
            if let Out::Error(e) = f { Some(e) } else { None }
        })
        .await
        .expect("error frame");
    assert_eq!(
        (err.code, err.reason.as_str()),
        (Code::NotFound as i32, "CONVERSATION_NOT_FOUND")
    );
    conn.subscribe("no-such-conversation", 0)
        .await
        .expect("send");
    let err = conn
        .until(Duration::from_secs(5), |f| {
            if let Out::Error(e) = f { Some(e) } else { None }
        })
        .await
        .expect("error frame");
    assert_eq!(
        (err.code, err.reason.as_str(), err.conversation_id.as_str()),
        (Code::InvalidArgument as i32, "INVALID_ARGUMENT", ""),
        "a malformed id is refused and not echoed"
    );
    conn.send(In::Send(pb::Send {
        conversation_id: group.id.clone(),
        client_msg_id: "s".into(),
        body: "hi".into(),
        metadata: HashMap::new(),
    }))
    .await
    .expect("send");
    let result = conn
        .until(Duration::from_secs(5), |f| {
            if let Out::SendResult(r) = f {
                Some(r)
            } else {
                None
            }
        })
        .await
        .expect("result");
    assert!(
        matches!(result.result, Some(pb::send_result::Result::Error(e)) if e.code == Code::PermissionDenied as i32)
    );
    conn.send(In::Ping(pb::Ping { nonce: 7 }))
        .await
        .expect("ping");
    let pong = conn
        .until(Duration::from_secs(5), |f| {
            if let Out::Pong(p) = f { Some(p) } else { None }
        })
        .await
        .expect("pong");
    assert_eq!(pong.nonce, 7);

    // Resuming from a position the conversation never reached says Resync.
    let mut owner_conn = Connection::open(cluster.stack.messaging[0].channel(), &owner.token)
        .await
        .expect("connect");
    owner_conn
        .subscribe(&group.id, 999)
        .await
        .expect("subscribe");
    let resync = owner_conn
        .until(Duration::from_secs(5), |f| {
            if let Out::Resync(r) = f {
                Some(r)
            } else {
                None
            }
        })
        .await
        .expect("resync");
    assert_eq!(resync.oldest_seq, 1);
}

#[tokio::test]
async fn streams_end_when_the_token_expires_unless_refreshed_and_on_logout() {
    let cluster = Cluster::start(MessagingOptions::default()).await;
    let users = cluster.users("exp", 1).await;
    let user = &users[0];
    let short = cluster.token_expiring(user, "s-short", now_secs() + 2);
    let mut expiring = Connection::open(cluster.stack.messaging[0].channel(), &short)
        .await
        .expect("connect");
    let mut refreshed = Connection::open(
        cluster.stack.messaging[1].channel(),
        &cluster.token_expiring(user, "s-short2", now_secs() + 2),
    )
    .await
    .expect("connect");
    refreshed
        .send(In::RefreshToken(pb::RefreshToken {
            access_token: user.token.clone(),
        }))
        .await
        .expect("refresh");

    let status = expiring.ended(Duration::from_secs(8)).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("expired"), "{}", status.message());
    assert_eq!(reason_of(&status).as_deref(), Some("TOKEN_EXPIRED"));

    refreshed
        .send(In::Ping(pb::Ping { nonce: 1 }))
        .await
        .expect("ping");
    refreshed
        .until(Duration::from_secs(5), |f| {
            if let Out::Pong(_) = f { Some(()) } else { None }
        })
        .await
        .expect("refreshed stream alive");

    // Logout of the session ends its streams on every instance.
    cluster
        .stack
        .accounts(0)
        .logout(authed(auth_pb::LogoutRequest {}, &user.token))
        .await
        .expect("logout");
    let status = refreshed.ended(Duration::from_secs(3)).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{}", status.message());
    assert_eq!(reason_of(&status).as_deref(), Some("SESSION_REVOKED"));
}

#[tokio::test]
async fn direct_pairs_are_unique_and_members_hear_about_new_conversations() {
    direct_pairs_are_unique_and_members_hear_about_new_conversations_on(false).await;
}

#[tokio::test]
async fn direct_pairs_are_unique_and_members_hear_about_new_conversations_on_a_redis_cluster() {
    direct_pairs_are_unique_and_members_hear_about_new_conversations_on(true).await;
}

async fn direct_pairs_are_unique_and_members_hear_about_new_conversations_on(redis_cluster: bool) {
    let cluster = Cluster::start_on(MessagingOptions::default(), redis_cluster).await;
    let users = cluster.users("direct", 2).await;
    let (a, b) = (&users[0], &users[1]);
    let mut b_conn = Connection::open(cluster.stack.messaging[1].channel(), &b.token)
        .await
        .expect("connect");
    // The stream is registered once a ping round-trips.
    b_conn
        .send(In::Ping(pb::Ping { nonce: 1 }))
        .await
        .expect("ping");
    b_conn
        .until(Duration::from_secs(5), |f| {
            if let Out::Pong(_) = f { Some(()) } else { None }
        })
        .await
        .expect("pong");

    let req = |members: Vec<String>| pb::CreateConversationRequest {
        kind: pb::ConversationKind::Direct as i32,
        title: String::new(),
        member_ids: members,
    };
    let first = messaging_client(&cluster.stack.messaging[0])
        .create_conversation(authed(req(vec![b.id.clone()]), &a.token))
        .await
        .expect("create")
        .into_inner();
    assert!(first.created);
    let again = messaging_client(&cluster.stack.messaging[1])
        .create_conversation(authed(req(vec![a.id.clone()]), &b.token))
        .await
        .expect("again")
        .into_inner();
    assert!(!again.created);
    let id = first.conversation.expect("conversation").id;
    assert_eq!(again.conversation.expect("conversation").id, id);

    let event = b_conn
        .until(Duration::from_secs(5), |f| {
            if let Out::ConversationEvent(e) = f {
                Some(e)
            } else {
                None
            }
        })
        .await
        .expect("event");
    assert_eq!(event.kind, pb::ConversationEventKind::Created as i32);
    assert_eq!(event.conversation.expect("conversation").id, id);

    send(
        &mut messaging_client(&cluster.stack.messaging[0]),
        &a.token,
        &id,
        "d1",
        "hi b",
    )
    .await
    .expect("send");
    let listed = messaging_client(&cluster.stack.messaging[1])
        .list_conversations(authed(pb::ListConversationsRequest::default(), &b.token))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.conversations.len(), 1);
    assert_eq!(listed.conversations[0].unread_count, 1);
    let read = messaging_client(&cluster.stack.messaging[1])
        .mark_read(authed(
            pb::MarkReadRequest {
                conversation_id: id.clone(),
                seq: 1,
            },
            &b.token,
        ))
        .await
        .expect("read")
        .into_inner();
    assert_eq!(read.read_seq, 1);
}

#[tokio::test]
async fn receipts_and_typing_reach_members_on_the_other_instance() {
    receipts_and_typing_reach_members_on_the_other_instance_on(false).await;
}

#[tokio::test]
async fn receipts_and_typing_reach_members_on_the_other_instance_on_a_redis_cluster() {
    receipts_and_typing_reach_members_on_the_other_instance_on(true).await;
}

async fn receipts_and_typing_reach_members_on_the_other_instance_on(redis_cluster: bool) {
    let cluster = Cluster::start_on(MessagingOptions::default(), redis_cluster).await;
    let users = cluster.users("rt", 2).await;
    let (a, b) = (&users[0], &users[1]);
    let group = create_group(
        &mut messaging_client(&cluster.stack.messaging[0]),
        &a.token,
        "rt",
        std::slice::from_ref(&b.id),
    )
    .await
    .expect("group");
    let mut a_conn =
        Connection::following(cluster.stack.messaging[0].channel(), &a.token, &group.id)
            .await
            .expect("a");
    let b_conn = Connection::open(cluster.stack.messaging[1].channel(), &b.token)
        .await
        .expect("b");
    send(
        &mut messaging_client(&cluster.stack.messaging[0]),
        &a.token,
        &group.id,
        "r1",
        "read me",
    )
    .await
    .expect("send");

    b_conn
        .send(In::Typing(pb::Typing {
            conversation_id: group.id.clone(),
        }))
        .await
        .expect("typing");
    let typing = a_conn
        .until(Duration::from_secs(5), |f| {
            if let Out::Typing(t) = f {
                Some(t)
            } else {
                None
            }
        })
        .await
        .expect("typing event");
    assert_eq!(
        (typing.user_id.as_str(), typing.conversation_id.as_str()),
        (b.id.as_str(), group.id.as_str())
    );

    b_conn
        .send(In::Read(pb::Read {
            conversation_id: group.id.clone(),
            seq: 1,
        }))
        .await
        .expect("read");
    let receipt = a_conn
        .until(Duration::from_secs(5), |f| {
            if let Out::Receipt(r) = f {
                Some(r)
            } else {
                None
            }
        })
        .await
        .expect("receipt");
    assert_eq!(
        (receipt.user_id.as_str(), receipt.read_seq),
        (b.id.as_str(), 1)
    );

    // Typing is ephemeral: nothing was stored.
    let history = messaging_client(&cluster.stack.messaging[1])
        .list_messages(authed(
            pb::ListMessagesRequest {
                conversation_id: group.id.clone(),
                ..Default::default()
            },
            &b.token,
        ))
        .await
        .expect("history")
        .into_inner();
    assert_eq!(history.messages.len(), 1);
    // And rate-limited: a second notice at once is refused with a retry hint.
    b_conn
        .send(In::Typing(pb::Typing {
            conversation_id: group.id.clone(),
        }))
        .await
        .expect("typing");
    b_conn
        .send(In::Typing(pb::Typing {
            conversation_id: group.id.clone(),
        }))
        .await
        .expect("typing");
    let mut b_conn = b_conn;
    let refused = b_conn
        .until(Duration::from_secs(5), |f| {
            if let Out::Error(e) = f { Some(e) } else { None }
        })
        .await
        .expect("refusal");
    assert_eq!(refused.code, Code::ResourceExhausted as i32);
    assert!(refused.retry_after_ms > 0);
}

#[tokio::test]
async fn sending_too_fast_gets_resource_exhausted_with_a_retry_hint() {
    let cluster = Cluster::start(MessagingOptions {
        send_rate: 1.0,
        send_burst: 3.0,
        ..MessagingOptions::default()
    })
    .await;
    let users = cluster.users("rate", 2).await;
    let group = create_group(
        &mut messaging_client(&cluster.stack.messaging[0]),
        &users[0].token,
        "rate",
        std::slice::from_ref(&users[1].id),
    )
    .await
    .expect("group");
    let mut c = messaging_client(&cluster.stack.messaging[0]);
    for k in 0..3 {
        send(
            &mut c,
            &users[0].token,
            &group.id,
            &format!("ok{k}"),
            "within the burst",
        )
        .await
        .expect("send");
    }
    let limited = send(&mut c, &users[0].token, &group.id, "over", "too fast")
        .await
        .expect_err("over the limit");
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    let retry: u64 = limited
        .metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("retry-after-ms");
    assert!(retry > 0 && retry <= 1000, "retry-after-ms {retry}");
    // Other users have their own bucket; after the hint, the sender may go on.
    send(&mut c, &users[1].token, &group.id, "other", "mine")
        .await
        .expect("other user unaffected");
    tokio::time::sleep(Duration::from_millis(retry + 50)).await;
    send(&mut c, &users[0].token, &group.id, "over", "now fine")
        .await
        .expect("after the wait");
}

/// With MESSAGING_MAX_STREAM_AGE_SECS a stream ends at its age (± 10 %) with UNAVAILABLE,
/// reason RECONNECT, so clients spread over new instances; the client resumes on the
/// other instance with everything sent meanwhile.
#[tokio::test]
async fn a_stream_past_its_age_is_told_to_reconnect_and_resumes_without_loss() {
    let cluster = Cluster::start(MessagingOptions {
        max_stream_age: Some(Duration::from_secs(1)),
        ..MessagingOptions::default()
    })
    .await;
    let users = cluster.users("aged", 2).await;
    let (alice, bob) = (&users[0], &users[1]);
    let mut m0 = messaging_client(&cluster.stack.messaging[0]);
    let group = create_group(&mut m0, &alice.token, "aged", std::slice::from_ref(&bob.id))
        .await
        .expect("group");
    let opened = tokio::time::Instant::now();
    let mut stream =
        Connection::following(cluster.stack.messaging[0].channel(), &bob.token, &group.id)
            .await
            .expect("connect");
    send(&mut m0, &alice.token, &group.id, "a1", "before")
        .await
        .expect("send");
    let mut seen = Vec::new();
    let ended = loop {
        match stream.next(Duration::from_secs(5)).await {
            Ok(Some(Out::Message(m))) => seen.push(m.seq),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert!(
        opened.elapsed() >= Duration::from_millis(900),
        "ended after {:?}, before 90 % of its age",
        opened.elapsed()
    );
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert_eq!(
        switchboard_common::status::reason_of(&ended).as_deref(),
        Some("RECONNECT"),
        "{ended:?}"
    );
    assert!(
        ended.message().contains("MESSAGING_MAX_STREAM_AGE_SECS"),
        "{ended:?}"
    );
    assert_eq!(seen, [1]);
    send(&mut m0, &alice.token, &group.id, "a2", "while away")
        .await
        .expect("send");
    let mut again = Connection::open(cluster.stack.messaging[1].channel(), &bob.token)
        .await
        .expect("reconnect");
    again.subscribe(&group.id, 1).await.expect("resume");
    let mut resumed = Vec::new();
    while resumed.is_empty() {
        match again.next(Duration::from_secs(5)).await {
            Ok(Some(Out::Message(m))) => resumed.push(m.seq),
            Ok(Some(_)) => {}
            other => panic!("resume: {other:?}"),
        }
    }
    assert_eq!(resumed, [2]);
}
