//! Open incidents: one per key and signal (a limit of the key's tier, or the
//! networks signal), from the first refusal until it clears. A refusal while its
//! incident is open opens nothing, so a user hammering a limit makes one log line and
//! one alert, not one per request.

use parking_lot::Mutex;

use super::verdict::Signal;

/// Most open incidents remembered (one per user and signal); when full, the ones
/// that have cleared go first, then all, which at worst reports an incident twice.
pub const MAX_INCIDENTS: usize = 100_000;

/// The networks signal's index beside the tier's limit positions.
const NETWORKS: usize = usize::MAX;
/// The baseline signal's.
const BASELINE: usize = usize::MAX - 1;

/// Until when (ms since the epoch) each incident is open, by key and signal.
type Table = hashbrown::HashMap<(String, usize), u64, ahash::RandomState>;

/// A [`Table`] key to look up without copying the user's key (hashes as the tuple
/// does: the string, then the index).
#[derive(Hash)]
struct Lookup<'a>(&'a str, usize);

impl hashbrown::Equivalent<(String, usize)> for Lookup<'_> {
    fn equivalent(&self, key: &(String, usize)) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

fn index(signal: Signal) -> usize {
    match signal {
        Signal::Limit(i) => i,
        Signal::Networks => NETWORKS,
        Signal::Baseline => BASELINE,
    }
}

/// How an open incident takes a later refusal's clearing time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhileOpen {
    /// It keeps the time it opened with (a limit's refusals each say when it clears).
    Keep,
    /// It lasts until the latest (a flag that the abuser keeps raising).
    Extend,
}

/// The open incidents.
#[derive(Debug, Default)]
pub struct Incidents {
    open: Mutex<Table>,
}

impl Incidents {
    /// Notes a refusal of `key` by `signal` at `now_ms`, clearing at `until_ms`;
    /// `true` when it opens an incident (none was open).
    pub fn refused(
        &self,
        key: &str,
        signal: Signal,
        until_ms: u64,
        now_ms: u64,
        while_open: WhileOpen,
    ) -> bool {
        let i = index(signal);
        let mut open = self.open.lock();
        if let Some(until) = open.get_mut(&Lookup(key, i))
            && *until > now_ms
        {
            if while_open == WhileOpen::Extend {
                *until = (*until).max(until_ms);
            }
            return false;
        }
        if open.len() >= MAX_INCIDENTS {
            open.retain(|_, until| *until > now_ms);
            if open.len() >= MAX_INCIDENTS {
                open.clear();
            }
        }
        open.insert((key.to_string(), i), until_ms);
        true
    }

    /// How many incidents are remembered (open, or cleared but not swept yet).
    pub fn len(&self) -> usize {
        self.open.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets the incidents that have cleared by `now_ms`.
    pub fn sweep(&self, now_ms: u64) {
        self.open.lock().retain(|_, until| *until > now_ms);
    }

    /// Forgets `key`'s incidents.
    pub fn forget(&self, key: &str) {
        self.open.lock().retain(|(k, _), _| k != key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_incident_per_key_and_signal_until_it_clears() {
        let t = Incidents::default();
        let lim = Signal::Limit(0);
        assert!(t.refused("a", lim, 100, 10, WhileOpen::Keep));
        assert!(!t.refused("a", lim, 200, 50, WhileOpen::Keep));
        assert!(t.refused("a", Signal::Limit(1), 100, 50, WhileOpen::Keep));
        assert!(t.refused("a", Signal::Networks, 100, 50, WhileOpen::Keep));
        assert!(t.refused("b", lim, 100, 50, WhileOpen::Keep));
        // Kept: it cleared at 100 although a later refusal said 200.
        assert!(t.refused("a", lim, 300, 100, WhileOpen::Keep));
    }

    #[test]
    fn an_extended_incident_lasts_until_the_latest_clearing() {
        let t = Incidents::default();
        let net = Signal::Networks;
        assert!(t.refused("a", net, 100, 10, WhileOpen::Extend));
        assert!(!t.refused("a", net, 500, 90, WhileOpen::Extend));
        assert!(!t.refused("a", net, 100, 300, WhileOpen::Extend));
        assert!(t.refused("a", net, 900, 500, WhileOpen::Extend));
    }

    #[test]
    fn forgetting_a_key_reopens_its_incidents() {
        let t = Incidents::default();
        assert!(t.refused("a", Signal::Limit(0), 100, 10, WhileOpen::Keep));
        t.forget("a");
        assert!(t.refused("a", Signal::Limit(0), 100, 20, WhileOpen::Keep));
        t.sweep(100);
        assert!(t.refused("a", Signal::Limit(0), 200, 30, WhileOpen::Keep));
    }
}
