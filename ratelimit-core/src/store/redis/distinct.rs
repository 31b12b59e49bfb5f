//! [`DistinctStore`] for [`RedisStore`]: one `EVALSHA` of `redis_distinct.lua` per
//! observation, mirroring [`DistinctState::observe`](crate::distinct::DistinctState::observe).
//!
//! Each key's values live in their own hash, `<prefix>nets:{<encoded key>}`: the same
//! hash tag as the key's counters (same Redis Cluster slot), and outside the
//! `<prefix>{*` pattern that its [`Scan`](crate::store::Scan) and `try_key_count`
//! walk, so counter listings are unchanged. Field `f` is the flag's end (ms), and field
//! `v<value>` the value's last-seen time (ms), for at most `max + 1` values. Every
//! observation sets the hash's TTL to when it goes idle plus
//! [`ttl_grace`](super::RedisStoreConfig::ttl_grace).

use parking_lot::Mutex;
use redis::{ErrorKind, ServerErrorKind};

use super::connection::Conn;
use super::{MAX_CALLER_MS, RedisStore, TimeSource};
use crate::clock::{Timestamp, duration_to_millis};
use crate::distinct::{DistinctLimit, DistinctStore, Observation};
use crate::store::StoreError;

/// The observation script (see its header).
const SCRIPT: &str = include_str!("redis_distinct.lua");

/// The script's SHA once loaded. A SHA depends only on the script text, so one cache
/// serves every store in the process; a server without it answers `NOSCRIPT` and the
/// script is loaded there.
static SHA: Mutex<Option<String>> = Mutex::new(None);

impl RedisStore {
    /// The name of the Redis hash that holds `key`'s distinct values.
    ///
    /// # Examples
    ///
    /// ```
    /// use ratelimit_core::store::{RedisStore, RedisStoreConfig};
    /// let store = RedisStore::new(RedisStoreConfig::new("redis://127.0.0.1/")).unwrap();
    /// assert_eq!(store.distinct_key_name("alice@example.com"), "rl:nets:{alice@example.com}");
    /// ```
    pub fn distinct_key_name(&self, key: &str) -> String {
        let name = self.key_name(key);
        let prefix = self.config.key_prefix.len();
        format!(
            "{}nets:{}",
            &self.config.key_prefix,
            name.get(prefix..).unwrap_or_default()
        )
    }

    fn eval_distinct(
        &self,
        con: &mut Conn,
        name: &str,
        args: &[String],
    ) -> redis::RedisResult<Vec<String>> {
        let call = |con: &mut Conn, sha: &str| {
            redis::cmd("EVALSHA")
                .arg(sha)
                .arg(1)
                .arg(name)
                .arg(args)
                .query::<Vec<String>>(con)
        };
        let load = |con: &mut Conn| -> redis::RedisResult<String> {
            let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(SCRIPT).query(con)?;
            *SHA.lock() = Some(sha.clone());
            Ok(sha)
        };
        let known = SHA.lock().clone();
        let sha = match known {
            Some(sha) => sha,
            None => load(con)?,
        };
        match call(con, &sha) {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                let sha = load(con)?;
                call(con, &sha)
            }
            other => other,
        }
    }
}

/// The [`Observation`] in the script's reply.
fn observation_from_reply(reply: &[String]) -> Result<Observation, StoreError> {
    let bad = || StoreError::Protocol(format!("the distinct script answered {reply:?}"));
    let [_now, distinct, flagged_until, newly] = reply else {
        return Err(bad());
    };
    Ok(Observation {
        distinct: distinct.parse().map_err(|_| bad())?,
        flagged_until: match flagged_until.as_str() {
            "" => None,
            ms => Some(Timestamp::from_millis(ms.parse().map_err(|_| bad())?)),
        },
        newly_flagged: match newly.as_str() {
            "1" => true,
            "0" => false,
            _ => return Err(bad()),
        },
    })
}

impl DistinctStore for RedisStore {
    /// One `EVALSHA` round trip; atomic on the Redis server against every caller.
    fn observe(
        &self,
        key: &str,
        value: &str,
        limit: &DistinctLimit,
        now: Timestamp,
    ) -> Result<Observation, StoreError> {
        let now = match self.config.time_source {
            TimeSource::Server => String::new(),
            TimeSource::Caller if now.as_millis() < MAX_CALLER_MS => now.as_millis().to_string(),
            TimeSource::Caller => {
                return Err(StoreError::Protocol(format!(
                    "timestamp {} ms is past what the Redis script computes exactly (2^52 ms)",
                    now.as_millis()
                )));
            }
        };
        let args = [
            now,
            duration_to_millis(self.config.ttl_grace).to_string(),
            limit.max().to_string(),
            limit.window_ms().to_string(),
            value.to_string(),
        ];
        let name = self.distinct_key_name(key);
        let reply = self.run(|con| self.eval_distinct(con, &name, &args))?;
        observation_from_reply(&reply)
    }

    /// One `DEL`.
    fn forget(&self, key: &str) -> Result<bool, StoreError> {
        self.delete(&self.distinct_key_name(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedisStoreConfig;

    #[test]
    fn distinct_hashes_share_the_slot_and_stay_out_of_counter_scans() {
        let store = RedisStore::new(RedisStoreConfig::new("redis://127.0.0.1/")).unwrap();
        assert_eq!(store.distinct_key_name("a}b"), "rl:nets:{a%7Db}");
        assert!(!store.distinct_key_name("alice").starts_with("rl:{"));
        assert_eq!(store.key_from_name(&store.distinct_key_name("alice")), None);
        // The Redis Cluster slot (CRC16 of the hash tag) is the counters' slot, for
        // keys with braces, spaces and non-ASCII too. (Not for the empty key: Redis
        // hashes a whole name whose braces are empty. Every script call touches one
        // hash, so that costs nothing.)
        use redis::cluster_routing::Slot;
        for key in [
            "alice@example.com",
            "a}b",
            "{x}",
            "odd {user} 100%",
            "ümlaut",
            " ",
        ] {
            assert_eq!(
                Slot::for_key(store.key_name(key)),
                Slot::for_key(store.distinct_key_name(key)),
                "{key:?}"
            );
        }
        // ...and keys do spread over slots.
        assert_ne!(
            Slot::for_key(store.key_name("alice")),
            Slot::for_key(store.key_name("bob"))
        );
    }

    #[test]
    fn replies_of_the_wrong_shape_are_protocol_errors() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            observation_from_reply(&s(&["5", "3", "99", "1"])).unwrap(),
            Observation {
                distinct: 3,
                flagged_until: Some(Timestamp::from_millis(99)),
                newly_flagged: true
            }
        );
        for bad in [
            &["5", "3", ""][..],
            &["5", "x", "", "0"],
            &["5", "3", "soon", "0"],
            &["5", "3", "", "2"],
        ] {
            assert!(
                matches!(
                    observation_from_reply(&s(bad)),
                    Err(StoreError::Protocol(_))
                ),
                "{bad:?}"
            );
        }
    }
}
