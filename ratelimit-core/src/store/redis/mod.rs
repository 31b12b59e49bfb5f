//! The shared Redis store (cargo feature `redis`): how a fleet of MTAs shares one set
//! of counters.
//!
//! # One round trip per decision
//!
//! Every [`Store::check`] is one `FCALL` of `redis_check.lua`, Lua code that mirrors
//! [`KeyState::apply`](crate::KeyState::apply) step for step (same sub-window numbering,
//! same all-or-nothing rule, shared counters charged once, same `retry_after`, `used`
//! and `remaining`, same tolerance of a clock stepping back). Redis runs a script
//! atomically, so the decision and the recording are one step for every caller on
//! every host: the [`Store`] contract holds across the fleet. The code is a function
//! library (Redis 7 and later), loaded with `FUNCTION LOAD` under a name made from a
//! hash of its text (so servers of two versions sharing one Redis during an upgrade
//! each call their own); where the server lacks it (a restart without persistence,
//! `FUNCTION FLUSH`) the store loads it and calls again. A server without functions
//! (before Redis 7), or an ACL user not allowed `FCALL` and `FUNCTION`, gets the same
//! code as a script, called with `EVALSHA` (and `EVAL` of its text where the script
//! cache lacks it); the decisions are the same, and a function costs Redis fewer
//! instructions (a script makes its functions and tables again on every call).
//! Either way a decision takes at most three round trips.
//!
//! # Data layout
//!
//! One hash per key, named `<prefix>{<encoded key>}` (`rl:{alice@example.com}`):
//! - field `i`: `idle_at`, when every counter will have decayed (ms, decimal);
//! - one field per counter, named by its [`CounterId`](crate::CounterId) in decimal: a
//!   sliding window as `idx:count,idx:count` (the non-empty sub-windows, oldest first,
//!   `idx` = sub-window number mod 2^32, as in `KeyState`); a token bucket as
//!   `level:last` (level in unit·ms, which can exceed 2^53, so it is kept as a decimal
//!   string).
//!
//! All numbers are decimal text, read by Lua's `tonumber` (in C) and exact as doubles
//! below 2^53. The script decides a sliding window in doubles, and a token bucket too
//! when its capacity (burst × window) is at most 2^52, its stored level below 2^53 and
//! its last update below 2^52; any other bucket, and an `idle_at` past 2^53, take an
//! exact multi-limb path. Which path ran leaves no trace in the hash. This layout is
//! the one earlier versions wrote (only the script's arguments changed, and they go
//! with its SHA), so hashes written before an upgrade are read as they are, and
//! servers of both versions can share one Redis during a rolling upgrade.
//!
//! The key is percent-encoded (`%`, `{`, `}`, spaces and control characters become
//! `%XX`), so distinct keys never share a hash and the braces always delimit a hash
//! tag. A decision touches exactly one Redis key, declared in `KEYS`, so on a Redis
//! Cluster it is one round trip to the master of that key's slot; the hash tag keeps
//! the key's other hash (distinct networks, `<prefix>nets:{<encoded key>}`) on the same
//! slot (except for the empty key, whose empty braces make Redis hash the whole name;
//! no operation touches both hashes at once, so nothing depends on it).
//!
//! A recorded event that moves `idle_at` sets the hash's TTL to `idle_at - now` plus a
//! grace ([`RedisStoreConfig::ttl_grace`]), so idle users cost nothing (an event that
//! leaves `idle_at` where it was, as most do in a sliding window's sub-window, leaves
//! the TTL, which already ends there). The script compares
//! `now` with the stored `idle_at` itself, exactly as `KeyState::is_idle` does, so the
//! TTL is only garbage collection: a hash that outlives `idle_at` reads as empty, and
//! the grace keeps a hash from expiring early when the caller's clock lags the
//! server's. A refused event or a peek writes nothing, not even the TTL.
//!
//! # Capabilities
//!
//! [`DistinctStore`](crate::distinct::DistinctStore) (distinct client networks per
//! user) is a second script, `redis_distinct.lua`, over its own hash per key (see
//! `distinct.rs`).
//!
//! [`Forget`] is one `DEL`. [`Scan`](super::Scan) walks the keyspace with `SCAN`
//! (never `KEYS`) and reads each batch of hashes in one pipelined round trip; it and
//! [`RedisStore::try_key_count`] are O(keys) and meant for occasional admin use (top
//! senders, statistics). `Sweep` is not provided: Redis expires idle keys itself.
//!
//! # Time
//!
//! [`TimeSource::Server`] (the default): the script reads the Redis server's `TIME`, so
//! every host decides on the same clock and the `now` passed to `check` is ignored.
//! This needs script effects replication, the default from Redis 5 (the script asks
//! for it on 3.2–4). [`TimeSource::Caller`]: the script uses the `now` passed to
//! `check` (tests with a manual clock; a single host). Caller timestamps must be
//! below 2^52 ms (year 144,000), where the script's double arithmetic is exact.
//!
//! # Connections
//!
//! A [`redis::Client`] (one server; see "Redis Cluster" below for the other case)
//! and a small pool of idle synchronous connections behind a mutex
//! (held only to push or pop). Each check takes a connection, or opens one within
//! [`RedisStoreConfig::connect_timeout`] (the handshake, `AUTH` and `SELECT`, included);
//! every command has [`RedisStoreConfig::command_timeout`] as its socket read and write
//! timeout. A connection that failed with an I/O error or a timeout is dropped, never
//! reused (a late reply could otherwise answer the next command), so the next check
//! reconnects: the store recovers by itself when Redis restarts. If a connection taken
//! from the pool turns out to be dead (closed by the peer before anything was read),
//! the other idle ones are dropped too and the check is retried once on a fresh
//! connection; a timeout is never retried, and the caller's failure policy applies.
//! Sync is deliberate: the policy server calls the store from `spawn_blocking` with
//! its own deadline, and the sync client needs no runtime; `ConnectionManager` is
//! async-only, and a pool crate would add a dependency for these few lines.
//!
//! # Redis Cluster
//!
//! With [`RedisStoreConfig::cluster_nodes`] the store uses the `redis` crate's sync
//! cluster client: each pooled connection is a set of connections, one per node, and
//! the slot map read (`CLUSTER SLOTS`) from the first seed node that answers. Each
//! script call goes to the master of its key's slot, in one round trip while the
//! cluster is stable. The client is built without retries of its own (it would send
//! a timed-out command again on the same connection); the store handles the cluster
//! changing instead:
//! - `MOVED` (a slot now lives elsewhere): the command is sent once to the node
//!   named, and that connection, and every idle one, is closed afterwards, so the
//!   next ones read the new slot map. `ASK` (a slot migrating): `ASKING` and the
//!   command to the node named.
//! - a node down, `READONLY` (a write reached a demoted master), `CLUSTERDOWN`,
//!   `TRYAGAIN`, `MASTERDOWN`, `LOADING`: the connection is dropped (unless the answer
//!   was an error reply) and the command tried again on a fresh one every 25 ms,
//!   until it succeeds or [`RedisStoreConfig::command_timeout`] has passed since the
//!   first attempt; then [`StoreError::Unavailable`]. A command that timed out is
//!   never retried ([`StoreError::Timeout`]). So while a master is down and until
//!   its replica is promoted, the keys of its slots fail per the caller's failure
//!   policy, and afterwards the same store decides exactly again with no restart.
//!   A decision whose connection dropped mid-command is retried: if the dying master
//!   had recorded it and its replica received it, the event counts twice (erring
//!   toward limiting).
//! - the function missing on a node (a node restarted without persistence, or
//!   added): the library is loaded on every master that answers (`FUNCTION LOAD` is
//!   routed to all of them; replicas get it from their master) and called again. With
//!   scripts, `NOSCRIPT`: the call is sent again as `EVAL` of the script's text.
//!
//! Opening a cluster connection connects to every node in the slot map, in turn,
//! each within [`RedisStoreConfig::connect_timeout`]. [`Scan`](super::Scan) and
//! [`RedisStore::try_key_count`] walk every master with `SCAN`. A key prefix must not
//! contain a brace on a cluster (it would become the hash tag).
//!
//! # TLS
//!
//! `rediss://` URLs (and seed nodes) use rustls, never OpenSSL, and never fall back
//! to plain text. The server's certificate is checked against the public roots
//! compiled into the client (webpki-roots), or only against
//! [`RedisStoreConfig::tls_ca`] when set (a private CA), and must name the host in
//! the URL. [`RedisStoreConfig::tls_client_cert`] is presented when the server asks
//! for one. A failed handshake is a connect error ([`StoreError::Unavailable`]) that
//! names the URL and says the TLS handshake failed.
//!
//! # Modules
//!
//! - `mod.rs`: [`RedisStore`], key naming, and the [`Store`] and [`Forget`]
//!   implementations;
//! - `config.rs`: [`RedisStoreConfig`], [`TimeSource`], URLs without passwords;
//! - `client.rs`: one server or a cluster's seed nodes, TLS settings checked;
//! - `connection.rs`: connections (one server's, or a cluster's with its routing),
//!   the pool, timeouts, retries, error mapping;
//! - `script.rs`: the decision script, its arguments and its reply;
//! - `scan.rs`: [`Scan`](super::Scan) and key counting;
//! - `distinct.rs`: [`DistinctStore`](crate::distinct::DistinctStore), the second script.

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use parking_lot::Mutex;

use super::{Forget, Store, StoreError};
use crate::clock::{Timestamp, duration_to_millis};
use crate::decision::{Cost, Decision, Mode};
use crate::quota::Limit;

mod baseline;
mod batch;
mod client;
mod config;
mod connection;
mod distinct;
mod scan;
mod script;

pub use baseline::BaselineImport;
pub use config::{RedisStoreConfig, TimeSource, TlsClientCert, redact_url};

/// Caller timestamps at or past this are refused: the script's arithmetic on them
/// (plain doubles) is exact only well below 2^53.
const MAX_CALLER_MS: u64 = 1 << 52;

/// A [`Store`] in Redis, shared by every host that uses the same server and prefix.
///
/// See the [module docs](self) for the script, the data layout, time and connections.
///
/// # Examples
///
/// ```no_run
/// use ratelimit_core::store::{RedisStore, RedisStoreConfig};
/// use ratelimit_core::{Cost, Limiter, SystemClock, Tier, TierMap};
///
/// let store = RedisStore::new(RedisStoreConfig::new("redis://127.0.0.1:6379/")).unwrap();
/// store.ping().expect("Redis is reachable");
/// let tiers = TierMap::new(Tier::new("default", ["100/1h".parse().unwrap()]).unwrap());
/// let limiter = Limiter::new(store, tiers, SystemClock);
/// let d = limiter.acquire("alice@example.com", Cost::message(1, 0)).unwrap();
/// ```
pub struct RedisStore {
    client: client::Client,
    config: RedisStoreConfig,
    /// [`RedisStoreConfig::endpoint`], for error messages.
    endpoint: String,
    /// Idle connections; the lock is held only to push or pop one.
    pool: Mutex<Vec<connection::Conn>>,
    /// The server refused functions (`FCALL`): decisions are `EVALSHA`s of the script.
    no_functions: AtomicBool,
    /// Decisions waiting to go out in one pipelined batch ([`RedisStoreConfig::batch`]).
    batcher: batch::Batcher,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("config", &self.config)
            .field("idle_connections", &self.pool.lock().len())
            .finish()
    }
}

impl RedisStore {
    /// A store for this configuration. Checks the URL (or the cluster's seed nodes)
    /// and the TLS settings but does not connect: the first check (or
    /// [`RedisStore::ping`]) does, so a server can start while Redis is down and apply
    /// its failure policy until Redis is back.
    ///
    /// Refused with [`StoreError::Unavailable`] naming the problem: a URL that does not
    /// parse, both [`url`](RedisStoreConfig::url) and
    /// [`cluster_nodes`](RedisStoreConfig::cluster_nodes), a TLS CA or client
    /// certificate with a `redis://` URL, or (on a cluster) a key prefix with a brace.
    pub fn new(mut config: RedisStoreConfig) -> Result<RedisStore, StoreError> {
        // A zero socket timeout is an error for the OS; treat it as the smallest one.
        let min = Duration::from_millis(1);
        config.connect_timeout = config.connect_timeout.max(min);
        config.command_timeout = config.command_timeout.max(min);
        let client = client::Client::new(&config).map_err(StoreError::Unavailable)?;
        Ok(RedisStore {
            client,
            endpoint: config.endpoint(),
            config,
            pool: Mutex::new(Vec::new()),
            no_functions: AtomicBool::new(false),
            batcher: batch::Batcher::default(),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &RedisStoreConfig {
        &self.config
    }

    /// Checks that Redis answers (and that the credentials and, with `rediss://`, the
    /// server's certificate are accepted). On a cluster, every master must answer.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.run(|con| redis::cmd("PING").query::<String>(con))
            .map(|_| ())
    }

    /// The name of the Redis hash that holds `key`'s counters (for operators and tests).
    ///
    /// # Examples
    ///
    /// ```
    /// use ratelimit_core::store::{RedisStore, RedisStoreConfig};
    /// let store = RedisStore::new(RedisStoreConfig::new("redis://127.0.0.1/")).unwrap();
    /// assert_eq!(store.key_name("alice@example.com"), "rl:{alice@example.com}");
    /// assert_eq!(store.key_name("odd {user} 100%"), "rl:{odd%20%7Buser%7D%20100%25}");
    /// ```
    pub fn key_name(&self, key: &str) -> String {
        let mut s = String::with_capacity(self.config.key_prefix.len() + key.len() + 2);
        s.push_str(&self.config.key_prefix);
        s.push('{');
        for c in key.chars() {
            if matches!(c, '%' | '{' | '}') || c <= ' ' || c == '\x7f' {
                s.push_str(&format!("%{:02X}", u32::from(c)));
            } else {
                s.push(c);
            }
        }
        s.push('}');
        s
    }
}

impl Store for RedisStore {
    /// One `FCALL` (or `EVALSHA`) round trip; atomic on the Redis server against
    /// every other caller of every host.
    fn check(
        &self,
        key: &str,
        limits: &[Limit],
        cost: Cost,
        now: Timestamp,
        mode: Mode,
    ) -> Result<Decision, StoreError> {
        if limits.is_empty() {
            return Ok(Decision::UNLIMITED);
        }
        let now = match self.config.time_source {
            TimeSource::Server => None,
            TimeSource::Caller if now.as_millis() < MAX_CALLER_MS => Some(now),
            TimeSource::Caller => {
                return Err(StoreError::Protocol(format!(
                    "timestamp {} ms is past what the Redis script computes exactly (2^52 ms)",
                    now.as_millis()
                )));
            }
        };
        let args = script::DecisionArgs::new(
            limits,
            cost,
            now,
            duration_to_millis(self.config.ttl_grace),
            mode,
        );
        let name = self.key_name(key);
        let reply = if self.config.batch && !self.config.is_cluster() {
            self.eval_batched(name, args)?
        } else {
            self.run(|con| self.eval(con, &name, &args))?
        };
        script::decision_from_reply(&reply, limits)
    }
}

impl Forget for RedisStore {
    /// One `DEL`.
    fn forget(&self, key: &str) -> Result<bool, StoreError> {
        self.delete(&self.key_name(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_url_is_refused_without_echoing_the_password() {
        let err = RedisStore::new(RedisStoreConfig::new("http://:hunter2@host/")).unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn tls_and_cluster_settings_that_cannot_work_are_refused_up_front() {
        let refused = |c: RedisStoreConfig| match RedisStore::new(c) {
            Err(StoreError::Unavailable(msg)) => msg,
            other => panic!("accepted: {other:?}"),
        };
        // A CA (or a client certificate) asks for TLS: never silently plain text.
        let msg = refused(RedisStoreConfig::new("redis://:pw@h:6379/").with_tls_ca("PEM"));
        assert!(
            msg.contains("not a rediss:// URL") && msg.contains("redis://:***@h:6379/"),
            "{msg}"
        );
        assert!(!msg.contains("pw@"), "{msg}");
        let mut c = RedisStoreConfig::cluster(["rediss://a:7000", "redis://b:7000"]);
        c.tls_client_cert = Some(TlsClientCert {
            cert_pem: b"C".to_vec(),
            key_pem: b"K".to_vec(),
        });
        assert!(refused(c).contains("redis://b:7000"));
        // Seeds with different schemes.
        assert!(
            !refused(RedisStoreConfig::cluster([
                "rediss://a:7000",
                "redis://b:7000"
            ]))
            .is_empty()
        );
        // One server or a cluster, not both.
        let mut c = RedisStoreConfig::cluster(["redis://a:7000"]);
        c.url = "redis://b:6379/".into();
        let msg = refused(c);
        assert!(
            msg.contains("both a URL (redis://b:6379/) and cluster nodes"),
            "{msg}"
        );
        // A brace in the prefix would become every key's hash tag on a cluster.
        let msg = refused(RedisStoreConfig::cluster(["redis://a:7000"]).with_key_prefix("rl{x}:"));
        assert!(msg.contains("brace"), "{msg}");
        RedisStore::new(RedisStoreConfig::new("redis://a/").with_key_prefix("rl{x}:")).unwrap();
        RedisStore::new(RedisStoreConfig::cluster([
            "redis://a:7000",
            "redis://b:7000",
        ]))
        .unwrap();
        // PEM that holds no certificate (or no key) would fail every handshake.
        let msg = refused(RedisStoreConfig::new("rediss://a/").with_tls_ca("not PEM"));
        assert!(msg.contains("no PEM certificate"), "{msg}");
        let mut c = RedisStoreConfig::new("rediss://a/");
        c.tls_client_cert = Some(TlsClientCert {
            cert_pem: b"-----BEGIN CERTIFICATE-----".to_vec(),
            key_pem: b"-----BEGIN CERTIFICATE-----".to_vec(),
        });
        assert!(refused(c).contains("no PEM private key"));
    }

    #[test]
    fn a_cluster_with_no_seed_answering_is_unavailable_within_the_timeout() {
        let mut config = RedisStoreConfig::cluster(["redis://127.0.0.1:1", "redis://127.0.0.1:2"]);
        config.connect_timeout = Duration::from_millis(200);
        config.command_timeout = Duration::from_millis(300);
        let store = RedisStore::new(config).unwrap();
        let limits = ["1/1m".parse::<Limit>().unwrap()];
        let start = std::time::Instant::now();
        let err = store
            .check(
                "a",
                &limits,
                Cost::units(1),
                Timestamp::from_millis(1),
                Mode::Acquire,
            )
            .unwrap_err();
        // Retried (a node down is retryable) until command_timeout, then given up.
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(
                "cannot connect to Redis at cluster redis://127.0.0.1:1,redis://127.0.0.1:2"
            ),
            "{msg}"
        );
        assert!(!msg.contains("rediss"), "{msg}");
    }

    #[test]
    fn nothing_listening_is_unavailable_not_a_hang() {
        // Port 1 (tcpmux) is closed on any sane test machine: connection refused.
        let mut config = RedisStoreConfig::new("redis://127.0.0.1:1/");
        config.connect_timeout = Duration::from_millis(500);
        let store = RedisStore::new(config).unwrap();
        let limits = ["1/1m".parse::<Limit>().unwrap()];
        let err = store
            .check(
                "a",
                &limits,
                Cost::units(1),
                Timestamp::from_millis(1),
                Mode::Acquire,
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(
            err.to_string()
                .contains("cannot connect to Redis at redis://127.0.0.1:1/"),
            "{err}"
        );
    }
}
