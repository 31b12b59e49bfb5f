//! Who gets which limits: a [`Tier`] is a named set of limits, a [`TierMap`] puts every
//! key in exactly one tier (an explicit user or `@domain` assignment, or the default).

use std::sync::Arc;

use ahash::AHashMap;

use crate::decision::MAX_LIMITS;
use crate::quota::Limit;

/// Why a tier or tier map could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
