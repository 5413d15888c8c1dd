//! Revocations and the bus, against both engines, with several followers ("instances")
//! on one Redis, and through a dropped pub/sub connection.

use std::sync::Arc;
use std::time::Duration;

use switchboard_common::bus::{Bus, BusEvent, MemoryBus, RedisBus};
use switchboard_common::redis_conn;
use switchboard_common::revocation::{
    MemoryRevocations, RedisRevocations, RevocationList, RevocationStore, follow,
};
use switchboard_common::shutdown::CancellationToken;
use switchboard_common::token::now_secs;
use switchboard_tests::auth::redis_revocation_follower;
use switchboard_tests::eventually;
use switchboard_tests::redis::RedisServer;

async fn revoked_soon(list: &RevocationList, sid: &str) -> bool {
    eventually(Duration::from_secs(3), || async {
        list.is_revoked(sid, now_secs()).then_some(())
    })
    .await
    .is_some()
}

#[tokio::test]
async fn memory_engine_revocations_reach_followers() {
    let bus = MemoryBus::new();
    let store = MemoryRevocations::new(bus.clone());
    let shutdown = CancellationToken::new();
    let list = Arc::new(RevocationList::default());
    follow(
        list.clone(),
        Arc::new(bus),
        Arc::new(store.clone()),
        shutdown.clone(),
    )
    .await;
    store.revoke("s1", now_secs() + 60).await.expect("revoke");
    assert!(revoked_soon(&list, "s1").await);
    store
        .revoke("old", now_secs().saturating_sub(10))
        .await
        .expect("revoke expired");
    assert!(
        !list.is_revoked("old", now_secs()),
        "an expired revocation is still in force"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn redis_revocations_reach_every_instance_even_across_a_dropped_subscription() {
    let redis = RedisServer::spawn().expect("redis");
    let shutdown = CancellationToken::new();
    let client = redis::Client::open(redis.url()).expect("client");
    let mut lists = Vec::new();
    // Three "instances": each its own bus (one pub/sub connection) and list.
    for _ in 0..3 {
        lists.push(redis_revocation_follower(&redis.url(), &shutdown).await);
    }
    let writer = RedisRevocations::new(redis_conn::node(&client).expect("manager"));
    writer.revoke("s1", now_secs() + 60).await.expect("revoke");
    for list in &lists {
        assert!(
            revoked_soon(list, "s1").await,
            "an instance missed a revocation"
        );
    }

    // A revocation made before an instance starts is loaded from the durable set.
    let late = redis_revocation_follower(&redis.url(), &shutdown).await;
    assert!(
        late.is_revoked("s1", now_secs()),
        "a new instance did not load earlier revocations"
    );

    // Drop every pub/sub connection; revoke at once (the publish may be missed), then again
    // later (must arrive over the re-established subscription).
    redis
        .kill_pubsub_clients()
        .await
        .expect("kill pub/sub clients");
    writer.revoke("s2", now_secs() + 60).await.expect("revoke");
    // The bus reports the gap only once it has subscribed again, and the follower then
    // reloads the durable set: so s2 arrives even if its publish was missed, and once it
    // has, every follower is subscribed again.
    for list in lists.iter().chain([&late]) {
        assert!(
            revoked_soon(list, "s2").await,
            "a revocation made while pub/sub was down was not reloaded after the reconnect"
        );
    }
    // No gap follows now, so no reload: s3 can only come over the new subscription.
    writer.revoke("s3", now_secs() + 60).await.expect("revoke");
    for list in lists.iter().chain([&late]) {
        assert!(
            revoked_soon(list, "s3").await,
            "a revocation published after the reconnect did not arrive over the new subscription"
        );
    }
    shutdown.cancel();
}

#[tokio::test]
async fn redis_bus_reports_a_gap_after_reconnecting() {
    let redis = RedisServer::spawn().expect("redis");
    let shutdown = CancellationToken::new();
    let client = redis::Client::open(redis.url()).expect("client");
    let bus = RedisBus::start(
        client.clone(),
        redis_conn::node(&client).expect("manager"),
        shutdown.clone(),
    );
    let mut a = bus.subscribe("chan").await.expect("subscribe");
    let mut b = bus
        .subscribe("chan")
        .await
        .expect("second subscriber shares the subscription");
    bus.publish("chan", b"one".to_vec()).await.expect("publish");
    for s in [&mut a, &mut b] {
        let got = tokio::time::timeout(Duration::from_secs(3), s.recv())
            .await
            .expect("in time");
        assert_eq!(got, Some(BusEvent::Message(Arc::from(&b"one"[..]))));
    }
    redis
        .kill_pubsub_clients()
        .await
        .expect("kill pub/sub clients");
    let got = tokio::time::timeout(Duration::from_secs(5), a.recv())
        .await
        .expect("gap in time");
    assert_eq!(got, Some(BusEvent::Gap));
    // After the gap, live messages flow again.
    let mut delivered = false;
    for _ in 0..15 {
        if bus.publish("chan", b"two".to_vec()).await.is_ok()
            && let Ok(Some(BusEvent::Message(m))) =
                tokio::time::timeout(Duration::from_millis(200), a.recv()).await
            && &*m == b"two"
        {
            delivered = true;
            break;
        }
    }
    assert!(delivered, "no delivery after reconnect");
    shutdown.cancel();
}

#[tokio::test]
async fn cluster_revocations_reach_every_instance_even_across_dropped_connections() {
    let cluster = switchboard_tests::redis::RedisCluster::spawn().expect("cluster");
    let shutdown = CancellationToken::new();
    let mut lists = Vec::new();
    for _ in 0..3 {
        lists.push(cluster.revocation_follower(&shutdown).await);
    }
    let writer = RedisRevocations::new(cluster.conn());
    writer.revoke("s1", now_secs() + 60).await.expect("revoke");
    for list in &lists {
        assert!(
            revoked_soon(list, "s1").await,
            "an instance missed a revocation"
        );
    }
    let late = cluster.revocation_follower(&shutdown).await;
    assert!(
        late.is_revoked("s1", now_secs()),
        "a new instance did not load earlier revocations"
    );

    // Every node drops its pub/sub connections (with RESP3 they carry commands too).
    cluster
        .kill_pubsub_clients()
        .await
        .expect("kill pub/sub clients");
    writer.revoke("s2", now_secs() + 60).await.expect("revoke");
    for list in lists.iter().chain([&late]) {
        assert!(
            revoked_soon(list, "s2").await,
            "a revocation made while pub/sub was down was not reloaded after the reconnect"
        );
    }
    writer.revoke("s3", now_secs() + 60).await.expect("revoke");
    for list in lists.iter().chain([&late]) {
        assert!(
            revoked_soon(list, "s3").await,
            "a revocation made after the reconnect did not arrive"
        );
    }
    shutdown.cancel();
}

/// The next event of `sub`, waiting at most `limit`.
async fn next_event(
    sub: &mut switchboard_common::bus::Subscription,
    limit: Duration,
) -> Option<BusEvent> {
    tokio::time::timeout(limit, sub.recv()).await.ok().flatten()
}

#[tokio::test]
async fn cluster_bus_delivers_sharded_and_resubscribes_after_dropped_connections() {
    let cluster = switchboard_tests::redis::RedisCluster::spawn().expect("cluster");
    let shutdown = CancellationToken::new();
    let (a, b) = (cluster.bus(&shutdown), cluster.bus(&shutdown));
    let channel = "sb:test:{c:1}";
    let mut sub = a.subscribe(channel).await.expect("subscribe");
    b.publish(channel, b"one".to_vec()).await.expect("publish");
    assert_eq!(
        next_event(&mut sub, Duration::from_secs(5)).await,
        Some(BusEvent::Message(Arc::from(&b"one"[..])))
    );
    cluster
        .kill_pubsub_clients()
        .await
        .expect("kill pub/sub clients");
    assert_eq!(
        next_event(&mut sub, Duration::from_secs(5)).await,
        Some(BusEvent::Gap),
        "a dropped connection was not reported as a gap"
    );
    // Delivered again once subscribed again: publish until one arrives (50 tries, 200 ms
    // each).
    let mut delivered = false;
    'tries: for _ in 0..50 {
        if b.publish(channel, b"again".to_vec()).await.is_err() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        while let Some(event) = next_event(&mut sub, Duration::from_millis(200)).await {
            if event == BusEvent::Message(Arc::from(&b"again"[..])) {
                delivered = true;
                break 'tries;
            }
        }
    }
    assert!(delivered, "no message after the reconnect");
    shutdown.cancel();
}
