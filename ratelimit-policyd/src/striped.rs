//! Counters that every connection thread adds to on every request, and that a few
//! readers (metrics, `admin stats`) sum now and then.
//!
//! One shared atomic per counter makes each add take its cache line from the core
//! that added last: about 100 ns per add on a 2-core VM, more with many connections,
//! for each of the half-dozen counters a request bumps. A [`Striped`] value keeps one
//! copy per stripe, each on cache lines of its own; a thread adds to the stripe it
//! was given the first time it counted (round robin), so with up to [`STRIPES`]
//! connection threads each adds to lines no other thread writes, and a line moves
//! only when its thread moves to another core. Reading sums the stripes: totals are
//! exact (every add lands in some stripe), only not a snapshot of one instant, as
//! with separate atomics before.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Stripes per value: a power of two, at least the connection threads a busy
/// Postfix keeps open (one per smtpd process) on a small machine. More threads
/// share stripes, two to a stripe at 128, and stay correct.
pub const STRIPES: usize = 64;

/// Two cache lines: the adjacent-line prefetcher of x86 pulls lines in pairs, so one
/// line of padding would still share.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's stripe, `usize::MAX` until it first counts.
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The calling thread's stripe (less than [`STRIPES`]).
fn stripe() -> usize {
    STRIPE.with(|s| {
        let mut i = s.get();
        if i == usize::MAX {
            i = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
            s.set(i);
        }
        i & (STRIPES - 1)
    })
}

/// One `T` per stripe; a thread writes its own ([`Striped::local`]), readers go
/// through them all ([`Striped::stripes`]).
#[derive(Debug)]
pub struct Striped<T> {
    /// Boxed: 64 padded copies are 8 KiB or more, too much to move around.
    stripes: Box<[Padded<T>; STRIPES]>,
}

impl<T: Default> Default for Striped<T> {
    fn default() -> Self {
        Striped {
            stripes: Box::new(std::array::from_fn(|_| Padded::default())),
        }
    }
}

impl<T> Striped<T> {
    /// The calling thread's copy.
    pub fn local(&self) -> &T {
        &self.stripes[stripe()].0
    }

    /// Every copy.
    pub fn stripes(&self) -> impl Iterator<Item = &T> {
        self.stripes.iter().map(|p| &p.0)
    }
}

/// `N` counters, striped: what one site (request stats, one tier's decisions)
/// counts, kept together so a request touches one or two lines of its stripe.
#[derive(Debug)]
pub struct StripedCounters<const N: usize>(Striped<[AtomicU64; N]>);

impl<const N: usize> Default for StripedCounters<N> {
    fn default() -> Self {
        StripedCounters(Striped {
            stripes: Box::new(std::array::from_fn(|_| {
                Padded(std::array::from_fn(|_| AtomicU64::new(0)))
            })),
        })
    }
}

impl<const N: usize> StripedCounters<N> {
    /// Adds `n` to counter `i` (nothing when `i` is out of range).
    pub fn add(&self, i: usize, n: u64) {
        if let Some(c) = self.0.local().get(i) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counter `i` (0 when out of range).
    pub fn get(&self, i: usize) -> u64 {
        self.0
            .stripes()
            .filter_map(|s| s.get(i))
            .fold(0, |sum, c| sum.wrapping_add(c.load(Ordering::Relaxed)))
    }

    /// Every counter.
    pub fn all(&self) -> [u64; N] {
        let mut out = [0u64; N];
        for s in self.0.stripes() {
            for (o, c) in out.iter_mut().zip(s) {
                *o = o.wrapping_add(c.load(Ordering::Relaxed));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_are_on_lines_of_their_own() {
        assert_eq!(std::mem::align_of::<Padded<u8>>(), 128);
        assert_eq!(std::mem::size_of::<Padded<[AtomicU64; 17]>>(), 256);
    }

    #[test]
    fn totals_count_every_add_from_every_thread() {
        let c = StripedCounters::<3>::default();
        std::thread::scope(|s| {
            for t in 0..STRIPES + 8 {
                let c = &c;
                s.spawn(move || {
                    for _ in 0..100 {
                        c.add(t % 3, 1);
                    }
                    c.add(7, 1);
                });
            }
        });
        let all = c.all();
        assert_eq!(all.iter().sum::<u64>(), (STRIPES as u64 + 8) * 100);
        assert_eq!(all, [c.get(0), c.get(1), c.get(2)]);
        assert_eq!(c.get(7), 0);
    }
}
