//! The shared Redis store (cargo feature `redis`): how a fleet of MTAs shares one set
//! of counters.
//!
//! # One round trip per decision
//!
//! Every [`Store::check`] is one `EVALSHA` of `redis_check.lua`, a script that mirrors
//! [`KeyState::apply`](crate::KeyState::apply) step for step (same sub-window numbering,
//! same all-or-nothing rule, shared counters charged once, same `retry_after`, `used`
//! and `remaining`, same tolerance of a clock stepping back). Redis runs a script
//! atomically, so the decision and the recording are one step for every caller on
//! every host: the [`Store`] contract holds across the fleet. The script is loaded
//! once with `SCRIPT LOAD` and called by its SHA; after a Redis restart (which empties
//! the script cache) the `NOSCRIPT` answer makes the store load it again and retry.
//!
//! # Data layout
//!
//! One hash per key, named `<prefix>{<encoded key>}` (`rl:{alice@example.com}`):
//! - field `i`: `idle_at`, when every counter will have decayed (ms, decimal);
//! - one field per counter, named by its [`CounterId`] in decimal: a
//!   sliding window as `idx:count,idx:count` (the non-empty sub-windows, oldest first,
//!   `idx` = sub-window number mod 2^32, as in `KeyState`); a token bucket as
//!   `level:last` (level in unit·ms, which can exceed 2^53, so it is kept as a decimal
//!   string and the script does exact multi-limb arithmetic on it).
//!
//! The key is percent-encoded (`%`, `{`, `}`, spaces and control characters become
//! `%XX`), so distinct keys never share a hash and the braces always delimit a hash
//! tag. A decision touches exactly one Redis key, declared in `KEYS`, so it works on
//! Redis Cluster; the hash tag keeps any future per-user key on the same slot.
//!
//! A recorded event sets the hash's TTL to `idle_at - now` plus a grace
//! ([`RedisStoreConfig::ttl_grace`]), so idle users cost nothing. The script compares
//! `now` with the stored `idle_at` itself, exactly as `KeyState::is_idle` does, so the
//! TTL is only garbage collection: a hash that outlives `idle_at` reads as empty, and
//! the grace keeps a hash from expiring early when the caller's clock lags the
//! server's. A refused event or a peek writes nothing, not even the TTL.
//!
//! # Capabilities
//!
//! [`DistinctStore`](crate::distinct::DistinctStore) (distinct client networks per
//! user) is a second script, `redis_distinct.lua`, over its own hash per key (see
//! `redis_distinct.rs`).
//!
//! [`Forget`] is one `DEL`. [`Scan`] walks the keyspace with `SCAN` (never `KEYS`) and
//! reads each batch of hashes in one pipelined round trip; it and
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
//! A [`redis::Client`] and a small pool of idle synchronous connections behind a mutex
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

use std::fmt;
use std::time::Duration;

use parking_lot::Mutex;
use redis::{Connection, ConnectionLike, ErrorKind, RedisError, ServerErrorKind};

use super::{Forget, Scan, Store, StoreError};
use crate::algorithm::{Counter, CounterData, KeyState, Slot};
use crate::clock::{Timestamp, duration_to_millis};
use crate::decision::{Cost, Decision, Denial, LimitStatus, Mode};
use crate::quota::{Algorithm, CounterId, Limit};

/// The decision script (see the module docs).
const SCRIPT: &str = include_str!("redis_check.lua");

// Distinct values per key (the compromise signal): a second script and its own hash
// per key, `<prefix>nets:{<encoded key>}`.
#[path = "redis_distinct.rs"]
mod distinct;

/// Caller timestamps at or past this are refused: the script's arithmetic on them
/// (plain doubles) is exact only well below 2^53.
const MAX_CALLER_MS: u64 = 1 << 52;

/// Whose clock decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeSource {
    /// The Redis server's `TIME`: every host sharing the store agrees. The `now`
    /// passed to [`Store::check`] is ignored.
    #[default]
    Server,
    /// The `now` passed to [`Store::check`] (a manual clock in tests, or one host).
    Caller,
}

/// How a [`RedisStore`] connects and lays out its keys.
///
/// `Debug` never shows the password in the URL.
///
/// # Examples
///
/// ```
/// use ratelimit_core::store::RedisStoreConfig;
/// let c = RedisStoreConfig::new("redis://:s3cret@10.0.0.5:6379/2");
/// assert_eq!(c.redacted_url(), "redis://:***@10.0.0.5:6379/2");
/// assert!(!format!("{c:?}").contains("s3cret"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RedisStoreConfig {
    /// `redis://[[user]:password@]host[:port][/db]` or `redis+unix:///path[?db=N&pass=P]`.
    pub url: String,
    /// Prepended to every key's hash name, so several deployments (or tests) can
    /// share one Redis. Default `rl:`.
    pub key_prefix: String,
    /// The most a new connection may take, handshake included. Default 1 s.
    pub connect_timeout: Duration,
    /// The most one command may take (socket read and write timeouts). Default 1 s.
    pub command_timeout: Duration,
    /// Whose clock decides. Default [`TimeSource::Server`].
    pub time_source: TimeSource,
    /// How long a hash is kept past its `idle_at` before Redis expires it. Decisions
    /// never depend on it (the script checks `idle_at` itself); it only has to cover
    /// how far a caller's clock may lag the server's. Default 60 s.
    pub ttl_grace: Duration,
    /// The most idle connections kept for reuse (more are opened under load and
    /// closed after use). Default 16.
    pub max_idle_connections: usize,
}

impl RedisStoreConfig {
    /// The defaults, with this URL.
    pub fn new(url: impl Into<String>) -> Self {
        RedisStoreConfig {
            url: url.into(),
            key_prefix: "rl:".into(),
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(1),
            time_source: TimeSource::Server,
            ttl_grace: Duration::from_secs(60),
            max_idle_connections: 16,
        }
    }

    /// The URL with any password (and a bare user-info part, which some clients
    /// read as a password) replaced by `***`: safe to log.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Debug for RedisStoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreConfig")
            .field("url", &self.redacted_url())
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("time_source", &self.time_source)
            .field("ttl_grace", &self.ttl_grace)
            .field("max_idle_connections", &self.max_idle_connections)
            .finish()
    }
}

fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..rest_start]);
    match rest[..auth_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                None => out.push_str("***"),
            }
            out.push_str(&rest[at..auth_end]);
        }
        None => out.push_str(&rest[..auth_end]),
    }
    // Query parameters (`redis+unix:///s?pass=...`): hide password values.
    let tail = &rest[auth_end..];
    match tail.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _))
                        if k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password") =>
                    {
                        format!("{k}=***")
                    }
                    _ => p.to_string(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
        None => out.push_str(tail),
    }
    out
}

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
    client: redis::Client,
    config: RedisStoreConfig,
    /// Idle connections; the lock is held only to push or pop one.
    pool: Mutex<Vec<Connection>>,
    /// The script's SHA once loaded (the same on every server for the same script).
    sha: Mutex<Option<String>>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("config", &self.config)
            .field("idle_connections", &self.pool.lock().len())
            .finish()
    }
}

/// What the store was doing when Redis failed (picks the timeout to report).
#[derive(Clone, Copy)]
enum Phase {
    Connect,
    Command,
}

impl RedisStore {
    /// A store for this configuration. Checks the URL but does not connect: the first
    /// check (or [`RedisStore::ping`]) does, so a server can start while Redis is down
    /// and apply its failure policy until Redis is back.
    pub fn new(mut config: RedisStoreConfig) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(config.url.as_str()).map_err(|e| {
            StoreError::Unavailable(format!(
                "invalid Redis URL {}: {}",
                config.redacted_url(),
                e
            ))
        })?;
        // A zero socket timeout is an error for the OS; treat it as the smallest one.
        let min = Duration::from_millis(1);
        config.connect_timeout = config.connect_timeout.max(min);
        config.command_timeout = config.command_timeout.max(min);
        Ok(RedisStore {
            client,
            config,
            pool: Mutex::new(Vec::new()),
            sha: Mutex::new(None),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &RedisStoreConfig {
        &self.config
    }

    /// Checks that Redis answers (and that the credentials are accepted).
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

    fn connect(&self) -> Result<Connection, StoreError> {
        let con = self
            .client
            .get_connection_with_timeout(self.config.connect_timeout)
            .map_err(|e| self.store_error(&e, Phase::Connect))?;
        let timeout = Some(self.config.command_timeout);
        con.set_read_timeout(timeout)
            .and_then(|()| con.set_write_timeout(timeout))
            .map_err(|e| self.store_error(&e, Phase::Connect))?;
        Ok(con)
    }

    fn give_back(&self, con: Connection) {
        let mut pool = self.pool.lock();
        if pool.len() < self.config.max_idle_connections && con.is_open() {
            pool.push(con);
        }
    }

    /// One `DEL` of the hash `name`; whether it existed.
    pub(crate) fn delete(&self, name: &str) -> Result<bool, StoreError> {
        let n: i64 = self.run(|con| redis::cmd("DEL").arg(name).query(con))?;
        Ok(n > 0)
    }

    /// Runs `op` on a pooled or new connection (see "Connections" in the module docs).
    fn run<T>(
        &self,
        mut op: impl FnMut(&mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let pooled = self.pool.lock().pop();
        let reused = pooled.is_some();
        let mut con = match pooled {
            Some(con) => con,
            None => self.connect()?,
        };
        match op(&mut con) {
            Ok(v) => {
                self.give_back(con);
                Ok(v)
            }
            Err(e) if reused && !e.is_timeout() && e.is_connection_dropped() => {
                // The idle connection was dead (Redis restarted, or closed it): the
                // command reached no live server. The other idle ones are likely
                // dead too. Retry once on a fresh connection.
                drop(con);
                self.pool.lock().clear();
                let mut con = self.connect()?;
                let result = op(&mut con);
                self.finish(con, result)
            }
            Err(e) => self.finish(con, Err(e)),
        }
    }

    fn finish<T>(&self, con: Connection, result: redis::RedisResult<T>) -> Result<T, StoreError> {
        match result {
            Ok(v) => {
                self.give_back(con);
                Ok(v)
            }
            Err(e) => {
                // An error reply leaves the connection in step; anything else
                // (I/O, timeout, garbled reply) does not: drop it.
                if matches!(e.kind(), ErrorKind::Server(_) | ErrorKind::Extension) {
                    self.give_back(con);
                }
                Err(self.store_error(&e, Phase::Command))
            }
        }
    }

    fn store_error(&self, e: &RedisError, phase: Phase) -> StoreError {
        let url = self.config.redacted_url();
        if e.is_timeout() {
            return StoreError::Timeout(match phase {
                Phase::Connect => self.config.connect_timeout,
                Phase::Command => self.config.command_timeout,
            });
        }
        match e.kind() {
            ErrorKind::Io => StoreError::Unavailable(match phase {
                Phase::Connect => format!("cannot connect to Redis at {url}: {e}"),
                Phase::Command => format!("lost the connection to Redis at {url}: {e}"),
            }),
            ErrorKind::AuthenticationFailed => {
                StoreError::Unavailable(format!("Redis at {url} refused the credentials: {e}"))
            }
            ErrorKind::InvalidClientConfig => {
                StoreError::Unavailable(format!("bad Redis configuration for {url}: {e}"))
            }
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::NoPerm,
            ) => StoreError::Unavailable(format!("Redis at {url} cannot serve now: {e}")),
            _ => StoreError::Protocol(format!("Redis at {url}: {e}")),
        }
    }

    fn load_script(&self, con: &mut Connection) -> redis::RedisResult<String> {
        let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(SCRIPT).query(con)?;
        *self.sha.lock() = Some(sha.clone());
        Ok(sha)
    }

    /// `EVALSHA` with `args`, loading the script first if this store has not yet, or
    /// again if the server has lost it (`NOSCRIPT`, after a restart or `SCRIPT FLUSH`).
    fn eval(
        &self,
        con: &mut Connection,
        key: &str,
        args: &[String],
    ) -> redis::RedisResult<Vec<String>> {
        let call = |con: &mut Connection, sha: &str| {
            redis::cmd("EVALSHA")
                .arg(sha)
                .arg(1)
                .arg(key)
                .arg(args)
                .query::<Vec<String>>(con)
        };
        let known = self.sha.lock().clone();
        let sha = match known {
            Some(sha) => sha,
            None => self.load_script(con)?,
        };
        match call(con, &sha) {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                let sha = self.load_script(con)?;
                call(con, &sha)
            }
            other => other,
        }
    }
}

/// The script's arguments after the key (see the header of `redis_check.lua`).
fn script_args(
    limits: &[Limit],
    cost: Cost,
    now: Option<Timestamp>,
    grace_ms: u64,
    mode: Mode,
) -> Vec<String> {
    let mut args = Vec::with_capacity(4 + 6 * limits.len());
    args.push(if mode == Mode::Acquire { "1" } else { "0" }.to_string());
    args.push(now.map_or_else(String::new, |t| t.as_millis().to_string()));
    args.push(grace_ms.to_string());
    args.push(limits.len().to_string());
    for l in limits {
        let (kind, extra) = match l.algorithm() {
            Algorithm::SlidingWindow { precision } => ("w", u64::from(precision)),
            Algorithm::TokenBucket { burst } => ("b", u64::from(burst)),
        };
        args.push(l.counter_id().as_u64().to_string());
        args.push(kind.to_string());
        args.push(l.count().to_string());
        args.push(l.window_ms().to_string());
        args.push(extra.to_string());
        args.push(cost.get(l.unit()).to_string());
    }
    args
}

/// Builds the [`Decision`] from the script's reply.
fn decision_from_reply(reply: &[String], limits: &[Limit]) -> Result<Decision, StoreError> {
    let bad = || {
        StoreError::Protocol(format!(
            "the decision script answered {reply:?} for {} limits",
            limits.len()
        ))
    };
    if reply.len() != 3 + 2 * limits.len() {
        return Err(bad());
    }
    // Values the script computes exactly may exceed u64 (a bucket's retry_after);
    // clamp them as `KeyState::apply` does.
    let num = |s: &str| -> Result<u64, StoreError> {
        let v: u128 = s.parse().map_err(|_| bad())?;
        Ok(u64::try_from(v).unwrap_or(u64::MAX))
    };
    let denied: i64 = reply[1].parse().map_err(|_| bad())?;
    let denial = match usize::try_from(denied) {
        Ok(limit) if limit < limits.len() => Some(Denial {
            limit,
            retry_after: match reply[2].as_str() {
                "" => None,
                ms => Some(Duration::from_millis(num(ms)?)),
            },
        }),
        Ok(_) => return Err(bad()),
        Err(_) => None,
    };
    let mut statuses = Vec::with_capacity(limits.len());
    for (i, l) in limits.iter().enumerate() {
        statuses.push(LimitStatus {
            used: num(&reply[3 + 2 * i])?,
            limit: match l.algorithm() {
                Algorithm::SlidingWindow { .. } => l.count(),
                Algorithm::TokenBucket { burst } => u64::from(burst),
            },
            remaining: num(&reply[4 + 2 * i])?,
        });
    }
    Ok(Decision::new(denial, &statuses))
}

impl Store for RedisStore {
    /// One `EVALSHA` round trip; atomic on the Redis server against every other
    /// caller of every host.
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
        let args = script_args(
            limits,
            cost,
            now,
            duration_to_millis(self.config.ttl_grace),
            mode,
        );
        let name = self.key_name(key);
        let reply = self.run(|con| self.eval(con, &name, &args))?;
        decision_from_reply(&reply, limits)
    }
}

impl RedisStore {
    /// The number of keys this store holds, counted with `SCAN` (it walks the whole
    /// keyspace: for occasional statistics, not the hot path).
    pub fn try_key_count(&self) -> Result<usize, StoreError> {
        let mut count = 0;
        self.scan_names(&mut |_, names| {
            count += names.len();
            Ok(())
        })?;
        Ok(count)
    }

    fn scan_names(&self, batch: &mut NameBatch<'_>) -> Result<(), StoreError> {
        let mut pattern = String::new();
        for c in self.config.key_prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push_str("{*");
        let mut cursor = 0u64;
        loop {
            let (next, names): (u64, Vec<String>) = self.run(|con| {
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query(con)
            })?;
            if !names.is_empty() {
                batch(self, &names)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// The key whose hash is `name` (the inverse of [`RedisStore::key_name`]).
    fn key_from_name(&self, name: &str) -> Option<String> {
        let inner = name
            .strip_prefix(self.config.key_prefix.as_str())?
            .strip_prefix('{')?
            .strip_suffix('}')?;
        let mut out = Vec::with_capacity(inner.len());
        let mut bytes = inner.bytes();
        while let Some(b) = bytes.next() {
            if b == b'%' {
                let hex = [bytes.next()?, bytes.next()?];
                let hex = std::str::from_utf8(&hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
            } else {
                out.push(b);
            }
        }
        String::from_utf8(out).ok()
    }
}

/// Called with each batch of hash names that `SCAN` returns.
type NameBatch<'a> = dyn FnMut(&RedisStore, &[String]) -> Result<(), StoreError> + 'a;

/// Rebuilds a [`KeyState`] from a hash's fields (the layout in the module docs).
fn state_from_fields(fields: &[(String, String)]) -> Option<KeyState> {
    let mut state = KeyState::new();
    for (field, value) in fields {
        if field == "i" {
            let v: u128 = value.parse().ok()?;
            state.idle_at = u64::try_from(v).unwrap_or(u64::MAX);
            continue;
        }
        let id = CounterId::from_u64(field.parse().ok()?);
        let data = if id.is_bucket() {
            let (level, last) = value.split_once(':')?;
            CounterData::Bucket {
                level: level.parse().ok()?,
                last: last.parse().ok()?,
            }
        } else {
            let mut slots = smallvec::SmallVec::new();
            for slot in value.split(',').filter(|s| !s.is_empty()) {
                let (idx, count) = slot.split_once(':')?;
                slots.push(Slot {
                    idx: idx.parse().ok()?,
                    count: count.parse().ok()?,
                });
            }
            CounterData::Window(slots)
        };
        state.counters.push(Counter { id, data });
    }
    Some(state)
}

impl Scan for RedisStore {
    /// Calls `f` for every key this store holds (every hash under its prefix) with its
    /// state. Walks the keyspace with `SCAN` (never `KEYS`, so the server is not
    /// blocked) and reads each batch's hashes in one pipelined round trip. Hashes past
    /// their `idle_at` but still within the TTL grace are included: check
    /// [`KeyState::is_idle`] (with the Redis server's time under
    /// [`TimeSource::Server`]). Keys written meanwhile may or may not be seen. A Redis
    /// failure ends the scan with its error, after `f` has seen the keys read so far.
    fn scan(&self, f: &mut dyn FnMut(&str, &KeyState)) -> Result<(), StoreError> {
        self.scan_names(&mut |store, names| {
            let mut pipe = redis::pipe();
            for name in names {
                pipe.cmd("HGETALL").arg(name);
            }
            let hashes: Vec<Vec<(String, String)>> = store.run(|con| pipe.query(con))?;
            for (name, fields) in names.iter().zip(hashes) {
                // Expired between SCAN and HGETALL, or not one of ours.
                let Some(key) = store.key_from_name(name) else {
                    continue;
                };
                if fields.is_empty() {
                    continue;
                }
                let state = state_from_fields(&fields).ok_or_else(|| {
                    StoreError::Protocol(format!("unreadable rate-limit state in {name}"))
                })?;
                f(&key, &state);
            }
            Ok(())
        })
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
    fn passwords_never_show() {
        let cases = [
            ("redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/"),
            ("redis://:pw@host:1/0", "redis://:***@host:1/0"),
            ("redis://user:pw@host", "redis://user:***@host"),
            ("redis://pw@host/", "redis://***@host/"),
            ("redis://u:p@ss@host/", "redis://u:***@host/"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=pw",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            ("not a url", "not a url"),
        ];
        for (url, want) in cases {
            let c = RedisStoreConfig::new(url);
            assert_eq!(c.redacted_url(), want, "{url}");
            let debug = format!("{c:?}");
            assert!(debug.contains(want), "{debug}");
        }
        let store =
            RedisStore::new(RedisStoreConfig::new("redis://:hunter2@127.0.0.1:1/")).unwrap();
        assert!(!format!("{store:?}").contains("hunter2"));
    }

    #[test]
    fn key_names_are_escaped_and_distinct() {
        let store = RedisStore::new(RedisStoreConfig::new("redis://127.0.0.1/")).unwrap();
        let keys = ["a}b", "a%7Db", "a b", "a\nb", "ümlaut@例え.jp", "", "{x}"];
        let names: Vec<String> = keys.iter().map(|k| store.key_name(k)).collect();
        for (k, n) in keys.iter().zip(&names) {
            let inner = &n["rl:{".len()..n.len() - 1];
            assert!(!inner.contains(['{', '}', ' ', '\n']), "{k:?} -> {n}");
        }
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert_eq!(names[4], "rl:{ümlaut@例え.jp}");
        for (k, n) in keys.iter().zip(&names) {
            assert_eq!(store.key_from_name(n).as_deref(), Some(*k));
        }
        assert_eq!(store.key_from_name("rl:{a%2}"), None);
        assert_eq!(store.key_from_name("other:{a}"), None);
    }

    #[test]
    fn a_bad_url_is_refused_without_echoing_the_password() {
        let err = RedisStore::new(RedisStoreConfig::new("http://:hunter2@host/")).unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
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

    #[test]
    fn replies_of_the_wrong_shape_are_protocol_errors() {
        let limits = ["1/1m".parse::<Limit>().unwrap()];
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(decision_from_reply(&s(&["0", "-1", "", "0", "1"]), &limits).is_ok());
        for bad in [
            &["0", "-1", ""][..],
            &["0", "5", "", "0", "1"],
            &["0", "x", "", "0", "1"],
            &["0", "0", "soon", "0", "1"],
            &["0", "-1", "", "-3", "1"],
        ] {
            let err = decision_from_reply(&s(bad), &limits).unwrap_err();
            assert!(matches!(err, StoreError::Protocol(_)), "{bad:?}: {err}");
        }
    }
}
