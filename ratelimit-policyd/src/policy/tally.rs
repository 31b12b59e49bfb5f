//! The policy's own counts: requests by stage and what became of them, and decisions
//! per tier and outcome. Striped (every request adds to one or two, from whichever
//! connection thread serves it); metrics and `admin stats` read them.

use std::sync::Arc;

use ahash::AHashMap;
use parking_lot::RwLock;

use super::verdict::Outcome;
use crate::protocol::Stage;
use crate::striped::StripedCounters;

/// What [`Tally`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Requests at RCPT.
    Rcpt,
    /// Requests at DATA.
    Data,
    /// Requests at END-OF-MESSAGE.
    EndOfMessage,
    /// Requests at any other stage.
    OtherStage,
    /// Answers `DUNNO` after the limits admitted.
    Allowed,
    /// Refusals sent (defer, code, hold, reject).
    Refused,
    /// Refusals logged only (warn tiers and signals).
    DryRun,
    /// Store failures and timeouts.
    StoreErrors,
    /// Requests not counted: no key, exempt, unlimited tier, other stages.
    Skipped,
    /// Messages charged at END-OF-MESSAGE.
    Charged,
    /// Requests answered with the networks action (too many client networks).
    NetworksFlagged,
    /// Requests answered with the baseline action (far above the user's usual).
    BaselineFlagged,
    /// New users deferred because a key table was full and nothing could be evicted.
    FullRefusals,
}

impl Counted {
    /// How many there are.
    const COUNT: usize = Counted::FullRefusals as usize + 1;

    /// Requests by stage, in the order of [`Tally::requests`].
    pub const STAGES: [Counted; 4] = [
        Counted::Rcpt,
        Counted::Data,
        Counted::EndOfMessage,
        Counted::OtherStage,
    ];
}

/// Distinct tier labels kept; tiers come from the configuration, so this only
/// matters across many reloads that rename tiers. Beyond it, decisions count under
/// the tier label `"other"`.
pub const MAX_TIER_LABELS: usize = 64;

/// One tier's decisions by outcome (in [`Outcome::ALL`] order), striped.
type TierCounters = Arc<StripedCounters<6>>;

/// Request and decision counters.
#[derive(Debug, Default)]
pub struct Tally {
    requests: StripedCounters<{ Counted::COUNT }>,
    tiers: RwLock<AHashMap<Box<str>, TierCounters>>,
}

impl Tally {
    /// Counts one `what`.
    pub fn add(&self, what: Counted) {
        self.requests.add(what as usize, 1);
    }

    /// The count of `what` so far.
    pub fn get(&self, what: Counted) -> u64 {
        self.requests.get(what as usize)
    }

    /// Requests by stage: RCPT, DATA, END-OF-MESSAGE, other.
    pub fn requests(&self) -> [u64; 4] {
        let all = self.requests.all();
        Counted::STAGES.map(|s| all.get(s as usize).copied().unwrap_or(0))
    }

    pub(super) fn stage(&self, stage: Stage) {
        self.add(match stage {
            Stage::Rcpt => Counted::Rcpt,
            Stage::Data => Counted::Data,
            Stage::EndOfMessage => Counted::EndOfMessage,
            _ => Counted::OtherStage,
        });
    }

    /// Counts a decision of `tier`. Takes a read lock (a write lock the first time a
    /// tier is seen); a caller deciding many requests keeps a [`TierDecisions`].
    pub fn note_decision(&self, tier: &str, outcome: Outcome) {
        self.tier_counters(tier).add(outcome.index(), 1);
    }

    /// The decision counters of `tier`, to count its decisions without looking it up
    /// each time.
    pub fn tier_decisions(&self, tier: &str) -> TierDecisions {
        TierDecisions {
            tier: tier.into(),
            counts: self.tier_counters(tier),
        }
    }

    fn tier_counters(&self, tier: &str) -> TierCounters {
        if let Some(c) = self.tiers.read().get(tier) {
            return Arc::clone(c);
        }
        let mut map = self.tiers.write();
        let label = if map.len() >= MAX_TIER_LABELS && !map.contains_key(tier) {
            "other"
        } else {
            tier
        };
        Arc::clone(map.entry(label.into()).or_default())
    }

    /// Decisions by tier and outcome (in [`Outcome::ALL`] order), sorted by tier.
    pub fn decisions(&self) -> Vec<(String, [u64; 6])> {
        let mut out: Vec<(String, [u64; 6])> = self
            .tiers
            .read()
            .iter()
            .map(|(t, c)| (t.to_string(), c.all()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// The decision counters of one tier, kept by a connection between requests.
#[derive(Debug, Clone)]
pub struct TierDecisions {
    tier: Box<str>,
    counts: TierCounters,
}

impl TierDecisions {
    /// The tier these count (its decisions may be counted under `"other"`).
    pub fn tier(&self) -> &str {
        &self.tier
    }

    /// Counts a decision.
    pub fn note(&self, outcome: Outcome) {
        self.counts.add(outcome.index(), 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_labels_are_bounded() {
        let tally = Tally::default();
        for i in 0..MAX_TIER_LABELS + 10 {
            tally.note_decision(&format!("t{i}"), Outcome::Allow);
        }
        let d = tally.decisions();
        assert_eq!(d.len(), MAX_TIER_LABELS + 1);
        assert!(d.iter().any(|(t, c)| t == "other" && c[0] == 10));
    }
}
