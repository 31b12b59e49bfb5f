//! Which user sends the next message.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;

/// Largest user count for the Zipf distribution (its table takes 8 bytes per
/// user).
pub const MAX_ZIPF_USERS: u64 = 50_000_000;

/// How users are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dist {
    /// Every user equally likely.
    Uniform,
    /// User of rank k (1-based) drawn with probability proportional to
    /// 1/k^s: a few heavy senders and a long tail.
    Zipf,
}

/// Picks user numbers in `0..users`. Cheap to clone: the Zipf table and the
/// sequential counter are shared.
#[derive(Debug, Clone)]
pub enum UserPicker {
    /// Uniform over `0..n`.
    Uniform { n: u64 },
    /// Zipf by inverse transform: `cdf[k]` is P(user <= k); a uniform draw
    /// is located by binary search (about log2(n) comparisons, no `powf`).
    Zipf { cdf: Arc<[f64]> },
    /// 0, 1, 2, ... shared by every connection, wrapping at `n`: the first
    /// `n` messages come from `n` distinct users.
    Sequential { next: Arc<AtomicU64>, n: u64 },
}

impl UserPicker {
    /// Uniform over `0..users` (`users` at least 1).
    pub fn uniform(users: u64) -> UserPicker {
        UserPicker::Uniform { n: users.max(1) }
    }

    /// Zipf with exponent `s` over `users` users.
    ///
    /// # Panics
    ///
    /// If `users` exceeds [`MAX_ZIPF_USERS`] or `s` is negative or not finite.
    pub fn zipf(users: u64, s: f64) -> UserPicker {
        assert!(users <= MAX_ZIPF_USERS, "too many users for --dist zipf");
        assert!(s.is_finite() && s >= 0.0, "Zipf exponent must be >= 0");
        let n = users.max(1) as usize;
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for k in 1..=n {
            sum += (k as f64).powf(-s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        UserPicker::Zipf { cdf: cdf.into() }
    }

    /// Each user in turn, shared by all clones.
    pub fn sequential(users: u64) -> UserPicker {
        UserPicker::Sequential {
            next: Arc::new(AtomicU64::new(0)),
            n: users.max(1),
        }
    }

    /// The next user number.
    pub fn pick<R: Rng>(&self, rng: &mut R) -> u64 {
        match self {
            UserPicker::Uniform { n } => rng.random_range(0..*n),
            UserPicker::Zipf { cdf } => {
                let u: f64 = rng.random();
                let k = cdf.partition_point(|&c| c <= u);
                k.min(cdf.len() - 1) as u64
            }
            UserPicker::Sequential { next, n } => next.fetch_add(1, Ordering::Relaxed) % n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn zipf_with_exponent_one_follows_one_over_rank() {
        let picker = UserPicker::zipf(100, 1.0);
        let mut rng = SmallRng::seed_from_u64(1);
        let mut hits = [0u32; 100];
        let draws = 200_000;
        for _ in 0..draws {
            hits[picker.pick(&mut rng) as usize] += 1;
        }
        // H(100) = 5.187...: user 0 gets 1/H, user 1 half of that.
        let h: f64 = (1..=100).map(|k| 1.0 / k as f64).sum();
        let p0 = hits[0] as f64 / draws as f64;
        let p1 = hits[1] as f64 / draws as f64;
        assert!((p0 - 1.0 / h).abs() < 0.01, "p0 = {p0}");
        assert!((p1 - 0.5 / h).abs() < 0.01, "p1 = {p1}");
        assert!(hits[99] > 0);
    }

    #[test]
    fn zipf_with_exponent_zero_is_uniform_and_stays_in_range() {
        let picker = UserPicker::zipf(10, 0.0);
        let mut rng = SmallRng::seed_from_u64(2);
        let mut hits = [0u32; 10];
        for _ in 0..100_000 {
            hits[picker.pick(&mut rng) as usize] += 1;
        }
        assert!(
            hits.iter().all(|&h| (9_000..11_000).contains(&h)),
            "{hits:?}"
        );
    }

    #[test]
    fn sequential_covers_every_user_once_then_wraps() {
        let picker = UserPicker::sequential(5);
        let other = picker.clone();
        let mut rng = SmallRng::seed_from_u64(3);
        let got: Vec<u64> = (0..7)
            .map(|i| {
                if i % 2 == 0 {
                    picker.pick(&mut rng)
                } else {
                    other.pick(&mut rng)
                }
            })
            .collect();
        assert_eq!(got, [0, 1, 2, 3, 4, 0, 1]);
    }
}
