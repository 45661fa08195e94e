//! The Redis Cluster test harness itself (tests/common/cluster.rs): a
//! private cluster forms with every slot served, key slots are computed as
//! the servers compute them, and a killed master's replica takes over.

mod common;

use std::time::Instant;

use common::cluster::{node_conn, PrivateCluster, SLOTS};

/// Keys whose slots are checked against `CLUSTER KEYSLOT`, hash tags of
/// every kind among them.
const KEYS: &[&str] = &[
    "",
    "a",
    "123456789",
    "orders",
    "{orders}",
    "{orders}:state:orders",
    "hw:{orders}:stream",
    "a{b}c",
    "b",
    "{}x",
    "x{}",
    "foo{}{bar}",
    "foo{{bar}}",
    "foo{bar}{zap}",
    "{",
    "}{",
    "no}tag{",
    "ünïcødé{ключ}",
];

#[test]
fn slots_follow_crc16_xmodem_and_the_hash_tag() {
    // The standard check value of CRC-16/XMODEM (the Redis Cluster
    // specification's example).
    assert_eq!(PrivateCluster::slot_of("123456789"), 0x31C3 % SLOTS);
    assert_eq!(
        PrivateCluster::slot_of("{orders}"),
        PrivateCluster::slot_of("x{orders}y")
    );
    assert_eq!(
        PrivateCluster::slot_of("a{b}c"),
        PrivateCluster::slot_of("b")
    );
    assert_ne!(
        PrivateCluster::slot_of("{}x"),
        PrivateCluster::slot_of("x"),
        "an empty tag hashes the whole key"
    );
}

#[tokio::test]
async fn three_masters_serve_every_slot() {
    let started = Instant::now();
    let cluster = PrivateCluster::start(3, 0, &[]).await;
    eprintln!("3 masters formed in {:?}", started.elapsed());

    let masters = cluster.master_ports();
    assert_eq!(masters.len(), 3);
    assert_eq!(cluster.urls().len(), 3);
    assert_eq!(cluster.url(), format!("redis://127.0.0.1:{}", masters[0]));

    // Every slot served by one of the masters, each master serving some:
    // the ranges cover 0..16384 without gaps or overlaps.
    let ranges = cluster.slot_ranges().await;
    let mut next = 0u32;
    let mut served = std::collections::BTreeMap::<u16, u32>::new();
    for &(first, last, port) in &ranges {
        assert_eq!(
            u32::from(first),
            next,
            "a gap or overlap before {first}: {ranges:?}"
        );
        assert!(masters.contains(&port), "{first}-{last} served by {port}");
        *served.entry(port).or_default() += u32::from(last - first) + 1;
        next = u32::from(last) + 1;
    }
    assert_eq!(next, u32::from(SLOTS), "{ranges:?}");
    assert_eq!(served.len(), 3, "{served:?}");
    for slot in [0, 1, 5460, 5461, 5462, 10922, 10923, 16383] {
        let port = cluster.master_of_slot(slot).await;
        let (_, _, expected) = *ranges
            .iter()
            .find(|&&(a, b, _)| (a..=b).contains(&slot))
            .unwrap();
        assert_eq!(port, expected, "slot {slot}");
    }

    // Every node says the cluster is whole.
    for &port in &masters {
        let mut conn = node_conn(port).await;
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut conn)
            .await
            .expect("CLUSTER INFO");
        assert!(info.contains("cluster_state:ok"), "{port}: {info}");
        assert!(info.contains("cluster_slots_ok:16384"), "{port}: {info}");
        assert!(info.contains("cluster_size:3"), "{port}: {info}");
    }

    // slot_of is what the servers compute.
    let mut conn = node_conn(masters[1]).await;
    for key in KEYS {
        let theirs: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(*key)
            .query_async(&mut conn)
            .await
            .expect("CLUSTER KEYSLOT");
        assert_eq!(PrivateCluster::slot_of(key), theirs, "slot of {key:?}");
    }

    // A key written on the master of its slot is there; another master
    // redirects it.
    let key = "{orders}:probe";
    let slot = PrivateCluster::slot_of(key);
    let owner = cluster.master_of_slot(slot).await;
    let mut conn = node_conn(owner).await;
    let () = redis::cmd("SET")
        .arg(key)
        .arg("1")
        .query_async(&mut conn)
        .await
        .expect("SET on the slot's master");
    let other = *masters.iter().find(|&&p| p != owner).unwrap();
    let mut conn = node_conn(other).await;
    let err = redis::cmd("GET")
        .arg(key)
        .query_async::<Option<String>>(&mut conn)
        .await
        .expect_err("another master redirects");
    assert!(
        err.to_string().contains("MOVED") || err.to_string().contains("Moved"),
        "{err}"
    );
}

#[tokio::test]
async fn a_killed_master_is_failed_over_to_its_replica() {
    let started = Instant::now();
    let mut cluster = PrivateCluster::start(3, 1, &[]).await;
    eprintln!("3 masters + 3 replicas formed in {:?}", started.elapsed());
    assert_eq!(cluster.urls().len(), 6);

    let slot = PrivateCluster::slot_of("{orders}");
    let old = cluster.master_of_slot(slot).await;
    let mut conn = node_conn(old).await;
    let () = redis::cmd("SET")
        .arg("{orders}:kept")
        .arg("before the failover")
        .query_async(&mut conn)
        .await
        .expect("SET");
    // The write reached the replica before the master dies.
    let replicas: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut conn)
        .await
        .expect("WAIT");
    assert_eq!(replicas, 1);
    drop(conn);

    let killed = Instant::now();
    cluster.kill_master_of_slot(slot).await;
    assert!(!cluster.master_ports().contains(&old));
    let new = cluster.wait_for_failover(slot).await;
    eprintln!("failed over from {old} to {new} in {:?}", killed.elapsed());
    assert_ne!(new, old);
    assert_eq!(cluster.master_of_slot(slot).await, new);
    assert!(cluster.master_ports().contains(&new));
    assert_eq!(cluster.master_ports().len(), 3);
    assert_eq!(cluster.urls().len(), 5);

    let mut conn = node_conn(new).await;
    let info: String = redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut conn)
        .await
        .expect("CLUSTER INFO");
    assert!(info.contains("cluster_state:ok"), "{info}");
    let role: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut conn)
        .await
        .expect("INFO replication");
    assert!(role.contains("role:master"), "{role}");
    let kept: Option<String> = redis::cmd("GET")
        .arg("{orders}:kept")
        .query_async(&mut conn)
        .await
        .expect("GET on the new master");
    assert_eq!(kept.as_deref(), Some("before the failover"));
}
