//! Request → key → tier → decision → action.
//!
//! - **Key**: `sasl_username`, trimmed and lowercased, whatever IP it comes from.
//!   Without SASL: skip, or key on client address, client network or sender
//!   (`[keying] without_sasl`).
//! - **Stages**: RCPT and DATA *peek* (a user already over a limit is refused before
//!   the body is sent; nothing is recorded); END-OF-MESSAGE *acquires* (the only stage
//!   with the real size and accepted recipient count), once per `instance`. Every other
//!   stage answers `DUNNO`.
//! - **Decision**: all limits of the user's tier; recorded only if all admit.
//! - **Action**: `DUNNO` when allowed; otherwise the tier's action with a text that
//!   says which limit and when to retry. A store failure gets the configured
//!   fail-open (`DUNNO`) or fail-closed (defer) answer, within `decision_timeout`.
//! - **Compromise signal** (tiers with `max_networks`, or `[networks]`): every RCPT,
//!   DATA and END-OF-MESSAGE request *observes* the client's network (`ipv4_prefix` /
//!   `ipv6_prefix`) for the user before the volume limits are checked, so a request
//!   that the volume limits refuse still reveals its address. Observing is idempotent
//!   (a network seen again only moves its last-seen time), so one message observed
//!   at three stages counts once. A user seen from more than `max_networks` networks
//!   within `networks_window` is flagged for a window after the last crossing; while
//!   flagged, each request gets the networks action (default `HOLD`) instead of the
//!   volume decision, and nothing is charged. `warn` only logs and alerts. Roaming
//!   users (`[exempt] roaming_users`) and tiers with `networks_exempt` are not watched.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use arc_swap::cache::Cache;
use ipnet::IpNet;
use parking_lot::Mutex;
use ratelimit_core::distinct::{DistinctStore, Observation};
use ratelimit_core::store::{DistinctMemoryStore, RedisStore, Reset, Scan, Sweep};
use ratelimit_core::{
    Clock, Cost, Decision, Limit, MemoryStore, Mode, Store, StoreError, Tier, Timestamp,
};

use crate::config::{
    ActionKind, Backend, Config, FailMode, NetworksPolicy, TierPolicy, WithoutSasl,
};
use crate::protocol::{Action, PolicyRequest, Stage};
use crate::template::{Approx, Fill, Template, TimeOfDay};

/// Where counters live, as the server sees it.
#[derive(Clone)]
pub enum Counters {
    /// In-process: decided inline, without leaving the connection's task.
    Memory(Arc<MemoryStore>),
    /// Redis, shared by every server using it: decided on the blocking pool, bounded
    /// by `decision_timeout`.
    Remote(Arc<RedisStore>),
}

impl Counters {
    /// The memory store, when counters are in-process.
    pub fn memory(&self) -> Option<&Arc<MemoryStore>> {
        match self {
            Counters::Memory(m) => Some(m),
            Counters::Remote(_) => None,
        }
    }
}

/// What [`Stats`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
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
    /// Refusals logged only (warn tiers).
    DryRun,
    /// Store failures and timeouts.
    StoreErrors,
    /// Requests not counted: no key, exempt, unlimited tier, other stages.
    Skipped,
    /// Messages charged at END-OF-MESSAGE.
    Charged,
    /// Requests answered with the networks action (too many client networks).
    NetworksFlagged,
}

impl Stat {
    /// How many there are.
    const COUNT: usize = Stat::NetworksFlagged as usize + 1;

    /// Requests by stage, in the order of [`Stats::requests`].
    pub const STAGES: [Stat; 4] = [Stat::Rcpt, Stat::Data, Stat::EndOfMessage, Stat::OtherStage];
}

/// Request and decision counters (for metrics and `stats`), striped: every request
/// adds to one or two, from whichever connection thread serves it.
#[derive(Debug, Default)]
pub struct Stats(crate::ops::striped::Counters<{ Stat::COUNT }>);

impl Stats {
    /// Counts one `stat`.
    pub fn add(&self, stat: Stat) {
        self.0.add(stat as usize, 1);
    }

    /// The count of `stat` so far.
    pub fn get(&self, stat: Stat) -> u64 {
        self.0.get(stat as usize)
    }

    /// Requests by stage: RCPT, DATA, END-OF-MESSAGE, other.
    pub fn requests(&self) -> [u64; 4] {
        let all = self.0.all();
        Stat::STAGES.map(|s| all.get(s as usize).copied().unwrap_or(0))
    }

    fn stage(&self, stage: Stage) {
        self.add(match stage {
            Stage::Rcpt => Stat::Rcpt,
            Stage::Data => Stat::Data,
            Stage::EndOfMessage => Stat::EndOfMessage,
            _ => Stat::OtherStage,
        });
    }
}

/// Per-connection memory: the message (`instance`) last charged and its answer, so
/// one message is charged once however many END-OF-MESSAGE requests it produces; and
/// the buffers reply texts are written into, reused from request to request.
#[derive(Debug, Default)]
pub struct ConnState {
    /// The configuration, cached: see [`Engine::config_for`].
    config: Option<ConfigCache>,
    /// The decision counters of the tier last decided on.
    decisions: Option<crate::ops::TierDecisions>,
    last_instance: Vec<u8>,
    /// The answer to `last_instance`, without its text (that is `last_text`).
    last_answer: Option<Action<'static>>,
    last_text: String,
    /// The text of the answer being decided.
    text: String,
}

/// A connection's cached handle on the configuration in force.
type ConfigCache = Cache<Arc<ArcSwap<Config>>, Arc<Config>>;

/// The configuration in force, through `cache` (made for `shared` if it is not).
fn cached_config<'c>(
    shared: &Arc<ArcSwap<Config>>,
    cache: &'c mut Option<ConfigCache>,
) -> &'c Arc<Config> {
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

/// An incident: the first refusal of a key for one limit, until it clears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incident {
    /// The key (user).
    pub key: String,
    /// Its tier.
    pub tier: String,
    /// The limit that refused, as written (`100/1h`).
    pub limit: String,
    /// The count used when refused.
    pub used: u64,
    /// When it clears (ms since the epoch), if ever.
    pub clears_at: Option<u64>,
    /// The client address of the refused request.
    pub client_address: Option<String>,
    /// The last few distinct client addresses of the key, most recent first.
    pub clients: Vec<String>,
    /// Whether the refusal was only logged (warn tier).
    pub dry_run: bool,
}

/// Called once per incident (alert hook, metrics); must not block.
pub type IncidentSink = Arc<dyn Fn(&Incident) + Send + Sync>;

/// Where the client networks seen per user live: beside the counters.
enum Networks {
    /// In-process, decided inline.
    Memory(Arc<DistinctMemoryStore>),
    /// In the counters' Redis (a second script), on the blocking pool.
    Remote(Arc<RedisStore>),
}

/// Open incidents: until when (ms), by key and limit index.
type Incidents = hashbrown::HashMap<(String, usize), u64, ahash::RandomState>;

/// An [`Incidents`] key to look up without copying the user's key (hashes as the
/// tuple does: the string, then the index).
#[derive(Hash)]
struct IncidentKey<'a>(&'a str, usize);

impl hashbrown::Equivalent<(String, usize)> for IncidentKey<'_> {
    fn equivalent(&self, key: &(String, usize)) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

/// The incident index of the networks signal (volume limits use their position).
const NETWORKS_INCIDENT: usize = usize::MAX;

/// The policy engine shared by every connection.
pub struct Engine {
    /// Shared with the connections' [`ConfigCache`]s.
    config: Arc<ArcSwap<Config>>,
    counters: Counters,
    networks: Networks,
    clock: Arc<dyn Clock>,
    /// Counters for metrics.
    pub stats: Stats,
    /// Operational counters and worker handles (metrics, alerts, recording).
    pub ops: crate::ops::OpsState,
    incidents: Mutex<Incidents>,
    incident_sink: Mutex<Option<IncidentSink>>,
    peeks_without_eom: AtomicU64,
    eom_seen: AtomicBool,
    wiring_warned: AtomicBool,
    last_snapshot_ms: AtomicU64,
}

/// The policy of a tier without one of its own (every configured tier has one).
static DEFAULT_POLICY: LazyLock<TierPolicy> = LazyLock::new(|| TierPolicy {
    action: ActionKind::Defer,
    message: Template::new(crate::config::DEFAULT_MESSAGE),
    limits: Vec::new(),
});

/// Requests at RCPT/DATA with no END-OF-MESSAGE ever seen before the wiring warning.
const WIRING_WARNING_AFTER: u64 = 50;
/// Most open incidents remembered (one per user and limit); older ones are dropped
/// first when full, which at worst logs an incident twice.
const MAX_INCIDENTS: usize = 100_000;

impl Engine {
    /// An engine deciding by `config` with `counters`, at the times `clock` gives.
    pub fn new(config: Config, counters: Counters, clock: Arc<dyn Clock>) -> Engine {
        let networks = match &counters {
            Counters::Memory(_) => Networks::Memory(Arc::new(DistinctMemoryStore::new(
                match config.store.backend {
                    Backend::Memory { max_keys } => max_keys,
                    Backend::Redis { .. } => 1_000_000,
                },
            ))),
            Counters::Remote(r) => Networks::Remote(Arc::clone(r)),
        };
        Engine {
            config: Arc::new(ArcSwap::from_pointee(config)),
            counters,
            networks,
            clock,
            stats: Stats::default(),
            ops: crate::ops::OpsState::default(),
            incidents: Mutex::new(Incidents::default()),
            incident_sink: Mutex::new(None),
            peeks_without_eom: AtomicU64::new(0),
            eom_seen: AtomicBool::new(false),
            wiring_warned: AtomicBool::new(false),
            last_snapshot_ms: AtomicU64::new(0),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The configuration in force, as `conn` sees it: while it has not been replaced,
    /// one relaxed atomic load, and no reference count is touched (a connection
    /// holds on to the configuration it last used until its next request).
    pub fn config_for<'c>(&self, conn: &'c mut ConnState) -> &'c Arc<Config> {
        cached_config(&self.config, &mut conn.config)
    }

    /// Replaces the configuration atomically (in-flight requests finish with the old one).
    pub fn set_config(&self, config: Config) {
        self.config.store(Arc::new(config));
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The clock.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Records that a snapshot was written at `at`.
    pub fn note_snapshot(&self, at: Timestamp) {
        self.last_snapshot_ms
            .store(at.as_millis(), Ordering::Relaxed);
    }

    /// When the last snapshot was written, if one was.
    pub fn last_snapshot(&self) -> Option<Timestamp> {
        match self.last_snapshot_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Timestamp::from_millis(ms)),
        }
    }

    /// Sets the function called once per incident.
    pub fn set_incident_sink(&self, sink: IncidentSink) {
        *self.incident_sink.lock() = Some(sink);
    }

    /// Decides one request. The text of a refusal is written into `conn` (which
    /// allocates nothing once its buffers have grown), so the answer borrows it.
    pub async fn decide<'c>(&self, req: &PolicyRequest<'_>, conn: &'c mut ConnState) -> Action<'c> {
        self.decide_at(req, conn, self.clock.now()).await
    }

    /// [`Engine::decide`] at `now`, for a caller that has read the clock already.
    pub async fn decide_at<'c>(
        &self,
        req: &PolicyRequest<'_>,
        conn: &'c mut ConnState,
        now: Timestamp,
    ) -> Action<'c> {
        self.stats.stage(req.protocol_state);
        let mode = match req.protocol_state {
            Stage::Rcpt | Stage::Data => Mode::Peek,
            Stage::EndOfMessage => Mode::Acquire,
            _ => return self.skip(),
        };
        self.watch_wiring(req.protocol_state);
        let cfg = cached_config(&self.config, &mut conn.config);
        let Some(key) = request_key(cfg, req) else {
            return self.skip();
        };
        if is_exempt(cfg, &key, req) {
            tracing::debug!(user = %key, "exempt");
            return self.skip();
        }
        let tier = cfg.tiers.map.tier_of(&key);
        let watch = cfg
            .networks
            .by_tier
            .get(tier.name())
            .filter(|_| !cfg.exempt.roaming_users.contains(key.as_ref()));
        if tier.is_unlimited() && watch.is_none() {
            return self.skip();
        }
        self.ops.clients.note(&key, req.client_address);
        if mode == Mode::Acquire
            && let Some(instance) = req.instance
            && conn.last_instance == instance
            && let Some(answer) = &conn.last_answer
        {
            return answer.with_text(Cow::Borrowed(&conn.last_text));
        }
        let flagged = match watch {
            Some(policy) => self.watch_networks(cfg, &key, tier, policy, now, req).await,
            None => None,
        };
        let (answer, allowed) = match flagged {
            Some(answer) => (answer, Some(false)),
            None if tier.is_unlimited() => return self.skip(),
            None => {
                self.volume(cfg, &key, tier, now, mode, req, &mut conn.text)
                    .await
            }
        };
        let outcome = crate::ops::Outcome::of(allowed, &answer);
        match &conn.decisions {
            Some(counts) if counts.tier() == tier.name() => counts.note(outcome),
            _ => {
                let counts = self.ops.tier_decisions(tier.name());
                counts.note(outcome);
                conn.decisions = Some(counts);
            }
        }
        if mode == Mode::Acquire
            && let Some(instance) = req.instance
        {
            conn.last_instance.clear();
            conn.last_instance.extend_from_slice(instance);
            conn.last_text.clear();
            conn.last_text.push_str(answer.text().unwrap_or_default());
            conn.last_answer = Some(answer.with_text(Cow::Borrowed("")));
        }
        tracing::debug!(user = %key, stage = %req.protocol_state, action = answer.keyword(), "decided");
        answer
    }

    /// An incident for `key`, with the client addresses it was seen from lately.
    #[allow(clippy::too_many_arguments)]
    fn incident(
        &self,
        key: &str,
        tier: &Tier,
        limit: String,
        used: u64,
        clears_at: Option<u64>,
        req: &PolicyRequest<'_>,
        dry_run: bool,
    ) -> Incident {
        Incident {
            key: key.to_string(),
            tier: tier.name().to_string(),
            limit,
            used,
            clears_at,
            client_address: req.client_address_str().map(str::to_string),
            clients: self
                .ops
                .clients
                .get(key)
                .iter()
                .map(|ip| ip.to_string())
                .collect(),
            dry_run,
        }
    }

    fn skip<'t>(&self) -> Action<'t> {
        self.stats.add(Stat::Skipped);
        Action::Dunno
    }

    /// The volume decision: the tier's limits, charged at END-OF-MESSAGE. Also whether
    /// the limits admitted (`None`: the store failed). A refusal's text goes in `text`.
    #[allow(clippy::too_many_arguments)]
    async fn volume<'t>(
        &self,
        cfg: &Config,
        key: &str,
        tier: &Arc<Tier>,
        now: Timestamp,
        mode: Mode,
        req: &PolicyRequest<'_>,
        text: &'t mut String,
    ) -> (Action<'t>, Option<bool>) {
        let recipients = req.recipient_count.unwrap_or(0).max(1);
        let cost = match req.protocol_state {
            Stage::Rcpt => Cost::message(1, req.size.unwrap_or(0)),
            _ => Cost::message(recipients, req.size.unwrap_or(0)),
        };
        let result = self.check(cfg, key, tier, cost, now, mode).await;
        let allowed = result.as_ref().ok().map(Decision::is_allowed);
        let answer = match result {
            Ok(decision) => self.answer(cfg, key, tier, &decision, now, req, text),
            Err(e) => {
                self.stats.add(Stat::StoreErrors);
                // During an outage every request fails: warn at most every few seconds.
                match self.ops.store_error_log_due(now.as_millis()) {
                    Some(suppressed) => {
                        tracing::warn!(user = %key, error = %e, fail = ?cfg.server.on_store_error, suppressed, "store failure")
                    }
                    None => tracing::debug!(user = %key, error = %e, "store failure"),
                }
                match cfg.server.on_store_error {
                    FailMode::Open => Action::Dunno,
                    FailMode::Closed => Action::DeferIfPermit(Cow::Borrowed(
                        "4.3.0 Rate limiter temporarily unavailable, try again later",
                    )),
                }
            }
        };
        (answer, allowed)
    }

    /// Observes the request's client network for `key`; the networks action when the
    /// user is flagged (and the action is not `warn`), else `None` (go on to the
    /// volume decision). A store failure is logged and counted, and the volume
    /// decision (with its own failure policy) decides.
    async fn watch_networks(
        &self,
        cfg: &Config,
        key: &str,
        tier: &Tier,
        policy: &NetworksPolicy,
        now: Timestamp,
        req: &PolicyRequest<'_>,
    ) -> Option<Action<'static>> {
        let ip = canonical_ip(req.client_address.and_then(parse_ip)?);
        let network =
            client_network(ip, cfg.keying.ipv4_prefix, cfg.keying.ipv6_prefix).to_string();
        let observation = match self.observe(cfg, key, &network, policy, now).await {
            Ok(o) => o,
            Err(e) => {
                self.stats.add(Stat::StoreErrors);
                match self.ops.store_error_log_due(now.as_millis()) {
                    Some(suppressed) => {
                        tracing::warn!(user = %key, error = %e, suppressed, "store failure observing the client network; volume limits only")
                    }
                    None => {
                        tracing::debug!(user = %key, error = %e, "store failure observing the client network")
                    }
                }
                return None;
            }
        };
        let until = observation.flagged_until?;
        let dry_run = policy.action == ActionKind::Warn;
        self.note_networks_incident(key, tier, policy, &observation, until, now, req, dry_run);
        let retry = until.saturating_duration_since(now);
        let rendered = render(
            &policy
                .message
                .replace("{max}", &policy.limit.max().to_string())
                .replace("{window}", &fmt_duration(policy.limit.window()))
                .replace("{networks}", &observation.distinct.to_string())
                .replace("{limit}", &format!("networks{}", policy.limit)),
            key,
            tier.name(),
            None,
            Some(retry),
            Some(until.as_millis()),
        );
        if dry_run {
            self.stats.add(Stat::DryRun);
            tracing::info!(user = %key, tier = tier.name(), network = %network, networks = observation.distinct, "dry run: would act on too many networks");
            return None;
        }
        self.stats.add(Stat::NetworksFlagged);
        let mut text = String::new();
        Some(refusal(&policy.action, &mut text, |out| out.push_str(&rendered)).into_owned())
    }

    async fn observe(
        &self,
        cfg: &Config,
        key: &str,
        network: &str,
        policy: &NetworksPolicy,
        now: Timestamp,
    ) -> Result<Observation, StoreError> {
        match &self.networks {
            Networks::Memory(m) => m.observe(key, network, &policy.limit, now),
            Networks::Remote(store) => {
                let store = Arc::clone(store);
                let (key, network, limit) = (key.to_string(), network.to_string(), policy.limit);
                blocking_store_call(cfg.server.decision_timeout, move || {
                    store.observe(&key, &network, &limit, now)
                })
                .await
            }
        }
    }

    /// One log line and one sink call per flagging: while the flag stays up (an
    /// abuser spreading on), the open incident is extended, not repeated.
    #[allow(clippy::too_many_arguments)]
    fn note_networks_incident(
        &self,
        key: &str,
        tier: &Tier,
        policy: &NetworksPolicy,
        observation: &Observation,
        until: Timestamp,
        now: Timestamp,
        req: &PolicyRequest<'_>,
        dry_run: bool,
    ) {
        let now_ms = now.as_millis();
        {
            let mut open = self.incidents.lock();
            if let Some(open_until) = open.get_mut(&IncidentKey(key, NETWORKS_INCIDENT))
                && *open_until > now_ms
            {
                *open_until = (*open_until).max(until.as_millis());
                return;
            }
            if open.len() >= MAX_INCIDENTS {
                open.retain(|_, u| *u > now_ms);
                if open.len() >= MAX_INCIDENTS {
                    open.clear();
                }
            }
            open.insert((key.to_string(), NETWORKS_INCIDENT), until.as_millis());
        }
        let incident = self.incident(
            key,
            tier,
            format!("networks{}", policy.limit),
            u64::from(observation.distinct),
            Some(until.as_millis()),
            req,
            dry_run,
        );
        self.ops.incidents.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            user = %incident.key,
            tier = %incident.tier,
            limit = %incident.limit,
            networks = observation.distinct,
            client = incident.client_address.as_deref().unwrap_or("-"),
            clients_seen = %if incident.clients.is_empty() { "-".to_string() } else { incident.clients.join(",") },
            action = ?policy.action,
            clears_at = %crate::ops::rfc3339(until.as_millis()),
            clears_in = %fmt_duration(until.saturating_duration_since(now)),
            dry_run,
            "incident: user sending from too many networks (compromised account?)"
        );
        let sink = self.incident_sink.lock().clone();
        if let Some(sink) = sink {
            sink(&incident);
        }
    }

    async fn check(
        &self,
        cfg: &Config,
        key: &str,
        tier: &Arc<Tier>,
        cost: Cost,
        now: Timestamp,
        mode: Mode,
    ) -> Result<Decision, StoreError> {
        match &self.counters {
            Counters::Memory(m) => m.check(key, tier.limits(), cost, now, mode),
            Counters::Remote(store) => {
                let store = Arc::clone(store);
                let key = key.to_string();
                let tier = Arc::clone(tier);
                blocking_store_call(cfg.server.decision_timeout, move || {
                    store.check(&key, tier.limits(), cost, now, mode)
                })
                .await
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn answer<'t>(
        &self,
        cfg: &Config,
        key: &str,
        tier: &Tier,
        decision: &Decision,
        now: Timestamp,
        req: &PolicyRequest<'_>,
        text: &'t mut String,
    ) -> Action<'t> {
        let Some(denial) = decision.denial() else {
            self.stats.add(Stat::Allowed);
            if req.protocol_state == Stage::EndOfMessage {
                self.stats.add(Stat::Charged);
            }
            return Action::Dunno;
        };
        let policy = cfg
            .tiers
            .policies
            .get(tier.name())
            .unwrap_or(&DEFAULT_POLICY);
        let limit = tier.limits().get(denial.limit).copied();
        let used = decision.statuses().get(denial.limit).map_or(0, |s| s.used);
        let clears_at = denial
            .retry_after
            .map(|r| now.saturating_add(r).as_millis());
        let dry_run = policy.action == ActionKind::Warn;
        self.note_incident(
            key,
            tier,
            denial.limit,
            limit,
            used,
            clears_at,
            now,
            req,
            dry_run,
        );
        if dry_run {
            self.stats.add(Stat::DryRun);
            tracing::debug!(user = %key, tier = tier.name(), limit = %limit.map(|l| l.to_string()).unwrap_or_default(), "dry run: would refuse");
            return Action::Dunno;
        }
        self.stats.add(Stat::Refused);
        let formatted;
        let limit_text = match policy.limits.get(denial.limit) {
            Some((l, text)) if Some(*l) == limit => text.as_str(),
            _ => {
                formatted = limit.map(|l| l.to_string()).unwrap_or_default();
                &formatted
            }
        };
        let fill = Fill {
            user: key,
            tier: tier.name(),
            limit: limit_text,
            retry_after: denial.retry_after,
            clears_at,
        };
        refusal(&policy.action, text, |out| policy.message.write(out, &fill))
    }

    #[allow(clippy::too_many_arguments)]
    fn note_incident(
        &self,
        key: &str,
        tier: &Tier,
        limit_index: usize,
        limit: Option<Limit>,
        used: u64,
        clears_at: Option<u64>,
        now: Timestamp,
        req: &PolicyRequest<'_>,
        dry_run: bool,
    ) {
        let now_ms = now.as_millis();
        {
            let mut open = self.incidents.lock();
            if let Some(until) = open.get_mut(&IncidentKey(key, limit_index))
                && *until > now_ms
            {
                return; // still the same incident
            }
            if open.len() >= MAX_INCIDENTS {
                open.retain(|_, until| *until > now_ms);
                if open.len() >= MAX_INCIDENTS {
                    open.clear();
                }
            }
            // An incident with no retry time (cost above the limit) lasts a window.
            let until = clears_at.unwrap_or(now_ms + limit.map_or(3_600_000, |l| l.window_ms()));
            open.insert((key.to_string(), limit_index), until);
        }
        let incident = self.incident(
            key,
            tier,
            limit.map(|l| l.to_string()).unwrap_or_default(),
            used,
            clears_at,
            req,
            dry_run,
        );
        self.ops.incidents.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            user = %incident.key,
            tier = %incident.tier,
            limit = %incident.limit,
            used = incident.used,
            client = incident.client_address.as_deref().unwrap_or("-"),
            clients_seen = %if incident.clients.is_empty() { "-".to_string() } else { incident.clients.join(",") },
            clears_at = %clears_at.map(crate::ops::rfc3339).unwrap_or_else(|| "never".into()),
            clears_in = %clears_at.map(|c| fmt_duration(Duration::from_millis(c.saturating_sub(now_ms)))).unwrap_or_else(|| "never (message larger than the limit)".into()),
            dry_run,
            "incident: user over limit"
        );
        let sink = self.incident_sink.lock().clone();
        if let Some(sink) = sink {
            sink(&incident);
        }
    }

    fn watch_wiring(&self, stage: Stage) {
        if stage == Stage::EndOfMessage {
            // Read first: a store on every request would take the line from the
            // other cores each time.
            if !self.eom_seen.load(Ordering::Relaxed) {
                self.eom_seen.store(true, Ordering::Relaxed);
            }
            return;
        }
        if self.eom_seen.load(Ordering::Relaxed) || self.wiring_warned.load(Ordering::Relaxed) {
            return;
        }
        if self.peeks_without_eom.fetch_add(1, Ordering::Relaxed) + 1 >= WIRING_WARNING_AFTER
            && !self.wiring_warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "{WIRING_WARNING_AFTER} RCPT/DATA requests and no END-OF-MESSAGE request yet: nothing is being counted. \
                 Mail is charged at END-OF-MESSAGE; add \"check_policy_service inet:HOST:PORT\" to \
                 smtpd_end_of_data_restrictions in main.cf (and keep it in smtpd_recipient_restrictions \
                 and smtpd_data_restrictions so blocked users are refused before sending the body)"
            );
        }
    }

    /// Sweeps idle keys from the memory store; returns how many were removed.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now();
        self.incidents
            .lock()
            .retain(|_, until| *until > now.as_millis());
        let networks = match &self.networks {
            Networks::Memory(m) => m.sweep(now),
            Networks::Remote(_) => 0,
        };
        if networks > 0 {
            tracing::debug!(users = networks, "swept idle client-network state");
        }
        match &self.counters {
            Counters::Memory(m) => m.sweep(now),
            Counters::Remote(_) => 0,
        }
    }

    /// Forgets a key's counters and the client networks seen for it (unblocks it),
    /// and its open incidents.
    pub fn reset(&self, key: &str) -> Result<bool, StoreError> {
        self.incidents.lock().retain(|(k, _), _| k != key);
        let networks = match &self.networks {
            Networks::Memory(m) => m.forget(key),
            Networks::Remote(r) => r.forget(key),
        }?;
        let counters = match &self.counters {
            Counters::Memory(m) => m.reset(key),
            Counters::Remote(r) => r.reset(key),
        }?;
        Ok(counters || networks)
    }

    /// For the memory store: the number of users whose client networks are tracked,
    /// `key`'s networks kept, and their heap bytes. `None` with Redis.
    pub fn network_state(&self, key: &str) -> Option<(usize, usize, usize)> {
        match &self.networks {
            Networks::Memory(m) => Some((m.key_count(), m.entry_count(key), m.key_heap_bytes(key))),
            Networks::Remote(_) => None,
        }
    }

    /// Number of tracked keys (memory store), if known.
    pub fn tracked_keys(&self) -> Option<usize> {
        self.counters.memory().map(|m| m.key_count())
    }

    /// Calls `f` for every tracked key with its state (memory: one shard lock at a
    /// time; Redis: SCAN, for admin use).
    pub fn scan(
        &self,
        f: &mut dyn FnMut(&str, &ratelimit_core::KeyState),
    ) -> Result<(), StoreError> {
        match &self.counters {
            Counters::Memory(m) => {
                m.scan(f);
                Ok(())
            }
            Counters::Remote(r) => r.try_scan(f).map(|_| ()),
        }
    }
}

/// The answer of a tier's `action` to a user over a limit, its text written into
/// `text` by `write` (after the enhanced status code of an explicit reply code, as in
/// `451 4.7.1`; a code that is not 4xx or 5xx defers instead).
fn refusal<'t>(
    action: &ActionKind,
    text: &'t mut String,
    write: impl FnOnce(&mut String),
) -> Action<'t> {
    text.clear();
    let code = match action {
        ActionKind::Code(code) | ActionKind::Reject(Some(code)) => {
            let (num, enhanced) = match code.split_once(' ') {
                Some((num, enhanced)) => (num, Some(enhanced)),
                None => (code.as_str(), None),
            };
            if let Some(enhanced) = enhanced {
                text.push_str(enhanced);
                text.push(' ');
            }
            Some(num.parse::<u16>().unwrap_or(450))
        }
        ActionKind::Defer | ActionKind::Warn | ActionKind::Hold | ActionKind::Reject(None) => None,
    };
    write(text);
    let text = Cow::Borrowed(text.as_str());
    match (action, code) {
        (_, Some(num)) => Action::code(num, text.clone()).unwrap_or(Action::DeferIfPermit(text)),
        (ActionKind::Hold, _) => Action::Hold(text),
        (ActionKind::Reject(_), _) => Action::Reject(text),
        _ => Action::DeferIfPermit(text),
    }
}

/// The key for a request, normalized; `None` when it is not counted.
pub fn request_key<'a>(cfg: &Config, req: &PolicyRequest<'a>) -> Option<Cow<'a, str>> {
    if let Some(user) = req.sasl_username {
        return Some(crate::key::normalize(user));
    }
    match cfg.keying.without_sasl {
        WithoutSasl::Skip => None,
        WithoutSasl::ClientAddress => {
            let ip = parse_ip(req.client_address?)?;
            Some(Cow::Owned(format!("ip:{ip}")))
        }
        WithoutSasl::ClientPrefix => {
            let ip = parse_ip(req.client_address?)?;
            let net = client_network(ip, cfg.keying.ipv4_prefix, cfg.keying.ipv6_prefix);
            Some(Cow::Owned(format!("net:{net}")))
        }
        WithoutSasl::Sender => {
            let sender = req.sender?;
            Some(Cow::Owned(format!(
                "sender:{}",
                crate::key::normalize(sender)
            )))
        }
    }
}

/// The network of `ip` at the configured prefix lengths.
pub fn client_network(ip: IpAddr, v4: u8, v6: u8) -> IpNet {
    let prefix = if ip.is_ipv4() { v4 } else { v6 };
    IpNet::new(ip, prefix)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| IpNet::from(ip))
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn parse_ip(raw: &[u8]) -> Option<IpAddr> {
    std::str::from_utf8(raw).ok()?.parse().ok()
}

fn is_exempt(cfg: &Config, key: &str, req: &PolicyRequest<'_>) -> bool {
    if cfg.exempt.users.contains(key) {
        return true;
    }
    if !cfg.exempt.domains.is_empty()
        && let Some((_, domain)) = key.rsplit_once('@')
        && cfg.exempt.domains.contains(domain)
    {
        return true;
    }
    if !cfg.exempt.clients.is_empty()
        && let Some(ip) = req.client_address.and_then(parse_ip)
    {
        return cfg.exempt.clients.iter().any(|n| n.contains(&ip));
    }
    false
}

/// Fills a reply template: `{user}`, `{tier}`, `{limit}`, `{retry}`, `{retry_at}`
/// (see [`Template`], which the request path uses instead).
pub fn render(
    template: &str,
    user: &str,
    tier: &str,
    limit: Option<Limit>,
    retry_after: Option<Duration>,
    clears_at: Option<u64>,
) -> String {
    Template::new(template).replace_chained(&Fill {
        user,
        tier,
        limit: &limit.map(|l| l.to_string()).unwrap_or_default(),
        retry_after,
        clears_at,
    })
}

/// `1h5m`, `12m30s`, `45s` (rounded up to whole seconds).
pub fn fmt_duration(d: Duration) -> String {
    Approx(d).to_string()
}

/// `14:05:30 UTC` for a wall-clock time in ms.
pub fn fmt_time_of_day(ms: u64) -> String {
    TimeOfDay(ms).to_string()
}

/// Tracked keys and their usage of their tier's first limit, heaviest first.
pub fn top_senders(engine: &Engine, n: usize) -> Vec<(String, String, u64, u64)> {
    let cfg = engine.config();
    let now = engine.now();
    let mut all: Vec<(String, String, u64, u64)> = Vec::new();
    let _ = engine.scan(&mut |key, state| {
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
    });
    all.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    all.truncate(n);
    all
}

/// Runs a call to a remote store on the blocking pool, bounded by `timeout`: a
/// store that hangs, or a task that panics, is a [`StoreError`] like any other.
async fn blocking_store_call<T: Send + 'static>(
    timeout: std::time::Duration,
    call: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(call)).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(StoreError::Unavailable(format!(
            "store task failed: {join}"
        ))),
        Err(_) => Err(StoreError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(fmt_duration(Duration::from_millis(1)), "1s");
        assert_eq!(fmt_duration(Duration::from_secs(45)), "45s");
        assert_eq!(fmt_duration(Duration::from_secs(750)), "12m30s");
        assert_eq!(fmt_duration(Duration::from_secs(600)), "10m");
        assert_eq!(fmt_duration(Duration::from_secs(3900)), "1h5m");
        assert_eq!(fmt_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(fmt_time_of_day(1_700_000_000_000), "22:13:20 UTC");
    }

    #[test]
    fn templates_are_filled() {
        let t = render(
            "{user} in {tier} hit {limit}; retry in {retry} ({retry_at})",
            "a@b",
            "default",
            "100/1h".parse().ok(),
            Some(Duration::from_secs(90)),
            Some(1_700_000_000_000),
        );
        assert_eq!(
            t,
            "a@b in default hit 100/1h; retry in 1m30s (22:13:20 UTC)"
        );
    }

    #[test]
    fn client_networks_use_the_prefix() {
        let ip: IpAddr = "192.0.2.77".parse().unwrap();
        assert_eq!(client_network(ip, 24, 64).to_string(), "192.0.2.0/24");
        let ip6: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        assert_eq!(client_network(ip6, 24, 64).to_string(), "2001:db8:1:2::/64");
    }
}
