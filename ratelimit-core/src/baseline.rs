//! Per-user sending baselines: how much a user usually sends in their busiest hour,
//! and whether the last hour is far above it (the second compromise signal).
//!
//! A phished light sender taken over from one host is stopped by the tier's volume
//! limit only once it is full (100 an hour by default). Judged against their own
//! past, the same account is flagged after a handful of messages. This module is the
//! pure estimator: a small [`BaselineState`] per user (36 bytes, `Copy`), updated by
//! [`BaselineState::record`] with the messages that were **accepted** (never those
//! held or refused, so an abuser cannot teach the estimator their own volume), read by
//! [`BaselineState::judge`]. Stores keep a state per key behind [`BaselineStore`]
//! ([`BaselineMemoryStore`](crate::store::BaselineMemoryStore) in process, and the
//! Redis store with the cargo feature `redis`).
//!
//! # What is measured
//!
//! - **The hour's volume**: messages accepted in the last hour, counted in seven
//!   10-minute slots (the current one and the six before it). Like the sliding windows
//!   of [`crate::algorithm`], it may only over-count, by at most one slot's worth of
//!   time: it counts every message accepted since the start of the slot that began an
//!   hour before the current one.
//! - **Today's busiest hour** (`day_max`): the largest hour's volume reached during the
//!   current UTC day.
//! - **The usual busiest hour** (`usual`): at the end of each day, with that day's
//!   busiest hour `m` (0 for a day without mail),
//!
//!   ```text
//!   decayed = usual × d            d = 2^(-1/half_life), one factor per day
//!   usual'  = max(decayed, min(m, 2 × decayed + 2))
//!   ```
//!
//!   A decayed peak: it follows a user's busiest days down slowly (after a week
//!   without a busy day, with a 7-day half-life, it has halved), so a weekly rhythm
//!   keeps the Monday peak in view; and it can at most double (plus two messages) in
//!   one day, so one unusual day (a mailing, a compromise held at the threshold) moves
//!   it a bounded step instead of to the day's volume. `usual` is kept in 1/256
//!   messages and every product is computed in integers, so the Redis script computes
//!   the same values exactly.
//! - **Learned since**: the time of the first accepted message. A user whose `usual`
//!   has decayed to zero (months without mail) is forgotten and learns again.
//!
//! # What is decided
//!
//! With at least `learn` of history, a message is **flagged** when the hour's volume
//! with it would exceed `max(min, factor × usual)`; that is, while
//! `hour + 1 > threshold`. Accepted mail never takes the hour past the threshold, so
//! an abuser gets at most `threshold` messages an hour through, and the flag clears
//! as soon as the hour's volume falls back under the threshold. Users without enough
//! history are not judged (the tier's limits still hold).
//!
//! # Examples
//!
//! ```
//! use ratelimit_core::baseline::{BaselineConfig, BaselineState};
//! use ratelimit_core::Timestamp;
//! use std::time::Duration;
//!
//! const DAY: u64 = 86_400_000;
//! let cfg = BaselineConfig::new(Duration::from_secs(7 * 86_400), 5.0, 10, 7).unwrap();
//! let mut alice = BaselineState::new();
//! // Three weeks of two messages a day, at noon.
//! for day in 0..21 {
//!     for _ in 0..2 {
//!         alice.record(Timestamp::from_millis(day * DAY + DAY / 2), 1, &cfg);
//!     }
//! }
//! // Day 21: her account sends from one host without stopping.
//! let now = Timestamp::from_millis(21 * DAY + DAY / 2);
//! let mut accepted = 0;
//! while !alice.judge(now, &cfg).flagged {
//!     alice.record(now, 1, &cfg);
//!     accepted += 1;
//! }
//! assert_eq!(accepted, 10); // max(min = 10, 5 × 2)
//! ```

use std::time::Duration;

use crate::clock::{Timestamp, duration_to_millis};
use crate::decision::StoreError;

/// A slot of the hour's volume, in ms (10 minutes).
pub const SLOT_MS: u64 = 600_000;
/// Slots counted in the hour's volume: the current one and the six before it.
pub const SLOTS: usize = 7;
/// A day, in ms (UTC days: day `n` starts at `n × DAY_MS`).
pub const DAY_MS: u64 = 86_400_000;
/// `usual` is kept in 1/256 messages.
pub const SCALE: u64 = 256;
/// The most `usual` may grow in one day beyond doubling, in 1/256 messages (2).
pub const GROWTH_ADD: u64 = 2 * SCALE;
/// The per-day decay factor is kept in 1/65536.
pub const DECAY_ONE: u64 = 65_536;

/// How users are judged against their baseline, checked when built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BaselineConfig {
    /// History needed before a user is judged, ms.
    learn_ms: u64,
    /// The factor in 1/256 (1..=65535, a factor up to 255.99): with `usual` below
    /// 2^32 the product stays below 2^48, exact in the Redis script's doubles.
    factor_256: u32,
    min: u32,
    half_life_days: u32,
    /// `2^(-1/half_life)` in 1/65536, rounded.
    decay: u32,
}

/// Why a [`BaselineConfig`] cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BaselineConfigError {
    /// The factor is not a number from 1 to 255.
    #[error("the factor must be a number from 1 to 255")]
    Factor,
    /// The minimum is zero or above a million.
    #[error("the minimum must be from 1 to 1000000 messages")]
    Min,
    /// The half-life is not from 1 to 365 days.
    #[error("the half-life must be from 1 to 365 days")]
    HalfLife,
    /// The learning time is longer than ten years.
    #[error("the learning time must be at most 3650 days")]
    Learn,
}

impl BaselineConfig {
    /// Users with at least `learn` of history are flagged above
    /// `max(min, factor × usual)`; `usual` halves in `half_life_days` without a
    /// busy day.
    pub fn new(
        learn: Duration,
        factor: f64,
        min: u32,
        half_life_days: u32,
    ) -> Result<BaselineConfig, BaselineConfigError> {
        if !(1.0..256.0).contains(&factor) {
            return Err(BaselineConfigError::Factor);
        }
        if min == 0 || min > 1_000_000 {
            return Err(BaselineConfigError::Min);
        }
        if half_life_days == 0 || half_life_days > 365 {
            return Err(BaselineConfigError::HalfLife);
        }
        let learn_ms = duration_to_millis(learn);
        if learn_ms > 3650 * DAY_MS {
            return Err(BaselineConfigError::Learn);
        }
        // In range by the checks above: factor × 256 < 65536, the decay below 65536.
        let factor_256 = ((factor * 256.0).round() as u32).min(65_535);
        let decay = (DECAY_ONE as f64 * (-1.0 / f64::from(half_life_days)).exp2()).round() as u32;
        Ok(BaselineConfig {
            learn_ms,
            factor_256,
            min,
            half_life_days,
            decay: decay.min(DECAY_ONE as u32 - 1),
        })
    }

    /// The same configuration with another factor (a tier's `baseline_factor`).
    pub fn with_factor(self, factor: f64) -> Result<BaselineConfig, BaselineConfigError> {
        BaselineConfig::new(
            Duration::from_millis(self.learn_ms),
            factor,
            self.min,
            self.half_life_days,
        )
    }

    /// History needed before a user is judged.
    pub fn learn(&self) -> Duration {
        Duration::from_millis(self.learn_ms)
    }

    /// The factor, as kept (rounded to 1/256).
    pub fn factor(&self) -> f64 {
        f64::from(self.factor_256) / 256.0
    }

    /// The factor in 1/256.
    pub fn factor_256(&self) -> u32 {
        self.factor_256
    }

    /// Never flag at this many messages in the hour or fewer.
    pub fn min(&self) -> u32 {
        self.min
    }

    /// Days for `usual` to halve without a busy day.
    pub fn half_life_days(&self) -> u32 {
        self.half_life_days
    }

    /// The per-day decay factor in 1/65536.
    pub fn decay(&self) -> u32 {
        self.decay
    }

    /// The threshold for a user whose usual busiest hour is `usual` (in 1/256):
    /// `max(min, floor(factor × usual))`.
    pub fn threshold(&self, usual: u32) -> u32 {
        let scaled = u64::from(self.factor_256) * u64::from(usual) / (SCALE * SCALE);
        u32::try_from(scaled).unwrap_or(u32::MAX).max(self.min)
    }
}

/// One day's update of `usual` (in 1/256) with the day's busiest hour `day_max`.
pub fn step(usual: u32, day_max: u32, decay: u32) -> u32 {
    let decayed = u64::from(usual) * u64::from(decay) / DECAY_ONE;
    let grown = 2 * decayed + GROWTH_ADD;
    let seen = u64::from(day_max) * SCALE;
    let next = decayed.max(seen.min(grown));
    u32::try_from(next).unwrap_or(u32::MAX)
}

/// One user's baseline. 36 bytes: 18 for the hour's slots (today's state), 16 for the
/// day and the history, 2 of padding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BaselineState {
    /// The newest slot (`ms / SLOT_MS`); never moves back.
    pub slot: u32,
    /// Messages accepted per slot, oldest first; `counts[SLOTS - 1]` is `slot`'s.
    /// Saturate at 65535 (a user can pass that only under a tier far above it).
    pub counts: [u16; SLOTS],
    /// The day `day_max` belongs to (`ms / DAY_MS`); never moves back.
    pub day: u32,
    /// The largest hour's volume reached during `day`.
    pub day_max: u32,
    /// The usual busiest hour, in 1/256 messages.
    pub usual: u32,
    /// When the first accepted message was learned, in seconds since the epoch (0:
    /// nothing learned).
    pub since: u32,
}

/// What [`BaselineState::judge`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judgement {
    /// Messages accepted in the last hour.
    pub hour: u32,
    /// The usual busiest hour, in 1/256 messages.
    pub usual: u32,
    /// The largest hour's volume today.
    pub day_max: u32,
    /// History learned so far (0: none).
    pub learned_ms: u64,
    /// The threshold, once the user is judged (`None` while learning).
    pub threshold: Option<u32>,
    /// Whether one more message now would take the hour over the threshold.
    pub flagged: bool,
    /// While flagged: when the flag clears if nothing more is accepted (ms).
    pub clears_at: Option<u64>,
}

impl Judgement {
    /// The usual busiest hour in messages (rounded to the nearest tenth).
    pub fn usual_messages(&self) -> f64 {
        (f64::from(self.usual) / SCALE as f64 * 10.0).round() / 10.0
    }

    /// Whole days of history learned.
    pub fn learned_days(&self) -> u64 {
        self.learned_ms / DAY_MS
    }
}

fn slot_of(now: Timestamp) -> u32 {
    u32::try_from(now.as_millis() / SLOT_MS).unwrap_or(u32::MAX)
}

fn day_of(now: Timestamp) -> u32 {
    u32::try_from(now.as_millis() / DAY_MS).unwrap_or(u32::MAX)
}

impl BaselineState {
    /// An empty state: nothing learned.
    pub fn new() -> BaselineState {
        BaselineState::default()
    }

    /// Whether nothing is kept: no recent message, no history. A store may forget
    /// such a state.
    pub fn is_empty(&self) -> bool {
        self.since == 0 && self.usual == 0 && self.day_max == 0 && self.hour() == 0
    }

    /// Messages accepted in the hour ending at the newest slot.
    pub fn hour(&self) -> u32 {
        self.counts.iter().map(|&c| u32::from(c)).sum()
    }

    /// Brings the state to `now`: slots that left the hour are dropped, and every
    /// day that ended is closed with [`step`] (the first with `day_max`, the days
    /// without mail after it with 0). A clock stepping back moves nothing back.
    ///
    /// Rolling is idempotent and composes: rolling to `t1` then `t2` is rolling to
    /// `t2` (a store may roll a state at any time, a sweep does).
    pub fn roll(&mut self, now: Timestamp, cfg: &BaselineConfig) {
        let slot = slot_of(now);
        if slot > self.slot {
            let shift = (slot - self.slot) as usize;
            for i in 0..SLOTS {
                self.counts[i] = match i.checked_add(shift) {
                    Some(j) if j < SLOTS => self.counts[j],
                    _ => 0,
                };
            }
            self.slot = slot;
        }
        let day = day_of(now);
        if day > self.day {
            let mut days = day - self.day;
            let mut m = self.day_max;
            // Each day lowers a nonzero `usual` by at least 1/256: the loop ends.
            while days > 0 && (self.usual > 0 || m > 0) {
                self.usual = step(self.usual, m, cfg.decay);
                m = 0;
                days -= 1;
            }
            self.day = day;
            self.day_max = 0;
            if self.usual == 0 {
                self.since = 0;
            }
        }
    }

    /// Rolls to `now` and records `accepted` messages (accepted by every limit and
    /// signal: held or refused mail must not be recorded).
    pub fn record(&mut self, now: Timestamp, accepted: u32, cfg: &BaselineConfig) {
        self.roll(now, cfg);
        if accepted == 0 {
            return;
        }
        let last = &mut self.counts[SLOTS - 1];
        *last = u16::try_from(u32::from(*last).saturating_add(accepted)).unwrap_or(u16::MAX);
        self.day_max = self.day_max.max(self.hour());
        if self.since == 0 {
            let s = u32::try_from(now.as_millis() / 1000).unwrap_or(u32::MAX);
            self.since = s.max(1);
        }
    }

    /// Forgets the hour's volume (and so the flag), keeping the history: `admin
    /// reset`. Returns whether there was any.
    pub fn clear_hour(&mut self) -> bool {
        let had = self.hour() > 0;
        self.counts = [0; SLOTS];
        had
    }

    /// Judges the state at `now` (rolled to `now` first, on a copy).
    pub fn judge(&self, now: Timestamp, cfg: &BaselineConfig) -> Judgement {
        let mut s = *self;
        s.roll(now, cfg);
        let hour = s.hour();
        let learned_ms = match s.since {
            0 => 0,
            since => now.as_millis().saturating_sub(u64::from(since) * 1000),
        };
        let threshold =
            (s.since != 0 && learned_ms >= cfg.learn_ms).then(|| cfg.threshold(s.usual));
        let flagged = threshold.is_some_and(|t| u64::from(hour) + 1 > u64::from(t));
        let clears_at = match threshold {
            Some(t) if flagged => {
                // Slots leave the hour oldest first: slot `s.slot - (SLOTS-1) + i`
                // leaves when slot `s.slot + 1 + i` begins.
                let mut left = hour;
                let mut at = None;
                for (i, &c) in s.counts.iter().enumerate() {
                    left -= u32::from(c);
                    if left < t {
                        at = Some((u64::from(s.slot) + 1 + i as u64) * SLOT_MS);
                        break;
                    }
                }
                at
            }
            _ => None,
        };
        Judgement {
            hour,
            usual: s.usual,
            day_max: s.day_max,
            learned_ms,
            threshold,
            flagged,
            clears_at,
        }
    }
}

/// Where [`BaselineState`]s live.
///
/// # Contract
///
/// [`BaselineStore::observe`] on one key is atomic against every other caller of the
/// same store: it rolls the key's state to `now`, records `accepted` and judges, as
/// [`BaselineState::record`] and [`BaselineState::judge`] do, in one step. Observing
/// nothing (`accepted == 0`) of a key the store does not hold creates nothing.
pub trait BaselineStore: Send + Sync {
    /// Records `accepted` messages of `key` at `now` and judges it.
    fn observe(
        &self,
        key: &str,
        accepted: u32,
        cfg: &BaselineConfig,
        now: Timestamp,
    ) -> Result<Judgement, StoreError>;

    /// Rolls `key`'s state to `now` and forgets its hour's volume (its flag), keeping
    /// its history; returns whether the hour had any.
    fn clear_hour(
        &self,
        key: &str,
        cfg: &BaselineConfig,
        now: Timestamp,
    ) -> Result<bool, StoreError>;

    /// Forgets everything about `key`, its history too; returns whether anything was
    /// kept.
    fn forget(&self, key: &str) -> Result<bool, StoreError>;
}

impl<S: BaselineStore + ?Sized> BaselineStore for std::sync::Arc<S> {
    fn observe(
        &self,
        key: &str,
        accepted: u32,
        cfg: &BaselineConfig,
        now: Timestamp,
    ) -> Result<Judgement, StoreError> {
        (**self).observe(key, accepted, cfg, now)
    }

    fn clear_hour(
        &self,
        key: &str,
        cfg: &BaselineConfig,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        (**self).clear_hour(key, cfg, now)
    }

    fn forget(&self, key: &str) -> Result<bool, StoreError> {
        (**self).forget(key)
    }
}

#[cfg(test)]
mod tests;
