//! The presence storage contract, run against the in-memory engine and a real Redis.

use std::sync::Arc;
use std::time::Duration;

use switchboard_common::bus::{Bus, BusEvent, MemoryBus, RedisBus};
use switchboard_common::redis_conn;
use switchboard_common::shutdown::CancellationToken;
use switchboard_presence::model::{Change, Session, State};
use switchboard_presence::store::memory::MemoryStore;
use switchboard_presence::store::redis::RedisStore;
use switchboard_presence::store::{Live, PresenceStore, user_channel};
use switchboard_proto::presence::v1 as pb;
use switchboard_tests::redis::RedisServer;

fn session(id: &str, state: State, started: u64) -> Session {
    Session {
        session_id: id.into(),
        state: state.to_proto(),
        role: 2,
        started_at_ms: started,
        custom_text: format!("{id} text"),
        ..Default::default()
    }
}

fn live(user: &str, session: &str) -> Live {
    Live {
        user_id: user.into(),
        session_id: session.into(),
        role: 2,
    }
}

async fn contract(store: impl PresenceStore, bus: Arc<dyn Bus>) {
    let mut changes = bus.subscribe(&user_channel("u1")).await.expect("subscribe");
    let p = store
        .put_session("u1", &session("phone", State::Away, 1), 10_000, 1_000)
        .await
        .expect("put");
    assert_eq!(
        (p.state, p.session_count),
        (pb::PresenceState::Away as i32, 1)
    );
    let p = store
        .put_session("u1", &session("laptop", State::Available, 2), 10_000, 1_000)
        .await
        .expect("put");
    assert_eq!(
        (p.state, p.session_count, p.custom_text.as_str()),
        (pb::PresenceState::Available as i32, 2, "laptop text")
    );
    let mut versions = Vec::new();
    for _ in 0..2 {
        let Some(BusEvent::Message(payload)) =
            tokio::time::timeout(Duration::from_secs(3), changes.recv())
                .await
                .expect("published")
        else {
            panic!("no change")
        };
        let change: Change = prost::Message::decode(&*payload).expect("change");
        versions.push(change.version);
    }
    assert!(
        versions[1] > versions[0],
        "versions must increase: {versions:?}"
    );

    // Unknown users are offline; Get keeps the order asked.
    let rows = store
        .get(&["nobody".into(), "u1".into()], 1_000)
        .await
        .expect("get");
    assert_eq!(rows[0].1.state, pb::PresenceState::Offline as i32);
    assert_eq!(rows[0].1.last_seen, None);
    assert_eq!(rows[1].0, versions[1]);
    assert_eq!(store.online(2).await.expect("online"), ["u1"]);
    assert!(store.online(1).await.expect("online").is_empty());

    // Dropping: the last session sets last seen; a second drop finds nothing.
    let p = store
        .drop_session("u1", "laptop", 2_000)
        .await
        .expect("drop")
        .expect("was there");
    assert_eq!(
        (p.state, p.session_count),
        (pb::PresenceState::Away as i32, 1)
    );
    assert!(
        store
            .drop_session("u1", "laptop", 2_000)
            .await
            .expect("drop again")
            .is_none()
    );
    let p = store
        .drop_session("u1", "phone", 3_000)
        .await
        .expect("drop")
        .expect("was there");
    assert_eq!(
        (p.state, p.session_count),
        (pb::PresenceState::Offline as i32, 0)
    );
    assert_eq!(p.last_seen.map(|t| t.seconds), Some(3));
    assert!(store.online(2).await.expect("online").is_empty());

    // Expiry: touched sessions survive a sweep, stale ones go; sweeping twice is harmless.
    store
        .put_session("u2", &session("a", State::Busy, 1), 5_000, 1_000)
        .await
        .expect("put");
    store
        .put_session("u2", &session("b", State::Busy, 1), 5_000, 1_000)
        .await
        .expect("put");
    store
        .touch(&[live("u2", "b")], 20_000)
        .await
        .expect("touch");
    assert_eq!(store.sweep(6_000, 100).await.expect("sweep"), 1);
    assert_eq!(store.sweep(6_000, 100).await.expect("sweep again"), 0);
    let rows = store.get(&["u2".into()], 6_000).await.expect("get");
    assert_eq!(rows[0].1.session_count, 1);
    // Touching a removed session does not bring it back.
    store
        .touch(&[live("u2", "a")], 30_000)
        .await
        .expect("touch gone");
    assert_eq!(store.sweep(25_000, 100).await.expect("sweep"), 1);
    assert_eq!(
        store.get(&["u2".into()], 25_000).await.expect("get")[0]
            .1
            .session_count,
        0
    );
}

#[tokio::test]
async fn memory_engine_meets_the_contract() {
    let bus = MemoryBus::new();
    contract(MemoryStore::new(bus.clone()), Arc::new(bus)).await;
}

#[tokio::test]
async fn redis_engine_meets_the_contract() {
    let redis = RedisServer::spawn().expect("redis");
    let client = redis::Client::open(redis.url()).expect("client");
    let conn = redis_conn::node(&client).expect("manager");
    let shutdown = CancellationToken::new();
    let bus = RedisBus::start(client, conn.clone(), shutdown.clone());
    contract(RedisStore::new(conn), Arc::new(bus)).await;
    shutdown.cancel();
}

/// Both on one cluster, one after the other (starting a cluster is the slow part).
#[tokio::test]
async fn cluster_engine_meets_the_contract_and_its_indexes_repair_themselves() {
    let cluster = switchboard_tests::redis::RedisCluster::spawn().expect("cluster");
    let shutdown = CancellationToken::new();
    let bus = cluster.bus(&shutdown);
    contract(RedisStore::new(cluster.conn()), Arc::new(bus)).await;
    shutdown.cancel();
    cluster.flush().await.expect("flush");
    let conn = cluster.conn();
    index_repair(RedisStore::new(conn.clone()), conn).await;
}

/// The Redis indexes outside a user's slot mend what a crash or a race between two steps
/// leaves: a role-set entry without sessions is left out and removed, a live user missing
/// from its role set is back after its next refresh, and an expiry entry without a
/// session is swept as nothing.
async fn index_repair(store: RedisStore, conn: redis_conn::RedisConn) {
    let mut raw = conn;
    let _: () = redis::cmd("SADD")
        .arg("sb:presence:online:2")
        .arg("ghost")
        .query_async(&mut raw)
        .await
        .expect("a stale entry");
    store
        .put_session("here", &session("s", State::Available, 1), 50_000, 1_000)
        .await
        .expect("put");
    assert_eq!(store.online(2).await.expect("online"), ["here"]);
    let left: Vec<String> = redis::cmd("SMEMBERS")
        .arg("sb:presence:online:2")
        .query_async(&mut raw)
        .await
        .expect("members");
    assert_eq!(left, ["here"], "the stale entry was not removed");

    let _: () = redis::cmd("SREM")
        .arg("sb:presence:online:2")
        .arg("here")
        .query_async(&mut raw)
        .await
        .expect("a racing drop's removal");
    assert!(store.online(2).await.expect("online").is_empty());
    store
        .touch(&[live("here", "s")], 60_000)
        .await
        .expect("refresh");
    assert_eq!(store.online(2).await.expect("online"), ["here"]);

    let _: () = redis::cmd("ZADD")
        .arg("sb:presence:expiry")
        .arg(1)
        .arg("nobody|s")
        .query_async(&mut raw)
        .await
        .expect("an orphan expiry entry");
    assert_eq!(store.sweep(2_000, 100).await.expect("sweep"), 0);
    let orphans: Vec<String> = redis::cmd("ZRANGE")
        .arg("sb:presence:expiry")
        .arg(0)
        .arg(-1)
        .query_async(&mut raw)
        .await
        .expect("expiry");
    assert_eq!(orphans, ["here|s"], "the orphan entry stayed");
}

#[tokio::test]
async fn redis_indexes_repair_themselves() {
    let redis = RedisServer::spawn().expect("redis");
    let client = redis::Client::open(redis.url()).expect("client");
    let conn = redis_conn::node(&client).expect("manager");
    index_repair(RedisStore::new(conn.clone()), conn).await;
}
