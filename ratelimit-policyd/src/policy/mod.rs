//! Request → key → tier → signals → [`Verdict`].
//!
//! - **Key**: `sasl_username`, normalized by [`crate::key`], whatever IP it comes
//!   from. Without SASL: skip, or key on client address, client network or sender
//!   (`[keying] without_sasl`).
//! - **Stages**: RCPT and DATA *peek* (a user already over a limit is refused before
//!   the body is sent; nothing is recorded); END-OF-MESSAGE *acquires* (the only stage
//!   with the real size and accepted recipient count), once per `instance`. Every other
//!   stage answers `DUNNO`.
//! - **Volume** (`volume.rs`): all limits of the user's tier; recorded only if all
//!   admit. Over a limit: the tier's action with a text that says which limit and when
//!   to retry. A store failure gets the configured fail-open (`DUNNO`) or fail-closed
//!   (defer) answer, within `decision_timeout`; with `on_store_error = "local"` the
//!   request is decided by this server's own counters instead, at `local_fraction`
//!   of each limit (`Backend::check_local`). A full key table is not a failure:
//!   the store evicts to make room, and a new user it has no room for is deferred
//!   (`4.7.1`), whatever `on_store_error` says.
//! - **Networks** (`networks.rs`): the compromise signal, observed before the volume
//!   limits so a refused request still reveals its address; while a user is flagged,
//!   the networks action replaces the volume decision.
//!
//! The policy owns what it needs to decide: the configuration in force, the
//! [`Backend`] (the stores), its counts ([`tally`]), open incidents ([`incidents`]),
//! and the clients seen per user ([`clients`]). It imports nothing that observes it:
//! every verdict goes to the [`Observer`] it was built with (the server's records,
//! incident logs and alerts; replay's report).

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use arc_swap::cache::Cache;
use ratelimit_core::{Clock, Mode, Timestamp};

use crate::backend::Backend;
use crate::config::Config;
use crate::logthrottle::{LOG_EVERY, LogThrottle};
use crate::protocol::{Action, PolicyRequest, Stage};

mod baseline;
pub mod clients;
pub mod incidents;
pub mod keying;
mod networks;
mod refusal;
pub mod tally;
pub mod verdict;
mod volume;

pub use baseline::explain as explain_baseline;
pub use clients::ClientsSeen;
pub use tally::{Counted, Tally, TierDecisions};
pub use verdict::{Incident, Outcome, Signal, Verdict};

/// The configuration in force, shared by the policy (which decides with it), the
/// daemon (which reloads it) and the admin commands (which change tiers).
pub type SharedConfig = Arc<ArcSwap<Config>>;

/// Sees every verdict, after it is decided and before it is answered. Must not block:
/// it runs on the request's thread.
pub trait Observer: Send + Sync {
    /// `verdict` was decided for `req`, on connection `conn`, at `at`.
    fn decided(&self, conn: u64, at: Timestamp, req: &PolicyRequest<'_>, verdict: &Verdict<'_>);
}

/// An observer that looks away.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl Observer for NoObserver {
    fn decided(&self, _: u64, _: Timestamp, _: &PolicyRequest<'_>, _: &Verdict<'_>) {}
}

/// Per-connection memory: the message (`instance`) last charged and its answer, so
/// one message is charged once however many END-OF-MESSAGE requests it produces; the
/// buffers reply texts are written into, reused from request to request; and cached
/// handles on the configuration and the tier's decision counters.
#[derive(Debug, Default)]
pub struct ConnState {
    /// The connection's id (records keep connections apart).
    id: u64,
    /// The configuration, cached: see [`Policy::config_for`].
    config: Option<ConfigCache>,
    /// The decision counters of the tier last decided on.
    decisions: Option<TierDecisions>,
    last_instance: Vec<u8>,
    /// The answer to `last_instance`, without its text (that is `last_text`).
    last_answer: Option<Action<'static>>,
    last_text: String,
    /// The text of the answer being decided.
    text: String,
}

impl ConnState {
    /// The state of connection `id`.
    pub fn new(id: u64) -> ConnState {
        ConnState {
            id,
            ..ConnState::default()
        }
    }
}

/// A connection's cached handle on the configuration in force.
type ConfigCache = Cache<SharedConfig, Arc<Config>>;

/// The configuration in force, through `cache` (made for `shared` if it is not).
fn cached_config<'c>(shared: &SharedConfig, cache: &'c mut Option<ConfigCache>) -> &'c Arc<Config> {
    if cache
        .as_ref()
        .is_some_and(|c| !std::ptr::eq(c.arc_swap(), &**shared))
    {
        *cache = None;
    }
    cache
        .get_or_insert_with(|| Cache::new(Arc::clone(shared)))
        .load()
}

/// The answer to a new user when a key table is full and nothing may be evicted.
pub const TABLE_FULL: &str = "4.7.1 Too many senders tracked right now, try again later";

/// Requests at RCPT/DATA with no END-OF-MESSAGE ever seen before the wiring warning.
const WIRING_WARNING_AFTER: u64 = 50;

/// Warns once when Postfix asks at RCPT and DATA but never at END-OF-MESSAGE, where
/// mail is charged (a main.cf without `smtpd_end_of_data_restrictions`).
#[derive(Debug, Default)]
struct WiringWatch {
    peeks_without_eom: AtomicU64,
    eom_seen: AtomicBool,
    warned: AtomicBool,
}

impl WiringWatch {
    fn saw(&self, stage: Stage) {
        if stage == Stage::EndOfMessage {
            // Read first: a store on every request would take the line from the
            // other cores each time.
            if !self.eom_seen.load(Ordering::Relaxed) {
                self.eom_seen.store(true, Ordering::Relaxed);
            }
            return;
        }
        if self.eom_seen.load(Ordering::Relaxed) || self.warned.load(Ordering::Relaxed) {
            return;
        }
        if self.peeks_without_eom.fetch_add(1, Ordering::Relaxed) + 1 >= WIRING_WARNING_AFTER
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "{WIRING_WARNING_AFTER} RCPT/DATA requests and no END-OF-MESSAGE request yet: nothing is being counted. \
                 Mail is charged at END-OF-MESSAGE; add \"check_policy_service inet:HOST:PORT\" to \
                 smtpd_end_of_data_restrictions in main.cf (and keep it in smtpd_recipient_restrictions \
                 and smtpd_data_restrictions so blocked users are refused before sending the body)"
            );
        }
    }
}

/// The policy shared by every connection.
pub struct Policy {
    config: SharedConfig,
    backend: Backend,
    clock: Arc<dyn Clock>,
    observer: Arc<dyn Observer>,
    tally: Tally,
    incidents: incidents::Incidents,
    clients: ClientsSeen,
    wiring: WiringWatch,
    /// Store failures: one WARN line per interval, on the policy's clock.
    store_errors: LogThrottle,
    /// New users deferred for a full key table: likewise.
    store_full: LogThrottle,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// A policy deciding by `config` with `backend`, at the times `clock` gives,
    /// showing every verdict to `observer`.
    pub fn new(
        config: SharedConfig,
        backend: Backend,
        clock: Arc<dyn Clock>,
        observer: Arc<dyn Observer>,
    ) -> Policy {
        Policy {
            config,
            backend,
            clock,
            observer,
            tally: Tally::default(),
            incidents: incidents::Incidents::default(),
            clients: ClientsSeen::default(),
            wiring: WiringWatch::default(),
            store_errors: LogThrottle::new(LOG_EVERY),
            store_full: LogThrottle::new(LOG_EVERY),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The handle the configuration is swapped through.
    pub fn shared_config(&self) -> &SharedConfig {
        &self.config
    }

    /// The configuration in force, as `conn` sees it: while it has not been replaced,
    /// one relaxed atomic load, and no reference count is touched.
    pub fn config_for<'c>(&self, conn: &'c mut ConnState) -> &'c Arc<Config> {
        cached_config(&self.config, &mut conn.config)
    }

    /// Replaces the configuration atomically (in-flight requests finish with the old one).
    pub fn set_config(&self, config: Config) {
        self.config.store(Arc::new(config));
    }

    /// The stores.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The policy's counts.
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// The last client addresses seen per user.
    pub fn clients(&self) -> &ClientsSeen {
        &self.clients
    }

    /// How many incidents the policy remembers (open or not yet swept).
    pub fn incidents_remembered(&self) -> usize {
        self.incidents.len()
    }

    /// The clock.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Decides one request at `now`. The text of a refusal is written into `conn`
    /// (which allocates nothing once its buffers have grown), so the answer borrows it.
    pub async fn decide<'c>(
        &self,
        req: &PolicyRequest<'_>,
        conn: &'c mut ConnState,
        now: Timestamp,
    ) -> Verdict<'c> {
        let id = conn.id;
        let verdict = self.decide_quietly(req, conn, now).await;
        self.observer.decided(id, now, req, &verdict);
        verdict
    }

    async fn decide_quietly<'c>(
        &self,
        req: &PolicyRequest<'_>,
        conn: &'c mut ConnState,
        now: Timestamp,
    ) -> Verdict<'c> {
        self.tally.stage(req.protocol_state);
        let mode = match req.protocol_state {
            Stage::Rcpt | Stage::Data => Mode::Peek,
            Stage::EndOfMessage => Mode::Acquire,
            _ => return self.skip(),
        };
        self.wiring.saw(req.protocol_state);
        let cfg = cached_config(&self.config, &mut conn.config);
        let Some(key) = keying::request_key(cfg, req) else {
            return self.skip();
        };
        if keying::is_exempt(cfg, &key, req) {
            tracing::debug!(user = %key, "exempt");
            return self.skip();
        }
        let tier = cfg.tiers.map.tier_of(&key);
        let watch = cfg
            .networks
            .by_tier
            .get(tier.name())
            .filter(|_| !cfg.exempt.roaming_users.contains(key.as_ref()));
        let judged = baseline::judged(cfg, &key, tier);
        if tier.is_unlimited() && watch.is_none() && judged.is_none() {
            return self.skip();
        }
        self.clients.note(&key, req.client_address);
        if mode == Mode::Acquire
            && let Some(instance) = req.instance
            && conn.last_instance == instance
            && let Some(answer) = &conn.last_answer
        {
            return Verdict::answer(answer.with_text(Cow::Borrowed(&conn.last_text)));
        }
        let mut verdict = Verdict::skip();
        if let Some(policy) = watch {
            self.watch_networks(cfg, &key, tier, policy, now, req, &mut verdict)
                .await;
        }
        if verdict.outcome.is_none()
            && let Some(b) = judged
        {
            self.judge_baseline(cfg, &key, tier, b, now, req, &mut verdict)
                .await;
        }
        if verdict.outcome.is_none() {
            if tier.is_unlimited() {
                // Not counted, but what a warn signal found stays in the verdict.
                self.tally.add(Counted::Skipped);
                if mode == Mode::Acquire
                    && let Some(b) = judged
                {
                    self.feed_baseline(cfg, &key, b, now, &verdict).await;
                }
                return verdict;
            }
            self.volume(
                cfg,
                &key,
                tier,
                now,
                mode,
                req,
                &mut conn.text,
                &mut verdict,
            )
            .await;
        }
        if mode == Mode::Acquire
            && let Some(b) = judged
        {
            self.feed_baseline(cfg, &key, b, now, &verdict).await;
        }
        if let Some(outcome) = verdict.outcome {
            match &conn.decisions {
                Some(counts) if counts.tier() == tier.name() => counts.note(outcome),
                _ => {
                    let counts = self.tally.tier_decisions(tier.name());
                    counts.note(outcome);
                    conn.decisions = Some(counts);
                }
            }
        }
        if mode == Mode::Acquire
            && let Some(instance) = req.instance
        {
            conn.last_instance.clear();
            conn.last_instance.extend_from_slice(instance);
            conn.last_text.clear();
            conn.last_text
                .push_str(verdict.action.text().unwrap_or_default());
            conn.last_answer = Some(verdict.action.with_text(Cow::Borrowed("")));
        }
        tracing::debug!(user = %key, stage = %req.protocol_state, action = verdict.action.keyword(), "decided");
        verdict
    }

    fn skip<'t>(&self) -> Verdict<'t> {
        self.tally.add(Counted::Skipped);
        Verdict::skip()
    }

    /// An incident for `key`, with the client addresses it was seen from lately.
    #[allow(clippy::too_many_arguments)]
    fn incident(
        &self,
        key: &str,
        tier: &str,
        signal: Signal,
        limit: String,
        used: u64,
        clears_at: Option<u64>,
        req: &PolicyRequest<'_>,
        dry_run: bool,
        action: &'static str,
    ) -> Incident {
        Incident {
            key: key.to_string(),
            tier: tier.to_string(),
            limit,
            used,
            signal,
            clears_at,
            client_address: req.client_address_str().map(str::to_string),
            clients: self
                .clients
                .get(key)
                .iter()
                .map(|ip| ip.to_string())
                .collect(),
            dry_run,
            action,
            detail: String::new(),
        }
    }

    /// Logs a store failure at WARN at most once per interval (DEBUG otherwise).
    fn store_failed(
        &self,
        key: &str,
        error: &ratelimit_core::StoreError,
        now: Timestamp,
        what: &str,
    ) {
        match self.store_errors.allow_at(now.as_millis()) {
            Some(suppressed) => {
                tracing::warn!(user = %key, error = %error, suppressed, "{what}")
            }
            None => tracing::debug!(user = %key, error = %error, "{what}"),
        }
    }

    /// A new user a store has no room for (its key table is full and nothing in it
    /// may be evicted): a temporary refusal, whatever `on_store_error` says. A full
    /// table is not an outage, and must never mean "no limit". Logged at WARN at
    /// most once per interval.
    fn table_full(&self, key: &str, max_keys: usize, now: Timestamp, verdict: &mut Verdict<'_>) {
        self.tally.add(Counted::FullRefusals);
        match self.store_full.allow_at(now.as_millis()) {
            Some(suppressed) => tracing::warn!(
                user = %key,
                max_keys,
                suppressed,
                "key table full and nothing to evict: new users are deferred"
            ),
            None => tracing::debug!(user = %key, max_keys, "key table full: deferred"),
        }
        verdict.outcome = Some(Outcome::Defer);
        verdict.action = Action::DeferIfPermit(Cow::Borrowed(TABLE_FULL));
    }

    /// Sweeps idle keys from the stores and cleared incidents; returns how many
    /// counters' keys were removed.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now();
        self.incidents.sweep(now.as_millis());
        let baselines = self.sweep_baselines(now);
        if baselines > 0 {
            tracing::debug!(users = baselines, "swept baselines decayed to nothing");
        }
        self.backend.sweep(now)
    }

    /// Forgets a key's counters and client networks (unblocks it), its open
    /// incidents and its baseline flag (the hour's volume; the history stays, see
    /// [`Policy::forget_baseline`]). Blocking: call it off the async threads.
    pub fn forget(&self, key: &str) -> Result<bool, ratelimit_core::StoreError> {
        self.incidents.forget(key);
        let flag = self.clear_baseline_flag(key)?;
        Ok(self.backend.forget(key)? || flag)
    }

    /// Tracked keys with their use of their tier's first limit, heaviest first:
    /// (user, tier, used, the limit's count). Blocking: call it off the async threads.
    pub fn top_senders(
        &self,
        n: usize,
    ) -> Result<Vec<(String, String, u64, u64)>, ratelimit_core::StoreError> {
        let cfg = self.config();
        let now = self.now();
        let mut all: Vec<(String, String, u64, u64)> = Vec::new();
        self.backend.scan(&mut |key, state| {
            let tier = cfg.tiers.map.tier_of(key);
            if let Some(first) = tier.limits().first() {
                let used = state.used(first, now);
                if used > 0 {
                    all.push((
                        key.to_string(),
                        tier.name().to_string(),
                        used,
                        first.count(),
                    ));
                }
            }
        })?;
        all.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        Ok(all)
    }
}
