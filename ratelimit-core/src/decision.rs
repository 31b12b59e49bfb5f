//! What a check returns: [`Decision`] (allowed or denied, and why), with the
//! [`Cost`] of the event and the [`Mode`] it was checked in.
//!
//! A denial is data, not an error: it says which limit refused, when to retry and
//! what remains. A store failure is a [`StoreError`], a different type.

use std::time::Duration;

use crate::quota::Unit;

/// The most limits one tier may hold; decisions carry per-limit status inline
/// (no allocation).
pub const MAX_LIMITS: usize = 8;

/// The cost of one event, in each unit a limit may count.
///
/// # Examples
///
/// ```
/// use ratelimit_core::{Cost, Unit};
/// let c = Cost::message(3, 1200);
/// assert_eq!(c.get(Unit::Messages), 1);
/// assert_eq!(c.get(Unit::Recipients), 3);
/// assert_eq!(c.get(Unit::Bytes), 1200);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Cost {
    /// Messages (usually 1).
    pub messages: u64,
    /// Recipients.
    pub recipients: u64,
    /// Bytes.
    pub bytes: u64,
}

impl Cost {
    /// One message with `recipients` recipients and `bytes` bytes.
    pub const fn message(recipients: u64, bytes: u64) -> Cost {
        Cost {
            messages: 1,
            recipients,
            bytes,
        }
    }

    /// `n` of every unit: the cost for a limiter that counts plain events.
    pub const fn units(n: u64) -> Cost {
        Cost {
            messages: n,
            recipients: n,
            bytes: n,
        }
    }

    /// Nothing: peeking with a zero cost shows usage without asking for more.
    pub const ZERO: Cost = Cost {
        messages: 0,
        recipients: 0,
        bytes: 0,
    };

    /// The cost in `unit`.
    pub const fn get(&self, unit: Unit) -> u64 {
        match unit {
            Unit::Messages => self.messages,
            Unit::Recipients => self.recipients,
            Unit::Bytes => self.bytes,
        }
    }
}

/// Whether a check records what it admits.
///
/// Exhaustive on purpose (unlike the crate's other enums): every [`Store`](crate::Store)
/// must handle each mode, so adding one would break stores whatever the attribute said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Check only: would this cost be admitted now? Nothing is recorded.
    Peek,
    /// Check and, if every limit admits, record the cost on all of them, atomically.
    Acquire,
}

/// The state of one limit at the time of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct LimitStatus {
    /// Units counted against this limit before this event.
    pub used: u64,
    /// The limit's count.
    pub limit: u64,
    /// Units still admissible after this decision (after recording, if it was recorded).
    pub remaining: u64,
}

/// Why an event was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Denial {
    /// Index (in the tier's list) of the first limit that refused.
    pub limit: usize,
    /// How long until the same request would be admitted, if nothing else is
    /// recorded meanwhile. `None`: never, because the cost exceeds the limit itself.
    pub retry_after: Option<Duration>,
}

/// The outcome of a check: allowed, or denied with a [`Denial`]; and the status of
/// every limit of the tier, in the tier's order.
///
/// `#[must_use]`: a denial is data, not an error, so `?` alone does not stop a refused
/// event; dropping a decision unread would let it through silently.
///
/// # Examples
///
/// ```
/// use ratelimit_core::{Cost, Limit, MemoryStore, Mode, Store, Timestamp};
/// use std::time::Duration;
///
/// let store = MemoryStore::new();
/// let limits = ["2/1m".parse::<Limit>().unwrap(), "100/1d".parse().unwrap()];
/// let now = Timestamp::from_millis(1_700_000_000_000);
/// let check = |mode| store.check("alice", &limits, Cost::units(1), now, mode).unwrap();
///
/// let d = check(Mode::Acquire);
/// assert!(d.is_allowed());
/// assert_eq!(d.remaining(), 1); // the smaller of 1 (per minute) and 99 (per day)
/// assert_eq!(d.statuses()[1].remaining, 99);
///
/// assert!(check(Mode::Acquire).is_allowed());
/// let refused = check(Mode::Acquire);
/// let denial = refused.denial().expect("the third in a minute is refused");
/// assert_eq!(denial.limit, 0); // the per-minute limit, first in the list
/// // The window plus one sub-window (1 s at the default precision of 60): a sliding
/// // window may over-count by one sub-window's worth of time, never under-count.
/// assert_eq!(denial.retry_after, Some(Duration::from_secs(61)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "a denial is data: check `is_allowed()` or `denial()` before going ahead"]
pub struct Decision {
    pub(crate) denial: Option<Denial>,
    /// Inline (no allocation); only the first `len` are meaningful.
    pub(crate) statuses: [LimitStatus; MAX_LIMITS],
    len: u8,
}

impl Decision {
    /// An allowed decision with no limits (an unlimited tier).
    pub const UNLIMITED: Decision = Decision {
        denial: None,
        statuses: [LimitStatus {
            used: 0,
            limit: 0,
            remaining: 0,
        }; MAX_LIMITS],
        len: 0,
    };

    /// Builds a decision from parts (for [`Store`](crate::Store) implementations).
    /// Statuses past [`MAX_LIMITS`] are dropped.
    pub fn new(denial: Option<Denial>, statuses: &[LimitStatus]) -> Decision {
        let mut d = Decision::with_len(statuses.len());
        d.denial = denial;
        for (slot, s) in d.statuses.iter_mut().zip(statuses) {
            *slot = *s;
        }
        d
    }

    /// An allowed decision for `len` limits (at most [`MAX_LIMITS`]), every status
    /// zero, to be filled in place.
    pub(crate) const fn with_len(len: usize) -> Decision {
        // A literal, not a copy of `UNLIMITED`: zeroing is a few stores, a copy
        // from the constant is a `memcpy` call.
        Decision {
            denial: None,
            statuses: [LimitStatus {
                used: 0,
                limit: 0,
                remaining: 0,
            }; MAX_LIMITS],
            len: if len < MAX_LIMITS { len } else { MAX_LIMITS } as u8,
        }
    }

    /// The decision of a one-limit tier.
    #[inline(always)]
    pub(crate) const fn single(denial: Option<Denial>, status: LimitStatus) -> Decision {
        const ZERO: LimitStatus = LimitStatus {
            used: 0,
            limit: 0,
            remaining: 0,
        };
        let mut statuses = [ZERO; MAX_LIMITS];
        statuses[0] = status;
        Decision {
            denial,
            statuses,
            len: 1,
        }
    }

    /// Whether the event was admitted.
    pub fn is_allowed(&self) -> bool {
        self.denial.is_none()
    }

    /// Why it was refused, if it was.
    pub fn denial(&self) -> Option<Denial> {
        self.denial
    }

    /// The status of each limit, in the tier's order.
    pub fn statuses(&self) -> &[LimitStatus] {
        &self.statuses[..usize::from(self.len)]
    }

    /// The smallest `remaining` over all limits (`u64::MAX` for an unlimited tier).
    pub fn remaining(&self) -> u64 {
        self.statuses()
            .iter()
            .map(|s| s.remaining)
            .min()
            .unwrap_or(u64::MAX)
    }
}

/// A store failed to decide. (A refusal is not an error: it is a [`Decision`].)
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store tracks as many keys as it may and found none to evict; a new key
    /// cannot be added now. (The memory stores evict idle, then least recently used
    /// keys first; see [`MemoryStore`](crate::MemoryStore).) Not an outage: a
    /// server answers a temporary refusal, never "no limit".
    #[error("the store is full: it tracks its maximum of {max_keys} keys")]
    Full {
        /// The configured cap.
        max_keys: usize,
    },
    /// The backend could not be reached or failed.
    #[error("the store backend is unavailable: {0}")]
    Unavailable(String),
    /// The backend did not answer in time.
    #[error("the store backend did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The backend answered something this code does not understand.
    #[error("the store backend answered unexpectedly: {0}")]
    Protocol(String),
}
