//! The auth storage contract, run against the in-memory engine and a real Redis.

use std::time::Duration;

use switchboard_auth::account::UserRecord;
use switchboard_auth::store::memory::MemoryStore;
use switchboard_auth::store::redis::RedisStore;
use switchboard_auth::store::{AuthStore, NewSession, Rotation, Upgrade};
use switchboard_common::token::{PublicKey, Role};
use switchboard_tests::redis::RedisServer;

fn user(id: &str, name: &str) -> UserRecord {
    UserRecord {
        id: id.into(),
        username: name.into(),
        display_name: name.to_uppercase(),
        role: Role::Customer,
        password_hash: "$argon2id$fake".into(),
        created_at_ms: 1_700_000_000_123,
    }
}

async fn contract(store: impl AuthStore) {
    // Users: unique names, lookups by name and id, role changes only for existing users.
    assert!(
        store
            .create_user(&user("u1", "alice"))
            .await
            .expect("create")
    );
    assert!(
        !store
            .create_user(&user("u2", "alice"))
            .await
            .expect("create dup"),
        "duplicate username accepted"
    );
    assert!(store.create_user(&user("u3", "bob")).await.expect("create"));
    assert_eq!(
        store.user_by_name("alice").await.expect("by name"),
        Some(user("u1", "alice"))
    );
    assert_eq!(store.user_by_name("carol").await.expect("by name"), None);
    assert_eq!(
        store
            .users_by_name(&["bob".into(), "carol".into(), "alice".into()])
            .await
            .expect("by names"),
        vec![Some(user("u3", "bob")), None, Some(user("u1", "alice"))]
    );
    assert_eq!(
        store.users_by_name(&[]).await.expect("by no names"),
        Vec::<Option<UserRecord>>::new()
    );
    let found = store
        .users_by_id(&["u3".into(), "nope".into(), "u1".into()])
        .await
        .expect("by id");
    assert_eq!(
        found,
        vec![Some(user("u3", "bob")), None, Some(user("u1", "alice"))]
    );
    let promoted = store
        .set_role("u3", Role::Agent)
        .await
        .expect("set role")
        .expect("exists");
    assert_eq!(promoted.role, Role::Agent);
    assert_eq!(
        store
            .set_role("ghost", Role::Admin)
            .await
            .expect("set role"),
        None
    );
    assert_eq!(
        store.users_by_id(&["ghost".into()]).await.expect("by id"),
        vec![None],
        "set_role created a user"
    );

    // Sessions: rotation spends tokens; presenting a spent one revokes the session.
    let ttl = Duration::from_secs(600);
    let sid = uuid::Uuid::now_v7().to_string();
    store
        .create_session(&NewSession {
            id: sid.clone(),
            user_id: "u1".into(),
            refresh_hash: "h1".into(),
            ttl,
        })
        .await
        .expect("session");
    assert_eq!(
        store
            .rotate_refresh(&sid, "h1", "h2", ttl)
            .await
            .expect("rotate"),
        Rotation::Rotated("u1".into())
    );
    assert_eq!(
        store
            .rotate_refresh(&sid, "h2", "h3", ttl)
            .await
            .expect("rotate"),
        Rotation::Rotated("u1".into())
    );
    assert_eq!(
        store
            .rotate_refresh(&sid, "bogus", "h9", ttl)
            .await
            .expect("rotate"),
        Rotation::Unknown
    );
    assert_eq!(
        store
            .rotate_refresh(&sid, "h1", "h4", ttl)
            .await
            .expect("reuse"),
        Rotation::Reused
    );
    assert_eq!(
        store
            .rotate_refresh(&sid, "h3", "h5", ttl)
            .await
            .expect("after reuse"),
        Rotation::Revoked
    );
    assert_eq!(
        store
            .rotate_refresh("no-such-session", "h1", "h2", ttl)
            .await
            .expect("unknown"),
        Rotation::Unknown
    );

    let sid2 = uuid::Uuid::now_v7().to_string();
    store
        .create_session(&NewSession {
            id: sid2.clone(),
            user_id: "u3".into(),
            refresh_hash: "k1".into(),
            ttl,
        })
        .await
        .expect("session");
    store.revoke_session(&sid2).await.expect("revoke");
    assert_eq!(
        store
            .rotate_refresh(&sid2, "k1", "k2", ttl)
            .await
            .expect("revoked"),
        Rotation::Revoked
    );
    store
        .revoke_session("no-such-session")
        .await
        .expect("revoking nothing is fine");
    assert_eq!(
        store
            .rotate_refresh("no-such-session", "h1", "h2", ttl)
            .await
            .expect("unknown"),
        Rotation::Unknown
    );

    // Failure counters count per key, report the reset time, and can be released or reset.
    let window = Duration::from_secs(60);
    let keys = vec!["user:alice".to_string(), "peer:127.0.0.1".to_string()];
    assert_eq!(
        store
            .hit(&keys, window)
            .await
            .expect("hit")
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        vec![1, 1]
    );
    let second = store.hit(&keys, window).await.expect("hit");
    assert_eq!(second.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 2]);
    assert!(
        second.iter().all(|c| c.1 > 0 && c.1 <= 60_000),
        "reset time out of range: {second:?}"
    );
    store.release("peer:127.0.0.1").await.expect("release");
    store.forget("user:alice").await.expect("forget");
    let third = store.hit(&keys, window).await.expect("hit");
    assert_eq!(third.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2]);
    store
        .release("never-hit")
        .await
        .expect("release of nothing");

    // Published keys expire.
    let k1 = PublicKey {
        kid: "k1".into(),
        x: "x1".into(),
    };
    let k2 = PublicKey {
        kid: "k2".into(),
        x: "x2".into(),
    };
    store.put_key(&k1, 2_000).await.expect("put");
    store.put_key(&k2, 1_000).await.expect("put");
    let mut live = store.keys(1_500).await.expect("keys");
    live.sort_by(|a, b| a.kid.cmp(&b.kid));
    assert_eq!(live, vec![k1.clone()]);
    store.put_key(&k2, 3_000).await.expect("re-put");
    assert_eq!(store.keys(1_500).await.expect("keys").len(), 2);

    // A guest becomes an account under its id; only a guest, only to a free name.
    let guest = UserRecord {
        role: Role::Guest,
        password_hash: String::new(),
        ..user("g1", "guest-00aa")
    };
    assert!(store.create_user(&guest).await.expect("create guest"));
    let account = UserRecord {
        role: Role::Customer,
        display_name: "Gina".into(),
        ..user("g1", "gina")
    };
    let taken = UserRecord {
        username: "alice".into(),
        ..account.clone()
    };
    assert_eq!(
        store.upgrade_guest(&taken, "guest-00aa").await.expect("up"),
        Upgrade::NameTaken
    );
    assert_eq!(
        store.user_by_name("guest-00aa").await.expect("by name"),
        Some(guest.clone()),
        "a refused upgrade changes nothing"
    );
    let not_a_guest = UserRecord {
        username: "notbob".into(),
        ..user("u3", "notbob")
    };
    assert_eq!(
        store.upgrade_guest(&not_a_guest, "bob").await.expect("up"),
        Upgrade::NotAGuest
    );
    assert_eq!(
        store.user_by_name("notbob").await.expect("by name"),
        None,
        "the name claimed for a refused upgrade is given back"
    );
    assert_eq!(
        store
            .upgrade_guest(&account, "guest-00aa")
            .await
            .expect("up"),
        Upgrade::Done
    );
    assert_eq!(
        store.user_by_name("gina").await.expect("by name"),
        Some(account.clone())
    );
    assert_eq!(
        store.users_by_id(&["g1".into()]).await.expect("by id"),
        vec![Some(account.clone())]
    );
    assert_eq!(store.user_by_name("guest-00aa").await.expect("old"), None);
    assert_eq!(
        store
            .upgrade_guest(
                &UserRecord {
                    username: "gina2".into(),
                    ..account
                },
                "gina"
            )
            .await
            .expect("again"),
        Upgrade::NotAGuest,
        "an account does not upgrade twice"
    );
}

#[tokio::test]
async fn memory_engine_meets_the_contract() {
    contract(MemoryStore::new()).await;
}

#[tokio::test]
async fn redis_engine_meets_the_contract() {
    let redis = RedisServer::spawn().expect("redis");
    let client = redis::Client::open(redis.url()).expect("client");
    let conn = switchboard_common::redis_conn::node(&client).expect("manager");
    contract(RedisStore::new(conn)).await;
}

#[tokio::test]
async fn cluster_engine_meets_the_contract() {
    let cluster = switchboard_tests::redis::RedisCluster::spawn().expect("cluster");
    contract(RedisStore::new(cluster.conn())).await;
}
