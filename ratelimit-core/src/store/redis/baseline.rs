//! [`BaselineStore`] for [`RedisStore`]: one `EVALSHA` of `redis_baseline.lua` per
//! observation, mirroring [`BaselineState::roll`] and [`BaselineState::record`].
//!
//! Each user's state is one 34-byte string, `<prefix>base:{<encoded key>}` (the same
//! hash tag as the user's counters, so the same Redis Cluster slot; outside the
//! `<prefix>{*` pattern that counter scans walk). The script returns the state rolled
//! to now and the judgement is computed here, by the same Rust code as the memory
//! store's. Looking (no message accepted) writes nothing. Recording sets the TTL to a
//! bound on when the state has surely decayed to nothing: `usual` is below 2^32/256
//! messages and halves at least every `half_life + 1` days (the decay factor is
//! rounded to 1/65536), so 33 × (half-life + 2) days after the last message it is
//! zero, plus [`ttl_grace`](super::RedisStoreConfig::ttl_grace). The TTL is only
//! garbage collection: a state read later is rolled, and reads as empty, exactly as
//! the memory store's would.

use parking_lot::Mutex;
use redis::{ErrorKind, ServerErrorKind};

use super::connection::Conn as Connection;

use super::{MAX_CALLER_MS, RedisStore, TimeSource};
use crate::baseline::{BaselineConfig, BaselineState, BaselineStore, DAY_MS, Judgement, SLOTS};
use crate::clock::{Timestamp, duration_to_millis};
use crate::store::StoreError;

/// The baseline script (see its header).
const SCRIPT: &str = include_str!("redis_baseline.lua");

/// The script's SHA once loaded (one per process: it depends only on the text).
static SHA: Mutex<Option<String>> = Mutex::new(None);

impl RedisStore {
    /// The name of the Redis string that holds `key`'s baseline.
    ///
    /// # Examples
    ///
    /// ```
    /// use ratelimit_core::store::{RedisStore, RedisStoreConfig};
    /// let store = RedisStore::new(RedisStoreConfig::new("redis://127.0.0.1/")).unwrap();
    /// assert_eq!(store.baseline_key_name("alice@example.com"), "rl:base:{alice@example.com}");
    /// ```
    pub fn baseline_key_name(&self, key: &str) -> String {
        let name = self.key_name(key);
        let prefix = self.config.key_prefix.len();
        format!(
            "{}base:{}",
            &self.config.key_prefix,
            name.get(prefix..).unwrap_or_default()
        )
    }

    fn eval_baseline<T: redis::FromRedisValue>(
        &self,
        con: &mut Connection,
        name: &str,
        args: &[String],
    ) -> redis::RedisResult<T> {
        let call = |con: &mut Connection, sha: &str| {
            redis::cmd("EVALSHA")
                .arg(sha)
                .arg(1)
                .arg(name)
                .arg(args)
                .query::<T>(con)
        };
        let load = |con: &mut Connection| -> redis::RedisResult<String> {
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

/// The TTL to set on a recorded state, in ms (see the module docs).
fn ttl_ms(cfg: &BaselineConfig, grace_ms: u64) -> u64 {
    33 * (u64::from(cfg.half_life_days()) + 2) * DAY_MS + grace_ms
}

/// `now` and the state in the script's reply.
fn state_from_reply(reply: &[i64]) -> Result<(Timestamp, BaselineState), StoreError> {
    let bad = || StoreError::Protocol(format!("the baseline script answered {reply:?}"));
    let [now, slot, c @ .., day, day_max, usual, since] = reply else {
        return Err(bad());
    };
    let u32_of = |v: &i64| u32::try_from(*v).map_err(|_| bad());
    let mut counts = [0u16; SLOTS];
    if c.len() != SLOTS {
        return Err(bad());
    }
    for (out, v) in counts.iter_mut().zip(c) {
        *out = u16::try_from(*v).map_err(|_| bad())?;
    }
    let now = u64::try_from(*now).map_err(|_| bad())?;
    Ok((
        Timestamp::from_millis(now),
        BaselineState {
            slot: u32_of(slot)?,
            counts,
            day: u32_of(day)?,
            day_max: u32_of(day_max)?,
            usual: u32_of(usual)?,
            since: u32_of(since)?,
        },
    ))
}

impl RedisStore {
    /// `key`'s baseline rolled to `now` (the server's time with
    /// [`TimeSource::Server`]), and that time, recording `accepted` messages. One
    /// `EVALSHA` round trip.
    pub fn baseline_state(
        &self,
        key: &str,
        accepted: u32,
        cfg: &BaselineConfig,
        now: Timestamp,
    ) -> Result<(Timestamp, BaselineState), StoreError> {
        let reply: Vec<i64> = self.eval_op(key, accepted, cfg, now, "o")?;
        state_from_reply(&reply)
    }
}

impl RedisStore {
    /// Runs the script's `op` on `key`.
    fn eval_op<T: redis::FromRedisValue>(
        &self,
        key: &str,
        accepted: u32,
        cfg: &BaselineConfig,
        now: Timestamp,
        op: &str,
    ) -> Result<T, StoreError> {
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
            accepted.to_string(),
            cfg.decay().to_string(),
            ttl_ms(cfg, duration_to_millis(self.config.ttl_grace)).to_string(),
            op.to_string(),
        ];
        let name = self.baseline_key_name(key);
        self.run(|con| self.eval_baseline(con, &name, &args))
    }
}

/// `state` as the script stores it: 34 bytes, little-endian (see its header).
fn encode_state(state: &BaselineState) -> Vec<u8> {
    let mut out = Vec::with_capacity(34);
    out.extend_from_slice(&state.slot.to_le_bytes());
    for c in state.counts {
        out.extend_from_slice(&c.to_le_bytes());
    }
    for v in [state.day, state.day_max, state.usual, state.since] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// What [`RedisStore::import_baselines`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BaselineImport {
    /// States written.
    pub written: usize,
    /// States not written because the user already had one in Redis (without
    /// `replace`).
    pub kept: usize,
}

impl RedisStore {
    /// Writes learned baselines into Redis (day-one baselines for a fleet: the
    /// states `replay --write-snapshot` learned from recorded traffic, decoded with
    /// [`decode_baselines`](crate::store::decode_baselines)), each with the TTL a
    /// recorded state gets. A user who already has a state in Redis keeps it unless
    /// `replace`. Pipelined, 500 users per round trip.
    pub fn import_baselines(
        &self,
        states: &[(String, BaselineState)],
        cfg: &BaselineConfig,
        replace: bool,
    ) -> Result<BaselineImport, StoreError> {
        let ttl = ttl_ms(cfg, duration_to_millis(self.config.ttl_grace));
        let mut done = BaselineImport::default();
        for chunk in states.chunks(500) {
            let mut pipe = redis::pipe();
            for (key, state) in chunk {
                let set = pipe
                    .cmd("SET")
                    .arg(self.baseline_key_name(key))
                    .arg(encode_state(state))
                    .arg("PX")
                    .arg(ttl);
                if !replace {
                    set.arg("NX");
                }
            }
            let replies: Vec<Option<String>> = self.run(|con| pipe.query(con))?;
            let written = replies.iter().filter(|r| r.is_some()).count();
            done.written += written;
            done.kept += chunk.len() - written;
        }
        Ok(done)
    }
}

impl BaselineStore for RedisStore {
    /// One `EVALSHA` round trip; atomic on the Redis server against every caller.
    fn observe(
        &self,
        key: &str,
        accepted: u32,
        cfg: &BaselineConfig,
        now: Timestamp,
    ) -> Result<Judgement, StoreError> {
        let (now, state) = self.baseline_state(key, accepted, cfg, now)?;
        Ok(state.judge(now, cfg))
    }

    /// One `EVALSHA` round trip.
    fn clear_hour(
        &self,
        key: &str,
        cfg: &BaselineConfig,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let had: i64 = self.eval_op(key, 0, cfg, now, "c")?;
        Ok(had == 1)
    }

    /// One `DEL`.
    fn forget(&self, key: &str) -> Result<bool, StoreError> {
        self.delete(&self.baseline_key_name(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedisStoreConfig;

    #[test]
    fn baseline_strings_share_the_slot_and_stay_out_of_counter_scans() {
        let store = RedisStore::new(RedisStoreConfig::new("redis://127.0.0.1/")).unwrap();
        assert_eq!(store.baseline_key_name("a}b"), "rl:base:{a%7Db}");
        assert_eq!(store.key_from_name(&store.baseline_key_name("alice")), None);
    }

    #[test]
    fn replies_of_the_wrong_shape_are_protocol_errors() {
        let good = [5, 7, 0, 0, 0, 0, 0, 0, 3, 9, 3, 256, 1];
        let (now, s) = state_from_reply(&good).unwrap();
        assert_eq!(now, Timestamp::from_millis(5));
        assert_eq!(
            (s.slot, s.hour(), s.day, s.usual, s.since),
            (7, 3, 9, 256, 1)
        );
        let mut long = good.to_vec();
        long.push(0);
        let mut neg = good;
        neg[11] = -1;
        let mut big = good;
        big[2] = 70_000;
        for bad in [&good[..12], &long[..], &neg[..], &big[..]] {
            assert!(
                matches!(state_from_reply(bad), Err(StoreError::Protocol(_))),
                "{bad:?}"
            );
        }
    }
}
