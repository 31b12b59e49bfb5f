//! Who gets which limits: a [`Tier`] is a named set of limits, a [`TierMap`] puts every
//! key in exactly one tier (an explicit user or `@domain` assignment, or the default).

use std::sync::Arc;

use ahash::AHashMap;

use crate::decision::MAX_LIMITS;
use crate::quota::{Algorithm, Limit};

/// Why a tier or tier map could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TierError {
    /// A tier name is empty.
    #[error("a tier name must not be empty")]
    EmptyName,
    /// A tier has more limits than a decision can carry.
    #[error("tier \"{0}\" has {1} limits; at most 8 are allowed")]
    TooManyLimits(String, usize),
    /// Two tiers have the same name.
    #[error("tier \"{0}\" is defined twice")]
    Duplicate(String),
    /// An assignment names a tier that does not exist.
    #[error("\"{key}\" is assigned to tier \"{tier}\", which is not defined")]
    UnknownTier {
        /// The user or `@domain` assigned.
        key: String,
        /// The missing tier.
        tier: String,
    },
    /// An assignment key is empty (or a bare `@`).
    #[error("an assignment needs a user or an @domain")]
    EmptyKey,
    /// Two token buckets of one tier count the same unit over the same window (so they
    /// share one counter) but drain at different rates: the shared level can only
    /// drain at one rate, and the slower bucket would admit more than it says.
    #[error(
        "tier \"{0}\": token buckets \"{1}\" and \"{2}\" count the same unit over the same window but drain at different rates; give them different windows"
    )]
    SharedBucket(String, String, String),
}

/// A named set of limits. Empty means unlimited.
///
/// # Examples
///
/// ```
/// use ratelimit_core::Tier;
/// let bulk = Tier::new("bulk", ["2000/1h".parse().unwrap(), "20000/1d".parse().unwrap()]).unwrap();
/// assert_eq!(bulk.name(), "bulk");
/// assert_eq!(bulk.limits().len(), 2);
/// assert!(Tier::new("unlimited", []).unwrap().is_unlimited());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    name: String,
    limits: Vec<Limit>,
}

impl Tier {
    /// A tier called `name` with these limits (at most [`MAX_LIMITS`]).
    pub fn new(
        name: impl Into<String>,
        limits: impl IntoIterator<Item = Limit>,
    ) -> Result<Tier, TierError> {
        let name = name.into();
        if name.trim().is_empty() {
            return Err(TierError::EmptyName);
        }
        let limits: Vec<Limit> = limits.into_iter().collect();
        if limits.len() > MAX_LIMITS {
            return Err(TierError::TooManyLimits(name, limits.len()));
        }
        for (i, a) in limits.iter().enumerate() {
            let clash = limits[..i].iter().find(|b| {
                matches!(a.algorithm(), Algorithm::TokenBucket { .. })
                    && a.counter_id() == b.counter_id()
                    && a.count() != b.count()
            });
            if let Some(b) = clash {
                return Err(TierError::SharedBucket(name, b.to_string(), a.to_string()));
            }
        }
        Ok(Tier { name, limits })
    }

    /// The tier's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tier's limits, in order.
    pub fn limits(&self) -> &[Limit] {
        &self.limits
    }

    /// Whether the tier has no limits.
    pub fn is_unlimited(&self) -> bool {
        self.limits.is_empty()
    }
}

/// Assigns every key to exactly one tier.
///
/// Lookup order: the exact key, then (for a key containing `@`) the `@domain` after its
/// last `@`, then the default tier. Keys are compared exactly; normalize them (e.g.
/// lowercase) before assigning and looking up.
///
/// # Examples
///
/// ```
/// use ratelimit_core::{Tier, TierMap};
/// let mut map = TierMap::new(Tier::new("default", ["100/1h".parse().unwrap()]).unwrap());
/// map.add_tier(Tier::new("bulk", ["2000/1h".parse().unwrap()]).unwrap()).unwrap();
/// map.assign("newsletter@example.com", "bulk").unwrap();
/// map.assign("@partner.example", "bulk").unwrap();
/// assert_eq!(map.tier_of("newsletter@example.com").name(), "bulk");
/// assert_eq!(map.tier_of("anyone@partner.example").name(), "bulk");
/// assert_eq!(map.tier_of("alice@example.com").name(), "default");
/// ```
#[derive(Debug, Clone)]
pub struct TierMap {
    tiers: Vec<Arc<Tier>>,
    default: usize,
    users: AHashMap<Box<str>, usize>,
    domains: AHashMap<Box<str>, usize>,
}

impl TierMap {
    /// A map with one tier, the default.
    pub fn new(default: Tier) -> TierMap {
        TierMap {
            tiers: vec![Arc::new(default)],
            default: 0,
            users: AHashMap::new(),
            domains: AHashMap::new(),
        }
    }

    /// Adds a tier (names must be unique).
    pub fn add_tier(&mut self, tier: Tier) -> Result<(), TierError> {
        if self.get(tier.name()).is_some() {
            return Err(TierError::Duplicate(tier.name().to_string()));
        }
        self.tiers.push(Arc::new(tier));
        Ok(())
    }

    /// Makes the named tier the default.
    pub fn set_default(&mut self, tier: &str) -> Result<(), TierError> {
        self.default = self.index(tier).ok_or_else(|| TierError::UnknownTier {
            key: "(default)".into(),
            tier: tier.into(),
        })?;
        Ok(())
    }

    /// Assigns `key` (a user, or `@domain` for a whole domain) to the named tier,
    /// replacing any earlier assignment of that key.
    pub fn assign(&mut self, key: &str, tier: &str) -> Result<(), TierError> {
        let idx = self.index(tier).ok_or_else(|| TierError::UnknownTier {
            key: key.into(),
            tier: tier.into(),
        })?;
        match key.strip_prefix('@') {
            Some("") => return Err(TierError::EmptyKey),
            Some(domain) => self.domains.insert(domain.into(), idx),
            None if key.is_empty() => return Err(TierError::EmptyKey),
            None => self.users.insert(key.into(), idx),
        };
        Ok(())
    }

    /// Removes an explicit assignment of `key`; returns whether there was one.
    pub fn unassign(&mut self, key: &str) -> bool {
        match key.strip_prefix('@') {
            Some(domain) => self.domains.remove(domain).is_some(),
            None => self.users.remove(key).is_some(),
        }
    }

    /// The tier `key` is in.
    pub fn tier_of(&self, key: &str) -> &Arc<Tier> {
        let idx = self
            .users
            .get(key)
            .or_else(|| {
                key.rsplit_once('@')
                    .and_then(|(_, domain)| self.domains.get(domain))
            })
            .copied()
            .unwrap_or(self.default);
        &self.tiers[idx]
    }

    /// The tier with this name.
    pub fn get(&self, name: &str) -> Option<&Arc<Tier>> {
        self.index(name).map(|i| &self.tiers[i])
    }

    /// The default tier.
    pub fn default_tier(&self) -> &Arc<Tier> {
        &self.tiers[self.default]
    }

    /// All tiers, the default included.
    pub fn tiers(&self) -> impl Iterator<Item = &Arc<Tier>> {
        self.tiers.iter()
    }

    /// Explicit assignments: (`user` or `@domain`, tier name).
    pub fn assignments(&self) -> impl Iterator<Item = (String, &str)> {
        self.users
            .iter()
            .map(|(k, i)| (k.to_string(), self.tiers[*i].name()))
            .chain(
                self.domains
                    .iter()
                    .map(|(d, i)| (format!("@{d}"), self.tiers[*i].name())),
            )
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.tiers.iter().position(|t| t.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> TierMap {
        let mut m = TierMap::new(Tier::new("default", ["100/1h".parse().unwrap()]).unwrap());
        m.add_tier(Tier::new("bulk", ["2000/1h".parse().unwrap()]).unwrap())
            .unwrap();
        m.add_tier(Tier::new("none", []).unwrap()).unwrap();
        m
    }

    #[test]
    fn user_beats_domain_beats_default() {
        let mut m = map();
        m.assign("@example.com", "bulk").unwrap();
        m.assign("boss@example.com", "none").unwrap();
        assert_eq!(m.tier_of("boss@example.com").name(), "none");
        assert_eq!(m.tier_of("clerk@example.com").name(), "bulk");
        assert_eq!(m.tier_of("clerk@other.example").name(), "default");
        assert_eq!(m.tier_of("no-at-sign").name(), "default");
        assert!(m.unassign("boss@example.com"));
        assert_eq!(m.tier_of("boss@example.com").name(), "bulk");
    }

    #[test]
    fn buckets_sharing_a_counter_must_drain_at_one_rate() {
        let bucket = |n| Limit::token_bucket(n, std::time::Duration::from_secs(60), 4).unwrap();
        let err = Tier::new("t", [bucket(7), bucket(4)]).unwrap_err();
        assert!(matches!(err, TierError::SharedBucket(..)), "{err}");
        // Same rate (a different burst is fine), another window, or sliding windows: fine.
        let same_rate = Limit::token_bucket(7, std::time::Duration::from_secs(60), 9).unwrap();
        assert!(Tier::new("t", [bucket(7), same_rate]).is_ok());
        let other_window = Limit::token_bucket(4, std::time::Duration::from_secs(61), 4).unwrap();
        assert!(Tier::new("t", [bucket(7), other_window]).is_ok());
        assert!(Tier::new("t", ["7/1m".parse().unwrap(), "4/1m".parse().unwrap()]).is_ok());
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let mut m = map();
        assert_eq!(
            m.assign("x@y", "gold").unwrap_err().to_string(),
            "\"x@y\" is assigned to tier \"gold\", which is not defined"
        );
        assert!(matches!(
            m.add_tier(Tier::new("bulk", []).unwrap()),
            Err(TierError::Duplicate(_))
        ));
        assert_eq!(m.assign("@", "bulk"), Err(TierError::EmptyKey));
        let nine = std::iter::repeat_n("1/1h".parse::<Limit>().unwrap(), 9);
        assert!(matches!(
            Tier::new("big", nine),
            Err(TierError::TooManyLimits(_, 9))
        ));
        assert_eq!(Tier::new(" ", []), Err(TierError::EmptyName));
    }

    #[test]
    fn default_can_be_changed() {
        let mut m = map();
        m.set_default("bulk").unwrap();
        assert_eq!(m.tier_of("anyone").name(), "bulk");
        assert!(m.set_default("nope").is_err());
    }
}
