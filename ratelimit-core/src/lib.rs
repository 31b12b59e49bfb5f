//! Keyed rate limiting for mail: sliding-window and token-bucket limits grouped
//! in tiers, decided atomically per key behind a [`Store`] trait.
//!
//! ```
//! use ratelimit_core::{Cost, Limiter, ManualClock, MemoryStore, Tier, TierMap, Timestamp};
//!
//! let tiers = TierMap::new(Tier::new("default", ["3/1h".parse().unwrap()]).unwrap());
//! let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
//! let limiter = Limiter::new(MemoryStore::new(), tiers, clock);
//!
//! for _ in 0..3 {
//!     assert!(limiter.acquire("alice@example.com", Cost::message(1, 0)).unwrap().is_allowed());
//! }
//! let refused = limiter.acquire("alice@example.com", Cost::message(1, 0)).unwrap();
//! assert!(!refused.is_allowed());
//! assert!(limiter.acquire("bob@example.com", Cost::message(1, 0)).unwrap().is_allowed());
//! ```
//!
//! # Modules
//!
//! Four concerns, four modules, tied together by [`Limiter`]:
//! - [`quota`]: what is allowed — [`Limit`] (`"100/1h"`), [`Unit`], [`Algorithm`];
//!   [`tier`]: named sets of limits and who is in which.
//! - [`algorithm`]: how it is decided — [`KeyState::apply`], pure code.
//! - [`store`]: where state lives — the [`Store`] trait, [`MemoryStore`], snapshots,
//!   and with the cargo feature `redis` the shared `store::RedisStore`.
//! - [`clock`]: when "now" is — [`Clock`], [`SystemClock`], [`ManualClock`].
//!
//! [`distinct`] counts distinct values per key per window with bounded memory (the
//! compromise signal: how many client networks one user sends from).
//!
//! [`baseline`] learns each user's usual busiest hour and flags an hour far above
//! it (the second compromise signal: a phished account sending from one host).
//!
//! [`decision`] holds what a check returns: a denial is data ([`Decision`]); a store
//! failure is an error ([`StoreError`]).
//!
//! # Cargo features
//!
//! - `redis`: `store::RedisStore`, counters shared through Redis by every host that
//!   uses the same server.
//! - `serde`: `Serialize` and `Deserialize` for [`Unit`].
//!
//! None is on by default.
//!
//! # Stability
//!
//! This is a 0.x crate on its way to 1.0, shaped so that adding things is not a
//! breaking change:
//! - Error enums, [`Unit`], [`Algorithm`] and the store configurations are
//!   `#[non_exhaustive]`: match them with a wildcard arm, and build a configuration
//!   from its constructor or `Default` and its `with_*` methods.
//!   [`Mode`] is exhaustive on purpose: a [`Store`] must handle every mode, so a new
//!   one would be a breaking change whatever the attribute said.
//! - [`Decision`] is `#[must_use]`: dropping one drops a possible denial.
//! - Anything hidden from these docs (`#[doc(hidden)]`) is public only for the
//!   fuzz targets and the tests, and may change in any release.
//!
//! The minimum supported Rust version is the `rust-version` in `Cargo.toml`: the one
//! toolchain the project's test script checks the workspace with. Older toolchains
//! may work but are not tested, so not promised.

// `unsafe` is denied everywhere but in `store::huge` (a table allocation that
// asks for huge pages), where each use says why it holds.
#![deny(unsafe_code)]
#![deny(missing_docs)]
// docs.rs (`--cfg docsrs`, see Cargo.toml) marks the items each feature adds.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod algorithm;
pub mod baseline;
pub mod clock;
pub mod decision;
pub mod distinct;
pub mod limiter;
pub mod quota;
pub mod store;
pub mod tier;

pub use algorithm::KeyState;
pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use decision::{Cost, Decision, Denial, LimitStatus, MAX_LIMITS, Mode};
pub use limiter::Limiter;
pub use quota::{Algorithm, CounterId, Limit, LimitError, Unit};
pub use store::{MemoryStore, MemoryStoreConfig, Store, StoreError};
pub use tier::{Tier, TierError, TierMap};

// The README (the crates.io page) is tested with the doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
