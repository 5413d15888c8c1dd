//! `Batch` on a real Redis Cluster: commands over many slots go one pipeline per master
//! and come back in the order they were added, also right after a slot moved to another
//! master (the masters read for grouping are stale then, and the group is sent again by
//! slot).

use switchboard_common::redis_conn::Batch;
use switchboard_tests::redis::RedisCluster;

const KEYS: usize = 300;

fn key(i: usize) -> String {
    format!("batch:{i}")
}

async fn read_all(cluster: &RedisCluster) -> Vec<Option<String>> {
    let mut batch = Batch::new();
    for i in 0..KEYS {
        let mut get = redis::cmd("GET");
        get.arg(key(i));
        batch.add(key(i), get);
    }
    batch
        .run_as(&cluster.conn())
        .await
        .expect("a batch of reads")
}

#[tokio::test]
async fn a_cluster_batch_keeps_its_order_across_masters_and_a_moved_slot() {
    let cluster = RedisCluster::spawn().expect("cluster");
    let conn = cluster.conn();
    let mut writes = Batch::new();
    for i in 0..KEYS {
        let mut set = redis::cmd("SET");
        set.arg(key(i)).arg(i);
        writes.add(key(i), set);
    }
    let replies: Vec<String> = writes.run_as(&conn).await.expect("a batch of writes");
    assert_eq!(replies.len(), KEYS);
    assert!(replies.iter().all(|r| r == "OK"), "{replies:?}");
    let expected: Vec<Option<String>> = (0..KEYS).map(|i| Some(i.to_string())).collect();
    // The keys are spread over every master.
    let masters: std::collections::BTreeSet<usize> = (0..KEYS)
        .step_by(10)
        .map(|i| cluster.master_of(&key(i)).expect("master"))
        .collect();
    assert_eq!(masters.len(), 3, "{masters:?}");

    // One connection reads the masters, then a slot moves under it.
    let same = cluster.conn();
    let mut first = Batch::new();
    let mut get = redis::cmd("GET");
    get.arg(key(0));
    first.add(key(0), get);
    let _: Vec<Option<String>> = first.run_as(&same).await.expect("read the masters");
    let from = cluster.master_of(&key(7)).expect("master");
    let to = (0..6)
        .find(|&n| n != from && masters.contains(&n))
        .expect("another master");
    cluster.move_slot(&key(7), to).expect("move the slot");
    let mut again = Batch::new();
    for i in 0..KEYS {
        let mut get = redis::cmd("GET");
        get.arg(key(i));
        again.add(key(i), get);
    }
    let after: Vec<Option<String>> = again.run_as(&same).await.expect("reads after the move");
    assert_eq!(after, expected, "right after the move");
    assert_eq!(read_all(&cluster).await, expected, "on a fresh connection");
}
