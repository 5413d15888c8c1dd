//! Recovery: an instance killed with SIGKILL in the middle of a send burst, and Redis
//! restarted in the middle of a run. Nothing acknowledged is lost, nothing is duplicated.

use std::collections::HashSet;
use std::time::Duration;

use switchboard_proto::messaging::v1 as pb;
use switchboard_proto::messaging::v1::connect_response::Frame as Out;
use switchboard_proto::messaging::v1::messaging_service_client::MessagingServiceClient;
use switchboard_tests::auth::{authed, register_and_login};
use switchboard_tests::instance::{ChildService, auth_client, messaging_client};
use switchboard_tests::messaging::{Connection, create_group, send};
use switchboard_tests::stack::{Stack, StackOptions};
use tonic::Code;
use tonic::transport::Channel;

async fn user(auth: &switchboard_tests::instance::InProcess, name: &str) -> (String, String) {
    let mut c = auth_client(auth);
    let t = register_and_login(&mut c, name).await.expect("user");
    let me = c
        .who_am_i(authed(
            switchboard_proto::auth::v1::WhoAmIRequest {},
            &t.access_token,
        ))
        .await
        .expect("whoami")
        .into_inner();
    (me.user.expect("user").id, t.access_token)
}

/// Every message of `conversation` in history, oldest first, page by page.
async fn whole_history(
    instance: &switchboard_tests::instance::InProcess,
    token: &str,
    conversation: &str,
) -> Vec<pb::Message> {
    let mut history: Vec<pb::Message> = Vec::new();
    for _ in 0..1000 {
        let after = history.last().map_or(0, |m| m.seq);
        let page = messaging_client(instance)
            .list_messages(authed(
                pb::ListMessagesRequest {
                    conversation_id: conversation.to_owned(),
                    after_seq: Some(after),
                    limit: 200,
                    ..Default::default()
                },
                token,
            ))
            .await
            .expect("history")
            .into_inner();
        if page.messages.is_empty() {
            return history;
        }
        history.extend(page.messages);
    }
    panic!("history of {conversation} does not end");
}

/// The start of the cluster recovery tests: a stack on a Redis Cluster whose sends wait
/// for `ack` replicas, a sender and a receiver (`<name>_sender`, `<name>_receiver`), and
/// their group titled `name`. Returns the stack, both tokens and the group.
async fn cluster_pair(
    name: &str,
    ack: Option<(u32, Duration)>,
) -> (Stack, String, String, pb::Conversation) {
    let stack = Stack::start(StackOptions {
        cluster: true,
        messaging_options: switchboard_tests::instance::MessagingOptions {
            ack_replicas: ack,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let (_, sender_token) = user(&stack.auth[0], &format!("{name}_sender")).await;
    let (receiver_id, receiver_token) = user(&stack.auth[0], &format!("{name}_receiver")).await;
    let group = create_group(
        &mut messaging_client(&stack.messaging[0]),
        &sender_token,
        name,
        &[receiver_id],
    )
    .await
    .expect("group");
    (stack, sender_token, receiver_token, group)
}

/// Each acknowledged `(client_msg_id, seq)` is at its seq in `history` (which starts at 1).
fn assert_acked_in_place(history: &[pb::Message], acked: &[(String, u64)]) {
    for (key, seq) in acked {
        assert_eq!(
            history[(*seq - 1) as usize].client_msg_id,
            *key,
            "acked {key} is not at seq {seq}"
        );
    }
}

/// Reads messages of `conversation` until seq `until`, reconnecting through `channels` (in
/// order) whenever the stream fails; returns every seq received. `subscribed` fires once
/// the first subscription has taken effect (its `Recovered` frame).
async fn receive_all(
    channels: Vec<Channel>,
    token: String,
    conversation: String,
    until: u64,
    subscribed: tokio::sync::oneshot::Sender<()>,
) -> Vec<u64> {
    let mut subscribed = Some(subscribed);
    let mut seqs: Vec<u64> = Vec::new();
    let mut which = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    'connect: while tokio::time::Instant::now() < deadline {
        let last = seqs.last().copied().unwrap_or(0);
        let Ok(mut conn) = Connection::open(channels[which].clone(), &token).await else {
            which = (which + 1) % channels.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if conn.subscribe(&conversation, last).await.is_err() {
            continue;
        }
        loop {
            if seqs.last().copied().unwrap_or(0) >= until {
                return seqs;
            }
            match conn.next(Duration::from_secs(20)).await {
                Ok(Some(Out::Message(m))) => seqs.push(m.seq),
                Ok(Some(Out::Recovered(_))) => {
                    if let Some(ready) = subscribed.take() {
                        let _ = ready.send(());
                    }
                }
                Ok(Some(_)) => {}
                _ => {
                    which = (which + 1) % channels.len();
                    continue 'connect;
                }
            }
        }
    }
    panic!(
        "receiver did not reach seq {until}; got {} messages",
        seqs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_instance_mid_burst_loses_no_acknowledged_message_and_duplicates_none() {
    const N: usize = 300;
    let stack = Stack::start(StackOptions {
        messaging: 1,
        ..Default::default()
    })
    .await;
    let (auth, survivor) = (&stack.auth[0], &stack.messaging[0]);
    let mut doomed = ChildService::spawn(
        "switchboard-messaging",
        &[
            ("REDIS_URL", stack.redis.one().url()),
            ("AUTH_URL", format!("http://{}", auth.addr)),
            ("MESSAGING_SEND_BURST", "100000".into()),
        ],
    )
    .expect("messaging process");
    let (_, sender_token) = user(auth, "crash_sender").await;
    let (receiver_id, receiver_token) = user(auth, "crash_receiver").await;
    let group = create_group(
        &mut messaging_client(survivor),
        &sender_token,
        "crash",
        &[receiver_id],
    )
    .await
    .expect("group");

    let (subscribed, ready) = tokio::sync::oneshot::channel();
    let receiving = tokio::spawn(receive_all(
        vec![doomed.channel(), survivor.channel()],
        receiver_token,
        group.id.clone(),
        N as u64,
        subscribed,
    ));
    // The receiver is subscribed on the doomed instance before the burst.
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .expect("the receiver subscribes within 10 s")
        .expect("the receiver subscribed");

    let mut clients = [
        MessagingServiceClient::new(doomed.channel()),
        messaging_client(survivor),
    ];
    let mut current = 0;
    let mut acked = Vec::new();
    for k in 0..N {
        if k == N / 3 {
            doomed.kill();
        }
        let key = format!("burst-{k}");
        // A client retries an unacknowledged send with the same key, on another instance.
        let mut attempts = 0;
        let message = loop {
            match send(
                &mut clients[current],
                &sender_token,
                &group.id,
                &key,
                &format!("body {k}"),
            )
            .await
            {
                Ok(m) => break m,
                Err(e) => {
                    attempts += 1;
                    assert!(attempts < 20, "send {k} keeps failing: {e:?}");
                    current = 1;
                }
            }
        };
        acked.push((key, message.seq));
    }
    let seqs = tokio::time::timeout(Duration::from_secs(90), receiving)
        .await
        .expect("receiver finished")
        .expect("receiver");
    assert_eq!(
        seqs,
        (1..=N as u64).collect::<Vec<_>>(),
        "receiver saw a gap or a duplicate"
    );
    let acked_seqs: HashSet<u64> = acked.iter().map(|(_, s)| *s).collect();
    assert_eq!(acked_seqs.len(), N, "two sends got the same seq");

    // History holds every acknowledged message exactly once.
    let history = whole_history(survivor, &sender_token, &group.id).await;
    let keys: Vec<&str> = history.iter().map(|m| m.client_msg_id.as_str()).collect();
    assert_eq!(
        keys.len(),
        N,
        "history has {} messages for {N} sends",
        keys.len()
    );
    assert_acked_in_place(&history, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_fails_sends_with_unavailable_then_everything_recovers() {
    let mut stack = Stack::start(StackOptions {
        durable_redis: true,
        ..Default::default()
    })
    .await;
    let (_, sender_token) = user(&stack.auth[0], "aof_sender").await;
    let (receiver_id, receiver_token) = user(&stack.auth[0], "aof_receiver").await;
    let group = create_group(
        &mut messaging_client(&stack.messaging[0]),
        &sender_token,
        "aof",
        &[receiver_id],
    )
    .await
    .expect("group");

    let mut receiver =
        Connection::following(stack.messaging[1].channel(), &receiver_token, &group.id)
            .await
            .expect("connect");

    let mut sender = messaging_client(&stack.messaging[0]);
    let mut acked = Vec::new();
    for k in 0..20 {
        acked.push(
            send(
                &mut sender,
                &sender_token,
                &group.id,
                &format!("before{k}"),
                "before",
            )
            .await
            .expect("send")
            .seq,
        );
    }

    stack.redis.one_mut().stop();
    let err = send(&mut sender, &sender_token, &group.id, "during", "during")
        .await
        .expect_err("send during outage");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    stack.redis.one_mut().start().expect("redis back");

    // The services recover without a restart.
    let mut k = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while acked.len() < 40 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sends did not recover after the restart"
        );
        match send(
            &mut sender,
            &sender_token,
            &group.id,
            &format!("after{k}"),
            "after",
        )
        .await
        {
            Ok(m) => {
                acked.push(m.seq);
                k += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    // Every acknowledged message is in history, in order, once.
    let page = messaging_client(&stack.messaging[1])
        .list_messages(authed(
            pb::ListMessagesRequest {
                conversation_id: group.id.clone(),
                after_seq: Some(0),
                limit: 200,
                ..Default::default()
            },
            &receiver_token,
        ))
        .await
        .expect("history")
        .into_inner();
    let stored: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(stored, acked, "history differs from what was acknowledged");

    // Live delivery resumed on the open stream: it got every message, gaps filled.
    let mut got = Vec::new();
    while got.len() < acked.len() {
        match receiver.next(Duration::from_secs(15)).await {
            Ok(Some(Out::Message(m))) => got.push(m.seq),
            Ok(Some(_)) => {}
            other => panic!("stream ended after {} messages: {other:?}", got.len()),
        }
    }
    assert_eq!(got, acked);
}

/// Redis Cluster failover: the master holding a busy conversation is killed with SIGKILL
/// mid-burst and its replica takes over. With REDIS_ACK_REPLICAS=1 every acknowledged send
/// is in history afterwards, once, at its seq; the seqs are gapless and a subscriber on the
/// other instance sees each exactly once, in order. Prints how long sends were refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_burst_loses_no_acknowledged_message_with_ack_replicas() {
    const N: usize = 200;
    let (mut stack, sender_token, receiver_token, group) =
        cluster_pair("failover", Some((1, Duration::from_millis(1000)))).await;
    let doomed = stack
        .redis
        .cluster_mut()
        .master_of(&format!("sb:msg:{{c:{}}}:seq", group.id))
        .expect("the conversation's master");

    let (subscribed, ready) = tokio::sync::oneshot::channel();
    let receiving = tokio::spawn(receive_all(
        vec![stack.messaging[1].channel(), stack.messaging[0].channel()],
        receiver_token,
        group.id.clone(),
        N as u64,
        subscribed,
    ));
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .expect("the receiver subscribes within 10 s")
        .expect("the receiver subscribed");

    let mut client = messaging_client(&stack.messaging[0]);
    let mut acked = Vec::new();
    let mut killed_at = None;
    // When the replica was seen promoted; the killed node restarts then.
    let mut promoted_at = None;
    let seq_key = format!("sb:msg:{{c:{}}}:seq", group.id);
    // When sends were first refused after the kill, and when one was acknowledged again.
    let mut refused = (None, None);
    let mut refused_before_the_kill = 0;
    for k in 0..N {
        if k == N / 3 {
            stack.redis.cluster_mut().nodes()[doomed].stop();
            killed_at = Some(tokio::time::Instant::now());
        }
        let key = format!("failover-{k}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let message = loop {
            let body = format!("body {k}");
            match send(&mut client, &sender_token, &group.id, &key, &body).await {
                Ok(m) => break m,
                Err(e) => {
                    assert_eq!(e.code(), Code::Unavailable, "send {k}: {e:?}");
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "send {k} still refused after 30 s: {e:?}"
                    );
                    if killed_at.is_some() {
                        refused.0.get_or_insert_with(tokio::time::Instant::now);
                    } else {
                        // Before the kill only while replicas are still catching up.
                        refused_before_the_kill += 1;
                    }
                    // The promoted replica has no replica of its own, so no send can be
                    // confirmed until the killed node is back (as its replica), as an
                    // operator or Kubernetes would bring it back: once the promotion shows.
                    if killed_at.is_some() && promoted_at.is_none() {
                        let cluster = stack.redis.cluster_mut();
                        if cluster.master_of(&seq_key).is_ok_and(|m| m != doomed) {
                            promoted_at = Some(tokio::time::Instant::now());
                            cluster.nodes()[doomed]
                                .start()
                                .expect("the killed node restarts");
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        if refused.0.is_some() && refused.1.is_none() {
            refused.1 = Some(tokio::time::Instant::now());
        }
        acked.push((key, message.seq));
    }
    if let (Some(killed), Some(back)) = (killed_at, refused.1) {
        eprintln!(
            "failover: replica promoted {:?} after the kill (the killed node restarted then); next acknowledged send {:?} after the kill; sends refused from {:?}; {refused_before_the_kill} refusals before the kill",
            promoted_at.map(|at| at - killed),
            back - killed,
            refused.0.map(|from| from - killed)
        );
    }
    let seqs = tokio::time::timeout(Duration::from_secs(90), receiving)
        .await
        .expect("receiver finished")
        .expect("receiver");
    assert_eq!(
        seqs,
        (1..=N as u64).collect::<Vec<_>>(),
        "receiver saw a gap or a duplicate"
    );
    let history = whole_history(&stack.messaging[1], &sender_token, &group.id).await;
    assert_eq!(
        history.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=N as u64).collect::<Vec<_>>(),
        "history is not gapless 1..={N}"
    );
    assert_acked_in_place(&history, &acked);
}

/// Redis Cluster slot migration: the slot of a busy conversation moves to another master
/// while messages flow. Every acknowledged send is in history once at its seq, history is
/// gapless, and a subscriber on the other instance (whose sharded subscription the old
/// node drops when the slot leaves it) sees every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_whose_slot_moves_mid_burst_stays_gapless() {
    const N: usize = 200;
    let (stack, sender_token, receiver_token, group) = cluster_pair("migrating", None).await;
    let key = format!("sb:msg:{{c:{}}}:seq", group.id);
    let cluster = match &stack.redis {
        switchboard_tests::redis::Backing::Cluster(c) => c,
        switchboard_tests::redis::Backing::One(_) => unreachable!("a cluster stack"),
    };
    let from = cluster.master_of(&key).expect("the conversation's master");
    // Another master: `redis-cli --cluster create` makes the first three nodes masters.
    let to = (0..3).find(|&i| i != from).expect("another master");

    let (subscribed, ready) = tokio::sync::oneshot::channel();
    let receiving = tokio::spawn(receive_all(
        vec![stack.messaging[1].channel(), stack.messaging[0].channel()],
        receiver_token,
        group.id.clone(),
        N as u64,
        subscribed,
    ));
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .expect("the receiver subscribes within 10 s")
        .expect("the receiver subscribed");

    let mut client = messaging_client(&stack.messaging[0]);
    let mut acked = Vec::new();
    let mut retries = 0;
    for k in 0..N {
        if k == N / 3 {
            let slot = cluster.move_slot(&key, to).expect("move the slot");
            eprintln!("slot {slot} moved from node {from} to node {to} after {k} sends");
        }
        let id = format!("migrating-{k}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let message = loop {
            let body = format!("body {k}");
            match send(&mut client, &sender_token, &group.id, &id, &body).await {
                Ok(m) => break m,
                Err(e) => {
                    assert_eq!(e.code(), Code::Unavailable, "send {k}: {e:?}");
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "send {k} still refused after 30 s: {e:?}"
                    );
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        acked.push((id, message.seq));
    }
    eprintln!("slot migration: {retries} sends retried");
    assert_eq!(
        cluster.master_of(&key).expect("the new master"),
        to,
        "the slot did not move"
    );
    let seqs = tokio::time::timeout(Duration::from_secs(90), receiving)
        .await
        .expect("receiver finished")
        .expect("receiver");
    assert_eq!(
        seqs,
        (1..=N as u64).collect::<Vec<_>>(),
        "receiver saw a gap or a duplicate"
    );
    let history = whole_history(&stack.messaging[1], &sender_token, &group.id).await;
    assert_eq!(
        history.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=N as u64).collect::<Vec<_>>(),
        "history is not gapless"
    );
    assert_acked_in_place(&history, &acked);
}

/// With REDIS_ACK_REPLICAS a message is published only once a replica has it: a send its
/// master cannot get confirmed (the replica is down) answers UNAVAILABLE and reaches no
/// subscriber; its retry, once the replica is back, is confirmed and delivered, as stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ack_replicas_only_confirmed_messages_are_published() {
    let (mut stack, sender_token, receiver_token, group) =
        cluster_pair("confirmed", Some((1, Duration::from_millis(300)))).await;
    let mut receiver =
        Connection::following(stack.messaging[1].channel(), &receiver_token, &group.id)
            .await
            .expect("follow");
    let cluster = stack.redis.cluster_mut();
    let master = cluster
        .master_of(&format!("sb:msg:{{c:{}}}:seq", group.id))
        .expect("the conversation's master");
    let replicas = cluster.replicas_of(master).expect("its replicas");
    assert_eq!(replicas.len(), 1, "one replica per master");
    cluster.nodes()[replicas[0]].stop();

    let mut sender = messaging_client(&stack.messaging[0]);
    let refused = send(&mut sender, &sender_token, &group.id, "c1", "one")
        .await
        .expect_err("no replica to confirm it");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    // Nothing reaches the subscriber (bounded wait for an absence).
    match receiver.next(Duration::from_secs(1)).await {
        Ok(Some(Out::Message(m))) => panic!("an unconfirmed message was published: {m:?}"),
        Ok(Some(_)) | Err(_) => {}
        Ok(None) => panic!("the stream ended"),
    }

    let cluster = stack.redis.cluster_mut();
    cluster.nodes()[replicas[0]]
        .start()
        .expect("the replica restarts");
    cluster
        .wait_until_ok(Duration::from_secs(20))
        .expect("the replica is back in sync");
    // The retry: stored before, confirmed now, delivered as stored.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        match send(&mut sender, &sender_token, &group.id, "c1", "one").await {
            Ok(m) => break m,
            Err(e) if e.code() == Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the retry: {e:?}"),
        }
    };
    assert_eq!(first.seq, 1, "stored once, by the first attempt");
    let second = send(&mut sender, &sender_token, &group.id, "c2", "two")
        .await
        .expect("confirmed");
    assert_eq!(second.seq, 2);
    let mut delivered = Vec::new();
    while delivered.len() < 2 {
        match receiver.next(Duration::from_secs(10)).await {
            Ok(Some(Out::Message(m))) => delivered.push((m.seq, m.body)),
            Ok(Some(_)) => {}
            other => panic!("after {delivered:?}: {other:?}"),
        }
    }
    assert_eq!(delivered, [(1, "one".to_owned()), (2, "two".to_owned())]);
}
