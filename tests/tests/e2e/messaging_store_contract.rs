//! The messaging storage contract, run against the in-memory engine and a real Redis.

use std::sync::Arc;
use std::time::Duration;

use switchboard_common::bus::{Bus, BusEvent, MemoryBus, RedisBus};
use switchboard_common::redis_conn;
use switchboard_common::shutdown::CancellationToken;
use switchboard_messaging::conversation::{ConversationRecord, Kind, Member};
use switchboard_messaging::message::{Envelope, Frame, decode};
use switchboard_messaging::store::desk::{ConsultationRecord, ConsultationState, Routed, Step};
use switchboard_messaging::store::memory::MemoryStore;
use switchboard_messaging::store::redis::{RedisStore, WIDE_MEMBERS};
use switchboard_messaging::store::{
    DeskStore, Membership, MessagingStore, Outgoing, Range, Ranked, Sent, conversation_channel,
};
use switchboard_proto::messaging::v1 as pb;
use switchboard_tests::redis::RedisServer;

fn group(id: &str, members: &[&str]) -> ConversationRecord {
    ConversationRecord {
        id: id.into(),
        kind: Kind::Group,
        title: "t".into(),
        owner_id: members[0].into(),
        created_at_ms: 1000,
        epoch: "e1".into(),
        read_only: false,
        members: members
            .iter()
            .enumerate()
            .map(|(i, m)| Member {
                user_id: (*m).into(),
                joined_at_ms: 1000 + i as u64,
            })
            .collect(),
    }
}

/// `outgoing` sent at `at_ms`.
fn outgoing_at(conversation: &str, sender: &str, key: &str, at_ms: u64) -> Outgoing {
    Outgoing {
        sent_at_ms: at_ms,
        ..outgoing(conversation, sender, key, "x")
    }
}

fn outgoing(conversation: &str, sender: &str, key: &str, body: &str) -> Outgoing {
    let message = pb::Message {
        id: format!("id-{key}"),
        conversation_id: conversation.into(),
        sender_id: sender.into(),
        body: body.into(),
        client_msg_id: key.into(),
        ..Default::default()
    };
    Outgoing {
        conversation_id: conversation.into(),
        sender_id: sender.into(),
        client_msg_id: key.into(),
        message: prost::Message::encode_to_vec(&message),
        envelope: prost::Message::encode_to_vec(&Envelope {
            message: Some(message.clone()),
            ..Default::default()
        }),
        message_id: message.id,
        sent_at_ms: 5,
    }
}

async fn contract(store: impl MessagingStore, bus: Arc<dyn Bus>, retention: usize) {
    // Conversations and membership.
    store
        .create(&group("g1", &["a", "b"]))
        .await
        .expect("create");
    assert_eq!(
        store.conversation("g1").await.expect("get"),
        Some(group("g1", &["a", "b"]))
    );
    assert_eq!(store.conversation("nope").await.expect("get"), None);
    let standing = |member: bool| {
        Some(Membership {
            member,
            epoch: "e1".into(),
        })
    };
    assert_eq!(
        store.membership("g1", "a").await.expect("m"),
        standing(true)
    );
    assert_eq!(
        store.membership("g1", "c").await.expect("m"),
        standing(false)
    );
    assert_eq!(store.membership("nope", "a").await.expect("m"), None);
    let after = store
        .add_members("g1", &["c".into(), "a".into()], 2000)
        .await
        .expect("add")
        .expect("exists");
    assert_eq!(
        after
            .members
            .iter()
            .map(|m| m.user_id.as_str())
            .collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert_eq!(
        after.members[0].joined_at_ms, 1000,
        "existing member's join time changed"
    );
    assert_eq!(
        store
            .add_members("nope", &["c".into()], 1)
            .await
            .expect("add"),
        None
    );
    let after = store
        .remove_member("g1", "c", Some("b"))
        .await
        .expect("remove")
        .expect("exists");
    assert_eq!(after.owner_id, "b");
    assert!(!after.is_member("c"));
    assert_eq!(
        store.membership("g1", "c").await.expect("m"),
        standing(false)
    );
    assert_eq!(
        store.membership("g1", "b").await.expect("m"),
        standing(true)
    );
    assert_eq!(store.user_conversations("a").await.expect("index"), ["g1"]);
    assert!(
        store
            .user_conversations("c")
            .await
            .expect("index")
            .is_empty()
    );

    // One direct conversation per pair.
    let mut d1 = group("d1", &["a", "b"]);
    d1.kind = Kind::Direct;
    let mut d2 = group("d2", &["b", "a"]);
    d2.kind = Kind::Direct;
    let (first, created) = store.create_direct("a|b", &d1).await.expect("direct");
    assert!(created);
    let (second, created) = store.create_direct("a|b", &d2).await.expect("direct again");
    assert!(!created);
    assert_eq!(second.id, first.id);

    // Sending: seqs from 1, published in order with the seq, idempotent per sender.
    let mut sub = bus
        .subscribe(&conversation_channel("g1"))
        .await
        .expect("subscribe");
    for k in 1..=5u64 {
        assert_eq!(
            store
                .send(&outgoing("g1", "a", &format!("k{k}"), &format!("m{k}")))
                .await
                .expect("send"),
            Sent::Stored(k)
        );
    }
    for k in 1..=5u64 {
        let event = tokio::time::timeout(Duration::from_secs(3), sub.recv())
            .await
            .expect("published")
            .expect("event");
        let BusEvent::Message(payload) = event else {
            panic!("gap")
        };
        match decode(&payload) {
            Some(Frame::Message(seq, env)) => {
                assert_eq!(seq, k);
                assert_eq!(env.message.expect("message").body, format!("m{k}"));
            }
            other => panic!("bad payload {other:?}"),
        }
    }
    assert_eq!(
        store
            .send(&outgoing("g1", "a", "k3", "again"))
            .await
            .expect("dup"),
        Sent::Duplicate {
            seq: 3,
            message_id: "id-k3".into(),
            sent_at_ms: 5
        }
    );
    assert_eq!(
        store
            .send(&outgoing("g1", "b", "k3", "b's own"))
            .await
            .expect("other sender"),
        Sent::Stored(6)
    );
    assert_eq!(
        store
            .send(&outgoing("g1", "c", "x", "gone"))
            .await
            .expect("not member"),
        Sent::NotMember
    );
    assert_eq!(
        store
            .send(&outgoing("nope", "a", "x", "x"))
            .await
            .expect("not found"),
        Sent::NotFound
    );
    let mut closed = group("ro", &["a"]);
    closed.read_only = true;
    store.create(&closed).await.expect("create");
    assert_eq!(
        store
            .send(&outgoing("ro", "a", "x", "x"))
            .await
            .expect("read only"),
        Sent::ReadOnly
    );

    // History ranges.
    let seqs = |h: &switchboard_messaging::store::History| {
        h.messages.iter().map(|m| m.seq).collect::<Vec<_>>()
    };
    let h = store
        .history("g1", Range::After(2), 2)
        .await
        .expect("after");
    assert_eq!((seqs(&h), h.oldest_seq, h.last_seq), (vec![3, 4], 1, 6));
    assert_eq!(h.messages[0].body, "m3");
    assert_eq!(
        seqs(
            &store
                .history("g1", Range::Before(5), 2)
                .await
                .expect("before")
        ),
        [3, 4]
    );
    assert_eq!(
        seqs(
            &store
                .history("g1", Range::Before(1), 2)
                .await
                .expect("before 1")
        ),
        Vec::<u64>::new()
    );
    assert_eq!(
        seqs(&store.history("g1", Range::Latest, 2).await.expect("latest")),
        [5, 6]
    );
    assert_eq!(
        seqs(
            &store
                .history("g1", Range::After(6), 10)
                .await
                .expect("none")
        ),
        Vec::<u64>::new()
    );
    assert_eq!(
        store
            .history("nope", Range::Latest, 10)
            .await
            .expect("unknown"),
        Default::default()
    );
    assert_eq!(
        store
            .last_seqs(&["g1".into(), "nope".into(), "ro".into()])
            .await
            .expect("last"),
        [6, 0, 0]
    );

    // Retention trims the oldest (Redis trims approximately, so only check it is bounded).
    for k in 0..(retention + 150) {
        store
            .send(&outgoing("g1", "b", &format!("r{k}"), "r"))
            .await
            .expect("send");
    }
    let h = store.history("g1", Range::Latest, 1).await.expect("latest");
    assert!(h.oldest_seq > 1, "nothing was trimmed");
    // Redis trims whole stream nodes (100 entries by default), so allow one node extra.
    let kept = h.last_seq - h.oldest_seq + 1;
    assert!(
        kept < (retention + 100) as u64,
        "history not bounded: {kept} kept"
    );

    // How conversations rank in their members' lists: `ranking_contract`.

    // Writing means having read up to there: the sender's position is its last message.
    assert_eq!(
        store
            .read_positions("g1")
            .await
            .expect("positions")
            .get("b"),
        Some(&h.last_seq)
    );
    // Read positions only move forward and never past the end.
    assert_eq!(store.mark_read("g1", "c", 3).await.expect("read"), 3);
    assert_eq!(store.mark_read("g1", "c", 2).await.expect("read back"), 3);
    assert_eq!(
        store
            .mark_read("g1", "c", 1_000_000)
            .await
            .expect("read past"),
        h.last_seq
    );
    assert_eq!(
        store
            .read_positions("g1")
            .await
            .expect("positions")
            .get("c"),
        Some(&h.last_seq)
    );
    assert_eq!(
        store.read_position("g1", "c").await.expect("one"),
        h.last_seq
    );
    assert_eq!(store.read_position("g1", "nobody").await.expect("none"), 0);
    // A page's summaries, in the order asked, None for what does not exist.
    let page = store
        .summaries(&["nope".into(), "g1".into()], "c")
        .await
        .expect("summaries");
    assert!(page[0].is_none());
    let g1 = page[1].as_ref().expect("g1");
    assert_eq!(g1.record.id, "g1");
    assert_eq!(
        (
            g1.last_seq,
            g1.read_seq,
            g1.last_message.as_ref().map(|m| m.seq)
        ),
        (h.last_seq, h.last_seq, Some(h.last_seq))
    );
    assert!(store.summaries(&[], "c").await.expect("none").is_empty());
    assert_eq!(store.read_position("nope", "c").await.expect("no such"), 0);

    // Ephemeral publishes reach subscribers.
    store
        .publish(&conversation_channel("g1"), b"1E\nraw".to_vec())
        .await
        .expect("publish");
}

fn support(id: &str, customer: &str, opened: u64) -> (ConversationRecord, ConsultationRecord) {
    let conversation = ConversationRecord {
        kind: Kind::Support,
        owner_id: String::new(),
        ..group(id, &[customer])
    };
    let consultation = ConsultationRecord {
        id: id.into(),
        customer_id: customer.into(),
        agent_id: String::new(),
        topic: "t".into(),
        state: ConsultationState::Queued,
        opened_at_ms: opened,
        assigned_at_ms: 0,
        closed_at_ms: 0,
        resolution: String::new(),
        transfer_note: String::new(),
    };
    (conversation, consultation)
}

async fn desk_contract(store: impl DeskStore) {
    let agents: Vec<String> = vec!["ann".into(), "ben".into()];
    assert_eq!(
        store.route_next(&agents, 0, 1).await.expect("route"),
        Routed::Empty
    );
    for (i, id) in ["s1", "s2", "s3", "s4"].iter().enumerate() {
        let customer = format!("cust{i}");
        let (c, r) = support(id, &customer, 100 + i as u64);
        // Opened with its first message, in the same step.
        assert_eq!(
            store
                .open(&c, &r, &outgoing(id, &customer, "first", "hello"))
                .await
                .expect("open"),
            Sent::Stored(1)
        );
    }
    let first = store
        .history("s2", Range::Latest, 10)
        .await
        .expect("history");
    assert_eq!(
        first
            .messages
            .iter()
            .map(|m| m.body.as_str())
            .collect::<Vec<_>>(),
        ["hello"]
    );
    assert_eq!(store.queue_position("s3").await.expect("pos"), Some(3));
    let queue = store.queue(2).await.expect("queue");
    assert_eq!(
        queue.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["s1", "s2"]
    );
    assert_eq!(queue[0].state, ConsultationState::Queued);
    assert_eq!(
        store.route_next(&[], 0, 1).await.expect("route"),
        Routed::NoAgent,
        "nobody available"
    );

    // Oldest first, to the least loaded; ties go to the earlier candidate; capacity holds.
    let mut got = Vec::new();
    for _ in 0..3 {
        match store.route_next(&agents, 2, 200).await.expect("route") {
            Routed::Assigned { id, agent_id } => got.push((id, agent_id)),
            other => panic!("expected an assignment, got {other:?}"),
        }
    }
    let got: Vec<(&str, &str)> = got.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(got, [("s1", "ann"), ("s2", "ben"), ("s3", "ann")]);
    assert_eq!(store.loads(&agents).await.expect("loads"), [2, 1]);
    assert_eq!(
        store.route_next(&agents[..1], 2, 300).await.expect("route"),
        Routed::NoAgent,
        "ann is full"
    );
    let s1 = store.consultation("s1").await.expect("get").expect("s1");
    assert_eq!(
        (s1.state, s1.agent_id.as_str(), s1.assigned_at_ms),
        (ConsultationState::Assigned, "ann", 200)
    );
    let c1 = store.conversation("s1").await.expect("get").expect("s1");
    assert!(c1.is_member("ann") && c1.is_member("cust0"));
    assert!(
        store
            .user_conversations("ann")
            .await
            .expect("index")
            .contains(&"s1".to_string())
    );
    assert_eq!(store.queue_position("s1").await.expect("pos"), None);
    assert_eq!(store.queue_position("s4").await.expect("pos"), Some(1));
    // Several at once, in the order asked, with positions only while queued.
    let found: Vec<Option<(String, ConsultationState, Option<u32>)>> = store
        .consultations(&["s4".into(), "nope".into(), "s1".into()])
        .await
        .expect("consultations")
        .into_iter()
        .map(|c| c.map(|(r, position)| (r.id, r.state, position)))
        .collect();
    assert_eq!(
        found,
        [
            Some(("s4".into(), ConsultationState::Queued, Some(1))),
            None,
            Some(("s1".into(), ConsultationState::Assigned, None)),
        ]
    );
    assert!(store.consultations(&[]).await.expect("none").is_empty());

    // Accept only what is queued.
    assert_eq!(
        store.accept("s1", "ben", 1).await.expect("accept"),
        Step::WrongState(ConsultationState::Assigned)
    );
    assert_eq!(
        store.accept("nope", "ben", 1).await.expect("accept"),
        Step::NotFound
    );
    assert_eq!(
        store.accept("s4", "ben", 400).await.expect("accept"),
        Step::Done("ben".into())
    );
    assert_eq!(store.loads(&agents).await.expect("loads"), [2, 2]);
    assert!(store.queue(10).await.expect("queue").is_empty());

    // Transfer moves load and membership, only from the holder.
    assert_eq!(
        store.transfer("s1", "ben", "cat", "", 1).await.expect("t"),
        Step::Moved("ann".into())
    );
    assert_eq!(
        store
            .transfer("s1", "ann", "ben", "vip", 500)
            .await
            .expect("t"),
        Step::Done("ben".into())
    );
    assert_eq!(store.loads(&agents).await.expect("loads"), [1, 3]);
    let c1 = store.conversation("s1").await.expect("get").expect("s1");
    assert!(
        c1.is_member("ben") && !c1.is_member("ann"),
        "{:?}",
        c1.members
    );
    let member = |user: &'static str| {
        let store = &store;
        async move {
            store
                .membership("s1", user)
                .await
                .expect("membership")
                .map(|m| m.member)
        }
    };
    assert_eq!(
        (member("ben").await, member("ann").await),
        (Some(true), Some(false)),
        "the constant-time check agrees with the record after a transfer"
    );
    assert!(
        !store
            .user_conversations("ann")
            .await
            .expect("index")
            .contains(&"s1".to_string())
    );
    assert_eq!(
        store
            .consultation("s1")
            .await
            .expect("get")
            .expect("s1")
            .transfer_note,
        "vip"
    );

    // Close frees the load and makes the conversation read-only; only once.
    assert_eq!(
        store.close("s1", "done", 600).await.expect("close"),
        Step::Done("ben".into())
    );
    assert_eq!(store.loads(&agents).await.expect("loads"), [1, 2]);
    assert_eq!(
        store.close("s1", "again", 700).await.expect("close"),
        Step::WrongState(ConsultationState::Closed)
    );
    let s1 = store.consultation("s1").await.expect("get").expect("s1");
    assert_eq!(
        (s1.state, s1.resolution.as_str(), s1.closed_at_ms),
        (ConsultationState::Closed, "done", 600)
    );
    assert!(
        store
            .conversation("s1")
            .await
            .expect("get")
            .expect("s1")
            .read_only
    );
    assert_eq!(
        store
            .send(&outgoing("s1", "cust0", "late", "x"))
            .await
            .expect("send"),
        Sent::ReadOnly
    );
    assert_eq!(
        store.transfer("s1", "ben", "ann", "", 1).await.expect("t"),
        Step::WrongState(ConsultationState::Closed)
    );
    // Closing a queued one takes it off the queue.
    let (c, r) = support("s5", "cust5", 900);
    store
        .open(&c, &r, &outgoing("s5", "cust5", "first", "hi"))
        .await
        .expect("open");
    assert_eq!(
        store.close("s5", "", 901).await.expect("close"),
        Step::Done(String::new())
    );
    assert!(store.queue(10).await.expect("queue").is_empty());
    assert_eq!(store.loads(&agents).await.expect("loads"), [1, 2]);
}

#[tokio::test]
async fn memory_engine_meets_the_contract() {
    let bus = MemoryBus::new();
    contract(MemoryStore::new(bus.clone(), 100), Arc::new(bus), 100).await;
}

#[tokio::test]
async fn memory_engine_meets_the_desk_contract() {
    desk_contract(MemoryStore::new(MemoryBus::new(), 100)).await;
}

#[tokio::test]
async fn redis_engine_meets_the_desk_contract() {
    let redis = RedisServer::spawn().expect("redis");
    let client = redis::Client::open(redis.url()).expect("client");
    let conn = redis_conn::node(&client).expect("manager");
    desk_contract(RedisStore::new(conn.clone(), 100)).await;
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut conn.clone())
        .await
        .expect("flush");
    let instances = (0..3)
        .map(|_| {
            Arc::new(RedisStore::new(
                redis_conn::node(&client).expect("manager"),
                100,
            ))
        })
        .collect();
    desk_race_contract(instances).await;
}

/// Lists under the untagged names of earlier builds move to the tagged ones, merged with
/// what the new ones hold already (the later rank wins); a second run finds nothing.
#[tokio::test]
async fn redis_engine_moves_user_lists_of_earlier_builds_to_their_tagged_names() {
    let redis = RedisServer::spawn().expect("redis");
    let client = redis::Client::open(redis.url()).expect("client");
    let conn = redis_conn::node(&client).expect("manager");
    let store = RedisStore::new(conn.clone(), 100);
    store.create(&group("c2", &["old"])).await.expect("create");
    let mut raw = conn.clone();
    let () = redis::pipe()
        .zadd("sb:msg:user:old:convs", "c1", 100)
        .ignore()
        .zadd("sb:msg:user:old:convs", "c2", 5000)
        .ignore()
        .sadd("sb:msg:user:old:wide", "w1")
        .ignore()
        .zadd("sb:msg:user:other:convs", "c3", 300)
        .ignore()
        .set("sb:msg:user:unrelated", "x")
        .ignore()
        .query_async(&mut raw)
        .await
        .expect("old lists");
    assert_eq!(store.migrate_user_lists().await.expect("migrate"), 3);
    let mut lists = store.user_conversations("old").await.expect("lists");
    lists.sort();
    assert_eq!(lists, ["c1", "c2", "w1"]);
    assert_eq!(
        store.user_conversations("other").await.expect("lists"),
        ["c3"]
    );
    let rank: Option<u64> = redis::cmd("ZSCORE")
        .arg("sb:msg:user:{u:old}:convs")
        .arg("c2")
        .query_async(&mut raw)
        .await
        .expect("rank");
    assert_eq!(rank, Some(5000), "the later rank of the two");
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("sb:msg:user:*")
        .query_async(&mut raw)
        .await
        .expect("keys");
    assert!(
        left.iter()
            .all(|k| k.starts_with("sb:msg:user:{u:") || k == "sb:msg:user:unrelated"),
        "{left:?}"
    );
    assert_eq!(store.migrate_user_lists().await.expect("again"), 0);
}

#[tokio::test]
async fn memory_engine_routes_at_once_without_double_assignment() {
    let store = Arc::new(MemoryStore::new(MemoryBus::new(), 100));
    desk_race_contract(vec![store.clone(), store.clone(), store]).await;
}

/// Consultations the race opens, agents, and each agent's capacity: room for 20 of 30.
const RACE_OPENED: usize = 30;
const RACE_AGENTS: usize = 4;
const RACE_CAPACITY: u32 = 5;

/// Several instances (`stores`, two routers each) route one queue at the same time: each
/// consultation goes to one agent once, nobody gets more than their capacity, every load is
/// what its agent holds, and what found no room stays queued.
async fn desk_race_contract<S: DeskStore + Send + Sync + 'static>(stores: Vec<Arc<S>>) {
    let agents: Vec<String> = (0..RACE_AGENTS).map(|i| format!("racer{i}")).collect();
    for i in 0..RACE_OPENED {
        let (id, customer) = (format!("race{i:02}"), format!("rc{i}"));
        let (c, r) = support(&id, &customer, 100 + i as u64);
        stores[0]
            .open(&c, &r, &outgoing(&id, &customer, "first", "hi"))
            .await
            .expect("open");
    }
    let mut routers = Vec::new();
    for store in stores.iter().chain(stores.iter()) {
        let (store, agents) = (store.clone(), agents.clone());
        routers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..RACE_OPENED * 4 {
                match store.route_next(&agents, RACE_CAPACITY, 1000).await {
                    Ok(Routed::Assigned { id, agent_id }) => got.push((id, agent_id)),
                    Ok(Routed::Empty | Routed::NoAgent) => break,
                    // Lost the head to the others too often in a row: route again, as the
                    // desk's next pass would.
                    Err(e) => assert!(e.to_string().contains("changed too often"), "{e}"),
                }
            }
            got
        }));
    }
    let mut assigned: Vec<(String, String)> = Vec::new();
    for r in routers {
        assigned.extend(r.await.expect("router"));
    }
    let room = RACE_AGENTS * RACE_CAPACITY as usize;
    assert_eq!(assigned.len(), room, "{assigned:?}");
    let mut ids: Vec<&str> = assigned.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        room,
        "a consultation was assigned twice: {assigned:?}"
    );
    let store = &stores[0];
    let loads = store.loads(&agents).await.expect("loads");
    for (agent, load) in agents.iter().zip(&loads) {
        let held = assigned.iter().filter(|(_, a)| a == agent).count();
        assert_eq!(*load as usize, held, "{agent}'s load");
        assert!(held <= RACE_CAPACITY as usize, "{agent} holds {held}");
    }
    for (id, agent) in &assigned {
        let r = store.consultation(id).await.expect("get").expect("stored");
        assert_eq!(
            (r.state, r.agent_id.as_str()),
            (ConsultationState::Assigned, agent.as_str())
        );
    }
    let left = store.queue(100).await.expect("queue");
    assert_eq!(left.len(), RACE_OPENED - room);
    // The oldest went first.
    assert!(left.iter().all(|r| !ids.contains(&r.id.as_str())));
    assert!(
        left.iter().all(|r| r.opened_at_ms >= 100 + room as u64),
        "{left:?}"
    );
}

/// A batch over conversations of every master, right after one conversation's slot moved
/// to another master (the store's read of the masters is stale then): every send is
/// stored once, in order, with its own seq.
async fn sends_right_after_a_slot_moved(cluster: &switchboard_tests::redis::RedisCluster) {
    let store = RedisStore::new(cluster.conn(), 100);
    let ids: Vec<String> = (0..9).map(|c| format!("moving{c}")).collect();
    for id in &ids {
        store.create(&group(id, &["a", "b"])).await.expect("create");
    }
    let round = |n: usize| -> Vec<Outgoing> {
        ids.iter()
            .map(|id| outgoing(id, "a", &format!("{id}-{n}"), &format!("{n}")))
            .collect()
    };
    for r in store.send_batch(&round(1)).await {
        assert_eq!(r.expect("stored"), Sent::Stored(1));
    }
    let meta = |id: &str| format!("sb:msg:{{c:{id}}}:meta");
    let from = cluster.master_of(&meta(&ids[0])).expect("master");
    let to = ids
        .iter()
        .map(|id| cluster.master_of(&meta(id)).expect("master"))
        .find(|&m| m != from)
        .expect("conversations on another master");
    cluster
        .move_slot(&meta(&ids[0]), to)
        .expect("move the slot");
    for (i, r) in store.send_batch(&round(2)).await.into_iter().enumerate() {
        let sent = r.expect("stored after the move");
        assert!(
            matches!(sent, Sent::Stored(2) | Sent::Duplicate { seq: 2, .. }),
            "{}: {sent:?}",
            ids[i]
        );
    }
    for id in &ids {
        let page = store
            .history(id, Range::After(0), 10)
            .await
            .expect("history");
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [1, 2], "{id}");
    }
}

/// What a crashed step leaves behind on a cluster (written here as the crash would have
/// left it) is skipped, counts only against an agent's room, is kept while it could still
/// be a step in flight, and is dropped by the repair after the grace.
async fn desk_repair_on_a_cluster(cluster: &switchboard_tests::redis::RedisCluster) {
    use switchboard_messaging::store::cluster_desk::GRACE_MS;
    let store = RedisStore::new(cluster.conn(), 100);
    let mut raw = cluster.conn();
    for (id, customer, opened) in [("r1", "cust1", 100), ("r2", "cust2", 110)] {
        let (c, r) = support(id, customer, opened);
        store
            .open(&c, &r, &outgoing(id, customer, "first", "hi"))
            .await
            .expect("open");
        assert!(matches!(
            store
                .route_next(&["ann".into()], 0, 200)
                .await
                .expect("route"),
            Routed::Assigned { .. }
        ));
    }
    let queue = "sb:support:{desk}:queue";
    let run = |cmd: &mut redis::Cmd| {
        let cmd = cmd.clone();
        let mut raw = raw.clone();
        async move {
            cmd.query_async::<redis::Value>(&mut raw)
                .await
                .expect("raw")
        }
    };
    // An opener died after queueing; a router died after reserving ben's room; another
    // died before taking its consultation off the queue; a closer died after the record.
    run(redis::cmd("ZADD").arg(queue).arg(150).arg("ghost")).await;
    run(redis::cmd("ZADD")
        .arg("sb:support:{desk}:agent:ben")
        .arg(200_000)
        .arg("r1"))
    .await;
    run(redis::cmd("SADD")
        .arg("sb:support:{desk}:agents")
        .arg("ben"))
    .await;
    run(redis::cmd("ZADD").arg(queue).arg(100).arg("r1")).await;
    run(redis::cmd("HSET")
        .arg("sb:msg:{c:r2}:consultation")
        .arg("state")
        .arg("closed"))
    .await;

    let agents: Vec<String> = vec!["ann".into(), "ben".into()];
    assert!(
        store.queue(10).await.expect("queue").is_empty(),
        "stale entries listed"
    );
    assert_eq!(
        store.loads(&agents).await.expect("loads"),
        [2, 1],
        "stale room counts"
    );
    assert_eq!(
        store.route_next(&agents, 1, 300).await.expect("route"),
        Routed::Empty,
        "nothing queued: a stale entry is never routed"
    );
    assert_eq!(
        store.repair(300).await.expect("repair"),
        0,
        "all could be in flight"
    );
    assert_eq!(store.loads(&agents).await.expect("loads"), [2, 1]);
    assert_eq!(store.repair(200 + GRACE_MS + 1).await.expect("repair"), 3);
    assert_eq!(store.loads(&agents).await.expect("loads"), [1, 0]);
    assert_eq!(store.queue_position("ghost").await.expect("pos"), None);
    assert_eq!(store.repair(200 + GRACE_MS + 2).await.expect("repair"), 0);
    let ben_known: bool = redis::cmd("SISMEMBER")
        .arg("sb:support:{desk}:agents")
        .arg("ben")
        .query_async(&mut raw)
        .await
        .expect("sismember");
    assert!(!ben_known, "an agent without reservations is forgotten");
    // What the repair kept still works: ann's r1 closes and frees her room.
    assert_eq!(
        store.close("r1", "done", 400).await.expect("close"),
        Step::Done("ann".into())
    );
    assert_eq!(store.loads(&agents).await.expect("loads"), [0, 0]);
}

#[tokio::test]
async fn redis_engine_meets_the_contract() {
    let redis = RedisServer::spawn().expect("redis");
    let client = redis::Client::open(redis.url()).expect("client");
    let conn = redis_conn::node(&client).expect("manager");
    let shutdown = CancellationToken::new();
    let bus = RedisBus::start(client, conn.clone(), shutdown.clone());
    contract(RedisStore::new(conn, 100), Arc::new(bus), 100).await;
    shutdown.cancel();
}

/// Every page of `user`'s list, `limit` at a time; checks that only the last page says
/// nothing more follows and that no page is longer than asked.
async fn listing(store: &impl MessagingStore, user: &str, limit: usize) -> Vec<Ranked> {
    let mut all: Vec<Ranked> = Vec::new();
    for _ in 0..100 {
        let (page, more) = store.ranked(user, all.last(), limit).await.expect("a page");
        assert!(page.len() <= limit, "a page of {} for {limit}", page.len());
        if more {
            assert_eq!(page.len(), limit, "a short page before the last");
        }
        all.extend(page);
        if !more {
            return all;
        }
    }
    panic!("paging {user}'s list does not end");
}

fn ranks(list: &[(u64, &str)]) -> Vec<Ranked> {
    list.iter()
        .map(|(at, id)| (*at, (*id).to_owned()))
        .collect()
}

/// A conversation ranks in each member's list by the later of its newest message and the
/// member's joining, newest first, ties by id; pages continue exactly after their cursor;
/// groups past Redis's wide limit rank the same way.
async fn ranking_contract(store: impl MessagingStore) {
    // Joined at 1000 + position: u joins n1 at 1000, n2 at 1001, n3 at 1000.
    for (id, members) in [("n1", ["u", "v"]), ("n2", ["v", "u"])] {
        store.create(&group(id, &members)).await.expect("create");
    }
    store.create(&group("n3", &["u"])).await.expect("create");
    let expected = ranks(&[(1001, "n2"), (1000, "n3"), (1000, "n1")]);
    for limit in [1, 2, 3, 10] {
        assert_eq!(
            listing(&store, "u", limit).await,
            expected,
            "pages of {limit}"
        );
    }
    assert_eq!(
        listing(&store, "v", 10).await,
        ranks(&[(1001, "n1"), (1000, "n2")])
    );

    // A message raises the conversation for every member; one stamped earlier (another
    // instance's clock) moves nothing back.
    store
        .send(&outgoing_at("n1", "v", "r1", 5000))
        .await
        .expect("send");
    store
        .send(&outgoing_at("n1", "v", "r2", 4000))
        .await
        .expect("send");
    assert_eq!(
        listing(&store, "u", 2).await,
        ranks(&[(5000, "n1"), (1001, "n2"), (1000, "n3")])
    );
    assert_eq!(
        listing(&store, "v", 1).await,
        ranks(&[(5000, "n1"), (1000, "n2")])
    );

    // A wide group from the start: one member past the limit.
    let crowd: Vec<String> = (0..WIDE_MEMBERS).map(|i| format!("w{i:02}")).collect();
    let mut members = vec!["u"];
    members.extend(crowd.iter().map(String::as_str));
    store.create(&group("w", &members)).await.expect("create w");
    assert_eq!(
        listing(&store, "u", 1).await,
        ranks(&[(5000, "n1"), (1001, "n2"), (1000, "w"), (1000, "n3")])
    );
    store
        .send(&outgoing_at("w", "w05", "w1", 6000))
        .await
        .expect("send");
    assert_eq!(
        listing(&store, "u", 3).await,
        ranks(&[(6000, "w"), (5000, "n1"), (1001, "n2"), (1000, "n3")])
    );
    assert_eq!(listing(&store, "w01", 10).await, ranks(&[(6000, "w")]));

    // n3 grows past the limit: its old member keeps its rank, the new ones rank by joining,
    // and a message raises it for all.
    let newcomers: Vec<String> = (0..WIDE_MEMBERS).map(|i| format!("x{i:02}")).collect();
    store
        .add_members("n3", &newcomers, 7000)
        .await
        .expect("add")
        .expect("n3");
    assert_eq!(listing(&store, "x01", 10).await, ranks(&[(7000, "n3")]));
    assert_eq!(
        listing(&store, "u", 10).await,
        ranks(&[(6000, "w"), (5000, "n1"), (1001, "n2"), (1000, "n3")])
    );
    store
        .send(&outgoing_at("n3", "x03", "x1", 8000))
        .await
        .expect("send");
    assert_eq!(
        listing(&store, "u", 2).await,
        ranks(&[(8000, "n3"), (6000, "w"), (5000, "n1"), (1001, "n2")])
    );
    assert_eq!(listing(&store, "x00", 10).await, ranks(&[(8000, "n3")]));
    let mut mine = store.user_conversations("u").await.expect("index");
    mine.sort();
    assert_eq!(mine, ["n1", "n2", "n3", "w"], "each conversation once");

    // Leaving takes it off one's list, wide or not.
    store
        .remove_member("w", "u", None)
        .await
        .expect("remove")
        .expect("w");
    store
        .remove_member("n2", "u", None)
        .await
        .expect("remove")
        .expect("n2");
    assert_eq!(
        listing(&store, "u", 10).await,
        ranks(&[(8000, "n3"), (5000, "n1")])
    );
    assert!(listing(&store, "nobody", 10).await.is_empty());
    assert_eq!(
        store
            .ranked("u", Some(&(0, String::new())), 10)
            .await
            .expect("past the end"),
        (Vec::new(), false)
    );
}

#[tokio::test]
async fn memory_engine_ranks_conversations() {
    ranking_contract(MemoryStore::new(MemoryBus::new(), 100)).await;
}

#[tokio::test]
async fn redis_engine_ranks_conversations() {
    let redis = RedisServer::spawn().expect("redis");
    let client = redis::Client::open(redis.url()).expect("client");
    let conn = redis_conn::node(&client).expect("manager");
    ranking_contract(RedisStore::new(conn.clone(), 100)).await;
    // The wide ones took the wide path: in the users' wide sets, not their ranked lists.
    let mut raw = conn;
    let (wide, ranked, newcomer): (Vec<String>, Vec<String>, Vec<String>) = redis::pipe()
        .smembers("sb:msg:user:{u:u}:wide")
        .zrange("sb:msg:user:{u:u}:convs", 0, -1)
        .zrange("sb:msg:user:{u:x01}:convs", 0, -1)
        .query_async(&mut raw)
        .await
        .expect("read the lists");
    assert_eq!(wide, ["n3"]);
    assert_eq!(ranked, ["n1"]);
    assert!(newcomer.is_empty(), "{newcomer:?}");
}

#[tokio::test]
async fn redis_wide_conversation_without_an_activity_key_ranks_by_joining() {
    let redis = RedisServer::spawn().expect("redis");
    let client = redis::Client::open(redis.url()).expect("client");
    let conn = redis_conn::node(&client).expect("manager");
    let store = RedisStore::new(conn.clone(), 100);
    let crowd: Vec<String> = (0..=WIDE_MEMBERS).map(|i| format!("m{i:02}")).collect();
    let members: Vec<&str> = crowd.iter().map(String::as_str).collect();
    store.create(&group("old", &members)).await.expect("create");
    // As written by a version without the activity key.
    let mut raw = conn.clone();
    let _: () = redis::cmd("DEL")
        .arg("sb:msg:{c:old}:activity")
        .query_async(&mut raw)
        .await
        .expect("del");
    assert_eq!(
        store.ranked("m07", None, 10).await.expect("page"),
        (ranks(&[(1007, "old")]), false),
        "the join time stands in for a missing activity"
    );
}

/// Groups far past the old 1,000-member cap: 100,000 members stored, read back, and a
/// send whose membership check does not depend on the group's size.
async fn large_group_contract(store: impl MessagingStore) {
    const N: usize = 100_000;
    let names: Vec<String> = (0..N).map(|i| format!("m{i:06}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    store
        .create(&group("big", &refs))
        .await
        .expect("create a 100k group");
    let record = store
        .conversation("big")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(record.members.len(), N);
    assert!(record.is_member("m099999"));
    assert_eq!(
        store
            .membership("big", "m099999")
            .await
            .expect("membership"),
        Some(Membership {
            member: true,
            epoch: "e1".into()
        })
    );
    assert_eq!(
        store
            .send(&outgoing("big", "m099999", "k1", "hello, everyone"))
            .await
            .expect("send"),
        Sent::Stored(1)
    );
    assert_eq!(
        store
            .send(&outgoing("big", "outsider", "k2", "let me in"))
            .await
            .expect("send"),
        Sent::NotMember
    );
    assert!(
        store
            .user_conversations("m050000")
            .await
            .expect("index")
            .contains(&"big".to_owned())
    );
}

#[tokio::test]
async fn memory_engine_holds_large_groups() {
    large_group_contract(MemoryStore::new(MemoryBus::new(), 100)).await;
}

#[tokio::test]
async fn redis_engine_holds_large_groups() {
    let redis = RedisServer::spawn().expect("redis");
    let client = redis::Client::open(redis.url()).expect("client");
    let conn = redis_conn::node(&client).expect("manager");
    large_group_contract(RedisStore::new(conn, 100)).await;
}

/// A batch of sends is stored in the order given, with one result per send, whatever each
/// one's fate; `flush` (Redis only) makes the server forget its scripts first, as a restart
/// does.
async fn batch_contract(store: impl MessagingStore, flush: impl AsyncFnOnce()) {
    store
        .create(&group("gb", &["a", "b"]))
        .await
        .expect("create");
    let first = store
        .send(&outgoing("gb", "a", "k0", "zero"))
        .await
        .expect("send");
    assert_eq!(first, Sent::Stored(1));
    flush().await;
    let batch = [
        outgoing("gb", "a", "k1", "one"),
        outgoing("gb", "z", "k2", "not a member"),
        outgoing("gb", "b", "k3", "three"),
        outgoing("gb", "a", "k0", "retry of zero"),
        outgoing("nope", "a", "k4", "no such conversation"),
        outgoing("gb", "a", "k5", "five"),
    ];
    let results: Vec<_> = store
        .send_batch(&batch)
        .await
        .into_iter()
        .map(|r| r.expect("stored or refused, not failed"))
        .collect();
    assert_eq!(
        results,
        [
            Sent::Stored(2),
            Sent::NotMember,
            Sent::Stored(3),
            Sent::Duplicate {
                seq: 1,
                message_id: "id-k0".into(),
                sent_at_ms: 5,
            },
            Sent::NotFound,
            Sent::Stored(4),
        ]
    );
    let page = store
        .history("gb", Range::After(0), 10)
        .await
        .expect("history");
    assert_eq!(
        page.messages
            .iter()
            .map(|m| m.body.as_str())
            .collect::<Vec<_>>(),
        ["zero", "one", "three", "five"]
    );
    assert!(store.send_batch(&[]).await.is_empty());

    // Many conversations in one batch (on a cluster: several per master, one pipeline
    // each), interleaved: each keeps its own order and gapless seqs.
    const SPREAD: usize = 12;
    for c in 0..SPREAD {
        store
            .create(&group(&format!("spread{c}"), &["a", "b"]))
            .await
            .expect("create");
    }
    let interleaved: Vec<Outgoing> = (0..SPREAD * 3)
        .map(|k| {
            outgoing(
                &format!("spread{}", k % SPREAD),
                "a",
                &format!("s{k}"),
                &format!("m{k}"),
            )
        })
        .collect();
    let results = store.send_batch(&interleaved).await;
    for (k, r) in results.into_iter().enumerate() {
        assert_eq!(
            r.expect("stored"),
            Sent::Stored(1 + (k / SPREAD) as u64),
            "send {k}"
        );
    }
    for c in 0..SPREAD {
        let page = store
            .history(&format!("spread{c}"), Range::After(0), 10)
            .await
            .expect("history");
        let bodies: Vec<String> = page.messages.into_iter().map(|m| m.body).collect();
        let expected: Vec<String> = (0..3)
            .map(|round| format!("m{}", round * SPREAD + c))
            .collect();
        assert_eq!(bodies, expected, "spread{c}");
    }
}

#[tokio::test]
async fn memory_engine_stores_a_batch_in_order() {
    batch_contract(MemoryStore::new(MemoryBus::new(), 100), async || {}).await;
}

#[tokio::test]
async fn redis_engine_stores_a_batch_in_order_even_after_losing_its_scripts() {
    let redis = RedisServer::spawn().expect("redis");
    let client = redis::Client::open(redis.url()).expect("client");
    let conn = redis_conn::node(&client).expect("manager");
    let mut admin = conn.clone();
    batch_contract(RedisStore::new(conn, 100), async move || {
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut admin)
            .await
            .expect("script flush");
    })
    .await;
}

/// Every messaging contract on one Redis Cluster (three masters, three replicas), one
/// after the other on a flushed cluster, since starting a cluster is the slow part.
#[tokio::test]
async fn cluster_engine_meets_every_contract() {
    let cluster = switchboard_tests::redis::RedisCluster::spawn().expect("cluster");
    let shutdown = CancellationToken::new();
    let bus = cluster.bus(&shutdown);
    contract(RedisStore::new(cluster.conn(), 100), Arc::new(bus), 100).await;
    shutdown.cancel();

    cluster.flush().await.expect("flush");
    ranking_contract(RedisStore::new(cluster.conn(), 100)).await;

    cluster.flush().await.expect("flush");
    let urls = cluster.urls();
    batch_contract(RedisStore::new(cluster.conn(), 100), async move || {
        // Every node forgets its scripts, as after a restart.
        for url in &urls {
            let client = redis::Client::open(url.as_str()).expect("client");
            let mut node = client
                .get_multiplexed_async_connection()
                .await
                .expect("node");
            let () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut node)
                .await
                .expect("script flush");
        }
    })
    .await;

    cluster.flush().await.expect("flush");
    sends_right_after_a_slot_moved(&cluster).await;

    cluster.flush().await.expect("flush");
    // Waiting for a replica, as the cluster overlay runs it: every open is confirmed.
    desk_contract(RedisStore::new(cluster.conn(), 100).with_ack(Some((1, Duration::from_secs(2)))))
        .await;

    cluster.flush().await.expect("flush");
    // Three instances' stores, each on its own cluster connection.
    desk_race_contract(
        (0..3)
            .map(|_| Arc::new(RedisStore::new(cluster.conn(), 100)))
            .collect(),
    )
    .await;

    cluster.flush().await.expect("flush");
    desk_repair_on_a_cluster(&cluster).await;
}

/// With replicas to wait for and none there, a send is stored but answers UNAVAILABLE
/// saying so, and so does its retry; without the setting the same store acknowledges.
#[tokio::test]
async fn redis_sends_wait_for_replicas_when_asked_and_say_so_when_they_do_not_come() {
    let redis = RedisServer::spawn().expect("redis");
    let client = redis::Client::open(redis.url()).expect("client");
    let conn = redis_conn::node(&client).expect("manager");
    let store = RedisStore::new(conn.clone(), 100).with_ack(Some((1, Duration::from_millis(50))));
    store
        .create(&group("acked", &["a", "b"]))
        .await
        .expect("create");
    for attempt in 0..2 {
        let refused = store
            .send(&outgoing("acked", "a", "k1", "hello"))
            .await
            .expect_err("no replica confirmed it");
        assert!(
            matches!(
                &refused,
                switchboard_messaging::error::Error::Unavailable { cause, .. }
                    if cause.contains("0 of 1") && cause.contains("same client_msg_id")
            ),
            "attempt {attempt}: {refused:?}"
        );
    }
    let refused = store
        .send_batch(&[outgoing("acked", "a", "k2", "two")])
        .await;
    assert!(refused[0].is_err(), "{refused:?}");
    let plain = RedisStore::new(conn, 100);
    let h = plain
        .history("acked", Range::Latest, 10)
        .await
        .expect("history");
    assert_eq!(
        h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [1, 2],
        "stored once each, retries included"
    );
    assert!(matches!(
        plain.send(&outgoing("acked", "a", "k1", "hello")).await,
        Ok(Sent::Duplicate { seq: 1, .. })
    ));

    // A consultation has no idempotency key: unconfirmed, it says so by its id, so the
    // customer looks for it rather than opening a second one.
    let (c, r) = support("waited", "cust", 100);
    let refused = store
        .open(&c, &r, &outgoing("waited", "cust", "first", "help"))
        .await
        .expect_err("no replica confirmed the consultation");
    assert!(
        matches!(
            &refused,
            switchboard_messaging::error::Error::Unavailable { cause, .. }
                if cause.contains("'waited'") && cause.contains("0 of 1") && cause.contains("before opening another")
        ),
        "{refused:?}"
    );
    let stored = plain.consultation("waited").await.expect("get");
    assert_eq!(stored.map(|r| r.state), Some(ConsultationState::Queued));
    assert_eq!(plain.queue_position("waited").await.expect("pos"), Some(1));
}
