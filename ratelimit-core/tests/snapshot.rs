//! Snapshot round trips, restarts, and damaged files.

use std::path::PathBuf;
use std::time::Duration;

use ratelimit_core::store::Scan;
use ratelimit_core::store::SnapshotError;
use ratelimit_core::{Cost, Limit, MemoryStore, MemoryStoreConfig, Mode, Store, Timestamp};

const T0: u64 = 1_700_000_000_000;

fn limits() -> [Limit; 2] {
    [
        "10/1h".parse().unwrap(),
        Limit::token_bucket(100, Duration::from_secs(86_400), 50)
            .unwrap()
            .with_unit(ratelimit_core::Unit::Recipients),
    ]
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rl-snap-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("counters.snap")
}

fn at(ms: u64) -> Timestamp {
    Timestamp::from_millis(T0 + ms)
}

/// A store where user{i} has sent i+1 messages of 3 recipients, 1 minute apart per user.
fn populated() -> MemoryStore {
    let s = MemoryStore::new();
    for i in 0..50u64 {
        for j in 0..=(i % 9) {
            let d = s
                .check(
                    &format!("user{i}@example.com"),
                    &limits(),
                    Cost::message(3, 0),
                    at(j * 60_000),
                    Mode::Acquire,
                )
                .unwrap();
            assert!(d.is_allowed());
        }
    }
    s
}

fn decisions(s: &MemoryStore, now: Timestamp) -> Vec<ratelimit_core::Decision> {
    (0..55)
        .map(|i| {
            s.check(
                &format!("user{i}@example.com"),
                &limits(),
                Cost::message(3, 0),
                now,
                Mode::Peek,
            )
            .unwrap()
        })
        .collect()
}

#[test]
fn round_trip_restores_identical_decisions() {
    let path = tmp("roundtrip");
    let a = populated();
    let now = at(10 * 60_000);
    let stats = a.save_snapshot(&path, now).unwrap();
    assert_eq!(stats.keys, 50);
    let b = MemoryStore::new();
    let loaded = b.load_snapshot(&path, now).unwrap();
    assert_eq!((loaded.keys, loaded.restored), (50, 50));
    assert_eq!(b.key_count(), 50);
    assert_eq!(decisions(&a, now), decisions(&b, now));
    // And the same after more time passes, for both algorithms.
    let later = at(3 * 3_600_000);
    assert_eq!(decisions(&a, later), decisions(&b, later));
}

#[test]
fn restore_after_restart_keeps_what_still_counts() {
    let path = tmp("restart");
    let a = populated();
    a.save_snapshot(&path, at(10 * 60_000)).unwrap();
    // "Restart" 30 minutes later: the hourly window still holds everything.
    let b = MemoryStore::new();
    b.load_snapshot(&path, at(40 * 60_000)).unwrap();
    let d = b
        .check(
            "user8@example.com",
            &limits(),
            Cost::message(1, 0),
            at(40 * 60_000),
            Mode::Peek,
        )
        .unwrap();
    assert_eq!(d.statuses()[0].used, 9);
    // Restart a week later: the snapshot is read, but everything has decayed.
    let c = MemoryStore::new();
    let stats = c.load_snapshot(&path, at(7 * 86_400_000)).unwrap();
    assert_eq!((stats.keys, stats.restored), (50, 0));
    assert_eq!(c.key_count(), 0);
}

#[test]
fn a_snapshot_larger_than_the_table_restores_the_most_recently_active_keys() {
    let path = tmp("smaller");
    let a = populated();
    // user{i} sent its last message at minute i % 9: the most recently active
    // users are those with i % 9 == 8 (user8, user17, user26, user35, user44).
    let now = at(10 * 60_000);
    a.save_snapshot(&path, now).unwrap();
    let small =
        MemoryStore::with_config(MemoryStoreConfig::default().with_shards(1).with_max_keys(5));
    let stats = small.load_snapshot(&path, now).unwrap();
    assert_eq!((stats.keys, stats.restored), (50, 50));
    assert_eq!(small.key_count(), 5);
    assert_eq!(small.evictions().idle + small.evictions().lru, 45);
    let mut kept = Vec::new();
    small
        .scan(&mut |key, _| kept.push(key.to_string()))
        .unwrap();
    kept.sort();
    assert_eq!(
        kept,
        [
            "user17@example.com",
            "user26@example.com",
            "user35@example.com",
            "user44@example.com",
            "user8@example.com"
        ]
    );
    // What was kept decides exactly as in the store it came from.
    for user in &kept {
        let peek = |s: &MemoryStore| {
            s.check(user, &limits(), Cost::message(3, 0), now, Mode::Peek)
                .unwrap()
        };
        assert_eq!(peek(&a), peek(&small), "{user}");
    }
}

#[test]
fn damaged_files_give_clear_errors_and_restore_nothing() {
    let path = tmp("damaged");
    populated().save_snapshot(&path, at(0)).unwrap();
    let good = std::fs::read(&path).unwrap();

    let check = |bytes: &[u8], want: &str| {
        std::fs::write(&path, bytes).unwrap();
        let s = MemoryStore::new();
        let err = s.load_snapshot(&path, at(0)).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(s.key_count(), 0, "a bad file restored something");
        err
    };

    // Truncated anywhere.
    for cut in [0, 5, 12, 20, good.len() / 2, good.len() - 1] {
        let err = check(&good[..cut], "");
        assert!(
            matches!(
                err,
                SnapshotError::NotASnapshot(_)
                    | SnapshotError::Truncated { .. }
                    | SnapshotError::Checksum(_)
            ),
            "cut at {cut}: {err}"
        );
    }
    // A flipped bit in the body.
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x10;
    check(&flipped, "checksum mismatch");
    // Another format version.
    let mut v2 = good.clone();
    v2[8] = 2;
    check(&v2, "format version 2");
    // Not a snapshot at all.
    check(
        b"hello world, this is not a snapshot",
        "not a ratelimit snapshot",
    );
    // A missing file.
    let missing = path.with_file_name("nope.snap");
    let err = MemoryStore::new()
        .load_snapshot(&missing, at(0))
        .unwrap_err();
    assert!(matches!(err, SnapshotError::Io { .. }), "{err}");
}

#[test]
fn decoding_never_panics_on_garbage() {
    // Every prefix and a byte-flip of each position of a small snapshot.
    let path = tmp("garbage");
    let s = MemoryStore::new();
    let _ = s
        .check("a", &limits(), Cost::message(1, 0), at(0), Mode::Acquire)
        .unwrap();
    s.save_snapshot(&path, at(0)).unwrap();
    let good = std::fs::read(&path).unwrap();
    for i in 0..good.len() {
        let _ = ratelimit_core::store::snapshot::decode(&good[..i], &path);
        let mut b = good.clone();
        b[i] = b[i].wrapping_add(1);
        let _ = ratelimit_core::store::snapshot::decode(&b, &path);
    }
}

/// A snapshot names every user: it is readable by its owner only, whatever the
/// umask, and even over a temporary file left (0644) by a crash.
#[test]
fn snapshots_are_written_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let path = tmp("mode");
    let leftover = path.with_file_name(format!("counters.snap.tmp.{}", std::process::id()));
    std::fs::write(&leftover, b"old").unwrap();
    std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o644)).unwrap();
    populated().save_snapshot(&path, at(0)).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
