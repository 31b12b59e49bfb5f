//! Keys, visiting order and simulated time for the in-process limiter benches
//! (`benches/core.rs`, `benches/keymem.rs`).
//!
//! Every user sends [`MESSAGES_PER_HOUR`] messages an hour, evenly spread: with
//! `n` keys visited round-robin (in a shuffled order), simulated time advances
//! by [`step_nanos`]`(n)` per check, so each key is checked once every
//! `1h / MESSAGES_PER_HOUR` of simulated time whatever `n` is. Both libraries
//! see exactly the same keys, order and times.
//!
//! # Examples
//!
//! ```
//! use ratelimit_benches::keyspace::{Cursor, render_key, step_nanos};
//!
//! let mut key = String::new();
//! render_key(42, &mut key);
//! assert_eq!(key, "user0000042@example.com");
//!
//! // 1,000 keys, 3 messages an hour each: 1.2 s of simulated time per check.
//! assert_eq!(step_nanos(1000), 1_200_000_000);
//!
//! let mut cursor = Cursor::new((0..10).collect(), 7);
//! let mut seen: Vec<u32> = (0..10).map(|_| cursor.next_index()).collect();
//! seen.sort();
//! assert_eq!(seen, (0..10).collect::<Vec<u32>>());
//! ```

/// How many messages each simulated user sends per hour.
pub const MESSAGES_PER_HOUR: u64 = 3;

/// Where simulated time starts for the ratelimit store (ms since the epoch; a
/// multiple of one hour, November 2023).
pub const T0_MS: u64 = 1_700_002_800_000;

const HOUR_NANOS: u64 = 3_600_000_000_000;

/// Simulated nanoseconds per check so that each of `keys` keys, visited in
/// turn, is checked [`MESSAGES_PER_HOUR`] times an hour.
pub fn step_nanos(keys: u64) -> u64 {
    HOUR_NANOS / (MESSAGES_PER_HOUR * keys.max(1))
}

/// Writes key number `i` (`user{i:07}@example.com`) into `buf`, reusing its
/// allocation. 23 bytes for `i` below ten million.
///
/// The benches render each key into one reused buffer instead of indexing a
/// `Vec<String>` of a million keys: in production the key arrives in the
/// request buffer, hot in cache, and reading it from a random heap place would
/// add two cache misses per check that belong to neither library.
pub fn render_key(i: u32, buf: &mut String) {
    buf.clear();
    buf.push_str("user");
    let mut digits = [b'0'; 10];
    let mut n = i;
    let mut at = digits.len();
    while n > 0 {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    let first = at.min(digits.len() - 7);
    for &d in &digits[first..] {
        buf.push(char::from(d));
    }
    buf.push_str("@example.com");
}

/// A shuffled visiting order over a set of key numbers, and where we are in it.
///
/// The order is precomputed (read sequentially, so the prefetcher hides it),
/// so the benches measure neither a random number generator nor a
/// cache-friendly sequential walk.
#[derive(Debug, Clone)]
pub struct Cursor {
    order: Vec<u32>,
    pos: usize,
}

impl Cursor {
    /// Visits `keys` in an order shuffled with `seed` (Fisher–Yates over a
    /// xorshift generator), starting over when all have been visited.
    ///
    /// # Panics
    ///
    /// If `keys` is empty.
    pub fn new(mut keys: Vec<u32>, seed: u64) -> Cursor {
        assert!(!keys.is_empty(), "a cursor needs at least one key");
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for i in (1..keys.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let j = (x % (i as u64 + 1)) as usize;
            keys.swap(i, j);
        }
        Cursor {
            order: keys,
            pos: 0,
        }
    }

    /// Every key `0..n`, shuffled.
    pub fn all(n: u32, seed: u64) -> Cursor {
        Cursor::new((0..n).collect(), seed)
    }

    /// The next key number.
    #[inline]
    pub fn next_index(&mut self) -> u32 {
        let i = self.order[self.pos];
        self.pos += 1;
        if self.pos == self.order.len() {
            self.pos = 0;
        }
        i
    }

    /// How many keys this cursor visits.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Always false: a cursor has at least one key.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_keys_match_the_format_string() {
        let mut buf = String::new();
        for i in [0, 1, 9, 10, 999_999, 1_000_000, 9_999_999, 12_345_678] {
            render_key(i, &mut buf);
            assert_eq!(buf, format!("user{i:07}@example.com"));
        }
    }

    #[test]
    fn a_cursor_visits_every_key_once_per_round() {
        let mut c = Cursor::new((100..1100).collect(), 3);
        for _ in 0..2 {
            let mut seen: Vec<u32> = (0..1000).map(|_| c.next_index()).collect();
            seen.sort_unstable();
            assert_eq!(seen, (100..1100).collect::<Vec<u32>>());
        }
    }

    #[test]
    fn a_cursor_is_not_sequential() {
        let mut c = Cursor::all(1000, 1);
        let order: Vec<u32> = (0..1000).map(|_| c.next_index()).collect();
        let ascending = order.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(ascending < 10, "{ascending} sequential steps");
    }

    #[test]
    fn each_key_is_checked_a_few_times_an_hour() {
        for n in [1_000, 100_000, 1_000_000] {
            assert_eq!(step_nanos(n) * n * MESSAGES_PER_HOUR, HOUR_NANOS);
        }
    }
}
