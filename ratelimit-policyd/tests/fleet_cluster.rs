//! Two real servers sharing a Redis Cluster (`[store] redis_cluster_nodes`), started
//! by `scripts/with-redis-cluster` (`RATELIMIT_TEST_REDIS_CLUSTER_NODES`).
//! `scripts/test` runs this.

mod support;

use std::path::Path;

use support::proc::{Daemon, ask, free_port, tempdir};

fn nodes() -> String {
    let nodes = std::env::var("RATELIMIT_TEST_REDIS_CLUSTER_NODES").unwrap_or_else(|_| {
        panic!("RATELIMIT_TEST_REDIS_CLUSTER_NODES is not set: run through scripts/with-redis-cluster (scripts/test does)")
    });
    let quoted: Vec<String> = nodes.split(',').map(|n| format!("\"{n}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

fn config(path: &Path, port: u16, prefix: &str) {
    std::fs::write(
        path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\ndecision_timeout = \"2s\"\non_store_error = \"closed\"\n\n\
             [store]\nbackend = \"redis\"\nredis_cluster_nodes = {}\nredis_key_prefix = \"{prefix}\"\n\
             redis_connect_timeout = \"1s\"\nredis_command_timeout = \"1s\"\n\n\
             [tiers.default]\nlimits = [\"12/1h\"]\n",
            nodes()
        ),
    )
    .unwrap();
}

#[test]
#[ignore = "needs a Redis Cluster (scripts/test runs it under scripts/with-redis-cluster)"]
fn two_servers_on_one_cluster_admit_exactly_the_limit_in_total() {
    let dir = tempdir("fleet-cluster");
    let prefix = format!("rl-fleet-{}:", std::process::id());
    let (p1, p2) = (free_port(), free_port());
    config(&dir.join("a.toml"), p1, &prefix);
    config(&dir.join("b.toml"), p2, &prefix);
    let a = Daemon::start(&["--config", dir.join("a.toml").to_str().unwrap()], p1);
    let b = Daemon::start(&["--config", dir.join("b.toml").to_str().unwrap()], p2);
    a.wait_for_log("connected to Redis");
    b.wait_for_log("connected to Redis");
    assert!(
        a.log.lock().unwrap().contains("cluster redis://"),
        "{}",
        a.log.lock().unwrap()
    );
    // Three connections to each server, each in its own thread: 30 messages of one
    // user at once.
    let answers: Vec<String> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..6)
            .map(|c| {
                let mut s = if c % 2 == 0 { a.connect() } else { b.connect() };
                scope.spawn(move || {
                    (0..5)
                        .map(|i| ask(&mut s, "roamer@example.com", &format!("r{c}-{i}")))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    let mut counts = std::collections::BTreeMap::new();
    for answer in &answers {
        let kind = answer.split_whitespace().next().unwrap_or("");
        *counts.entry(kind.to_string()).or_insert(0) += 1;
    }
    // Exactly the limit admitted; the rest refused by the limit (on_store_error is
    // "closed", so a store failure would show as DEFER_IF_PERMIT too: the count of
    // DUNNO is what proves the shared counting).
    assert_eq!(counts.get("action=DUNNO"), Some(&12), "{answers:?}");
    assert_eq!(counts.values().sum::<i32>(), 30);
    // Users on several masters through one server.
    let mut s = a.connect();
    for u in 0..20 {
        assert_eq!(
            ask(&mut s, &format!("u{u}@example.com"), "x"),
            "action=DUNNO"
        );
    }
}
