//! Configuration: TOML parsed into raw structs, then validated once into typed values.
//!
//! Unknown fields are rejected. Every error names the file, the line and the field.
//! The full reference is `config/example.toml` (and the README).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ahash::{AHashMap, AHashSet};
use ipnet::IpNet;
use ratelimit_core::distinct::DistinctLimit;
use ratelimit_core::quota::parse_duration_ms;
use ratelimit_core::{Limit, Tier, TierMap, Unit};
use serde::Deserialize;
use toml::Spanned;

use crate::key;
use crate::template::Template;

pub mod ops;

pub use self::ops::OpsConfig;

/// The built-in default configuration (used when no `--config` is given).
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.toml");

/// A configuration error: what was wrong and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or "built-in default").
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The field, as a dotted path (`tiers.bulk.limits`), when known.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address (`127.0.0.1:10031`, `[::1]:10031`).
    Tcp(SocketAddr),
    /// A Unix socket path (`unix:/run/ratelimit/policy.sock`).
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("a unix: address needs a path".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
            format!("\"{s}\" is neither host:port (an IP address and port) nor unix:/path")
        })
    }
}

/// What to answer when the store fails or does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Let the mail through (`DUNNO`): a broken limiter never stops mail.
    Open,
    /// Defer the mail (`DEFER_IF_PERMIT`): nothing gets out unchecked.
    Closed,
}

/// What to do with mail from a user who has no SASL login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithoutSasl {
    /// Do not count it (answer `DUNNO`).
    Skip,
    /// Count it per client IP address.
    ClientAddress,
    /// Count it per client network (`ipv4_prefix` / `ipv6_prefix`).
    ClientPrefix,
    /// Count it per envelope sender.
    Sender,
}

/// The answer to a user over a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionKind {
    /// `DEFER_IF_PERMIT text` (Postfix answers `450 4.7.1 text`): the client retries later.
    Defer,
    /// An explicit temporary code, `4NN X.Y.Z text`.
    Code(String),
    /// `HOLD text`: accept into the hold queue for review.
    Hold,
    /// `REJECT text` (or an explicit `5NN X.Y.Z`): the mail bounces. Use with care.
    Reject(Option<String>),
    /// Dry run: log what would have been refused, answer `DUNNO`.
    Warn,
}

/// What a tier does to a user over its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierPolicy {
    /// The action.
    pub action: ActionKind,
    /// The reply text template (`{user}`, `{limit}`, `{tier}`, `{retry}`, `{retry_at}`),
    /// compiled here so that a refusal only fills it in.
    pub message: Template,
    /// The tier's limits, each with its text for `{limit}` (`100/1h`): formatting a
    /// [`Limit`] allocates, so it is done here once.
    pub limits: Vec<(Limit, String)>,
}

/// `limits` with their texts, for [`TierPolicy::limits`].
pub fn limit_texts(limits: &[Limit]) -> Vec<(Limit, String)> {
    limits.iter().map(|l| (*l, l.to_string())).collect()
}

/// The default reply text.
pub const DEFAULT_MESSAGE: &str =
    "Too much mail from {user}: limit of {limit} reached, try again in {retry}";

/// The compromise signal of a tier: more than `limit.max()` distinct client networks
/// (`[keying] ipv4_prefix` / `ipv6_prefix`) per window for one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworksPolicy {
    /// The threshold and window.
    pub limit: DistinctLimit,
    /// What to do while the user is flagged (default hold; `Warn` only logs).
    pub action: ActionKind,
    /// The text (`{user}`, `{tier}`, `{max}`, `{window}`, `{networks}`, `{limit}`,
    /// `{retry}`, `{retry_at}`).
    pub message: String,
}

/// The default text of `hold` when a user sends from too many networks. Postfix logs
/// it after the stage ("Recipient address", "Data command", "End-of-data"), where its
/// own text would say "triggers HOLD action".
pub const DEFAULT_NETWORKS_MESSAGE: &str =
    "triggers HOLD action: {user} sent from more than {max} networks within {window}";

/// The default text of `defer` and `reject` for too many networks (the client sees it).
pub const DEFAULT_NETWORKS_REFUSAL: &str =
    "{user} sent from more than {max} networks within {window}, try again in {retry}";

/// Where counters live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// In this process.
    Memory {
        /// Most keys tracked.
        max_keys: usize,
    },
    /// In Redis, shared by every server that uses it.
    Redis {
        /// `redis://[:password@]host:port/db`.
        url: String,
        /// Prefix of every key written.
        key_prefix: String,
        /// Connect timeout.
        connect_timeout: Duration,
        /// Per-command timeout.
        command_timeout: Duration,
        /// Use the Redis server's clock (true) or this host's.
        server_time: bool,
    },
}

/// Snapshots of the memory store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotConfig {
    /// The snapshot file.
    pub path: PathBuf,
    /// How often to write it (also written on graceful shutdown).
    pub interval: Duration,
    /// Start with empty counters (and warn) when the snapshot is unreadable, instead
    /// of refusing to start.
    pub start_empty_if_bad: bool,
}

/// The validated configuration, one typed value per section of the file.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from.
    pub source: String,
    /// `[server]`: sockets, clients, timeouts, failure answer, log format.
    pub server: ServerConfig,
    /// `[store]`: where counters live, snapshots, sweeps.
    pub store: StoreConfig,
    /// `[keying]`: what a request is counted under.
    pub keying: KeyingConfig,
    /// `[exempt]`: who is never limited or never watched.
    pub exempt: ExemptConfig,
    /// `[tiers.*]`, `default_tier`, `[assign]`, `assign_file`.
    pub tiers: TiersConfig,
    /// `[networks]` and the tiers' `networks_*` keys: the compromise signal.
    pub networks: NetworksConfig,
    /// Alerts, metrics, admin socket, recording (`[alerts]`, `[metrics]`, `[admin]`, `[record]`).
    pub ops: OpsConfig,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Listening sockets.
    pub listen: Vec<ListenAddr>,
    /// Client networks allowed to connect over TCP.
    pub allow: Vec<IpNet>,
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Close a connection idle this long (also frees a client stalled mid-request).
    pub idle_timeout: Duration,
    /// Longest a decision may take before the failure answer is sent.
    pub decision_timeout: Duration,
    /// Answer when the store fails.
    pub on_store_error: FailMode,
    /// Log as JSON lines instead of text.
    pub log_json: bool,
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Store backend.
    pub backend: Backend,
    /// Snapshots (memory store only).
    pub snapshot: Option<SnapshotConfig>,
    /// How often idle keys are swept from the memory store.
    pub sweep_interval: Duration,
}

/// `[keying]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyingConfig {
    /// What to key on without SASL.
    pub without_sasl: WithoutSasl,
    /// IPv4 prefix length for client networks.
    pub ipv4_prefix: u8,
    /// IPv6 prefix length for client networks.
    pub ipv6_prefix: u8,
}

/// `[exempt]`.
#[derive(Debug, Clone, Default)]
pub struct ExemptConfig {
    /// Users never limited (normalized).
    pub users: AHashSet<String>,
    /// Domains never limited (lowercase).
    pub domains: AHashSet<String>,
    /// Client networks never limited.
    pub clients: Vec<IpNet>,
    /// Users never watched for the networks they send from (normalized).
    pub roaming_users: AHashSet<String>,
}

/// The tiers: limits, who is in which, and what each does to a user over its limits.
#[derive(Debug, Clone)]
pub struct TiersConfig {
    /// Tiers and assignments (inline, from the map file, and `admin tier` overrides).
    pub map: TierMap,
    /// The action and text of each tier, by name.
    pub policies: AHashMap<String, TierPolicy>,
    /// The tier map file, re-read on reload.
    pub assign_file: Option<PathBuf>,
}

/// The compromise signal of each tier that has one.
#[derive(Debug, Clone, Default)]
pub struct NetworksConfig {
    /// By tier name (tiers without one are not watched).
    pub by_tier: AHashMap<String, NetworksPolicy>,
}

// ---------------------------------------------------------------- raw structs

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    keying: RawKeying,
    #[serde(default)]
    exempt: RawExempt,
    #[serde(default)]
    networks: RawNetworks,
    #[serde(default)]
    tiers: BTreeMap<String, Spanned<RawTier>>,
    default_tier: Option<Spanned<String>>,
    #[serde(default)]
    assign: BTreeMap<String, Spanned<String>>,
    assign_file: Option<Spanned<String>>,
    #[serde(default)]
    alerts: self::ops::RawAlerts,
    #[serde(default)]
    metrics: self::ops::RawMetrics,
    #[serde(default)]
    admin: self::ops::RawAdmin,
    #[serde(default)]
    record: self::ops::RawRecord,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Vec<Spanned<String>>>,
    allow: Option<Vec<Spanned<String>>>,
    max_connections: Option<Spanned<usize>>,
    idle_timeout: Option<Spanned<String>>,
    decision_timeout: Option<Spanned<String>>,
    on_store_error: Option<Spanned<String>>,
    log_format: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    backend: Option<Spanned<String>>,
    max_keys: Option<Spanned<usize>>,
    snapshot_path: Option<String>,
    snapshot_interval: Option<Spanned<String>>,
    on_bad_snapshot: Option<Spanned<String>>,
    sweep_interval: Option<Spanned<String>>,
    redis_url: Option<String>,
    redis_key_prefix: Option<String>,
    redis_connect_timeout: Option<Spanned<String>>,
    redis_command_timeout: Option<Spanned<String>>,
    redis_time: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawKeying {
    without_sasl: Option<Spanned<String>>,
    ipv4_prefix: Option<Spanned<u8>>,
    ipv6_prefix: Option<Spanned<u8>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawExempt {
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    domains: Vec<String>,
    #[serde(default)]
    clients: Vec<Spanned<String>>,
    #[serde(default)]
    roaming_users: Vec<String>,
}

/// `[networks]`: the compromise signal's defaults for every tier.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNetworks {
    max: Option<Spanned<u32>>,
    window: Option<Spanned<String>>,
    action: Option<Spanned<String>>,
    message: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    #[serde(default)]
    limits: Vec<Spanned<RawLimit>>,
    action: Option<Spanned<String>>,
    reply_code: Option<Spanned<String>>,
    message: Option<String>,
    max_networks: Option<Spanned<u32>>,
    networks_window: Option<Spanned<String>>,
    networks_action: Option<Spanned<String>>,
    networks_message: Option<String>,
    networks_exempt: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawLimit {
    Text(String),
    Table(RawLimitTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimitTable {
    limit: String,
    unit: Option<String>,
    algorithm: Option<String>,
    burst: Option<u64>,
    precision: Option<u64>,
}

// ---------------------------------------------------------------- loading

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        line: None,
        field: None,
        message: format!("cannot read: {e}"),
    })?;
    parse(&text, &path.display().to_string(), path.parent())
}

/// The built-in default configuration.
pub fn builtin() -> Config {
    // The embedded file is tested (`builtin_default_is_valid`); fall back to a
    // hand-built equivalent rather than panicking if it ever were not.
    parse(DEFAULT_CONFIG, "built-in default", None).unwrap_or_else(|_| minimal())
}

fn minimal() -> Config {
    let tier = Tier::new(
        "default",
        Limit::sliding(100, Duration::from_secs(3600)).ok(),
    )
    .unwrap_or_else(|_| unreachable_tier());
    let mut policies = AHashMap::new();
    policies.insert(
        "default".to_string(),
        TierPolicy {
            action: ActionKind::Defer,
            message: Template::new(DEFAULT_MESSAGE),
            limits: limit_texts(tier.limits()),
        },
    );
    Config {
        source: "built-in default".into(),
        server: ServerConfig {
            listen: vec![ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 10031)))],
            allow: default_allow(),
            max_connections: 1024,
            idle_timeout: Duration::from_secs(600),
            decision_timeout: Duration::from_millis(500),
            on_store_error: FailMode::Open,
            log_json: false,
        },
        store: StoreConfig {
            backend: Backend::Memory {
                max_keys: 1_000_000,
            },
            snapshot: None,
            sweep_interval: Duration::from_secs(60),
        },
        keying: KeyingConfig {
            without_sasl: WithoutSasl::Skip,
            ipv4_prefix: 24,
            ipv6_prefix: 64,
        },
        exempt: ExemptConfig::default(),
        tiers: TiersConfig {
            map: TierMap::new(tier),
            policies,
            assign_file: None,
        },
        networks: NetworksConfig::default(),
        ops: self::ops::OpsConfig::default(),
    }
}

fn unreachable_tier() -> Tier {
    // "default" is a valid name and no limits is a valid tier.
    match Tier::new("default", []) {
        Ok(t) => t,
        Err(_) => unreachable!("an empty tier named default is valid"),
    }
}

fn default_allow() -> Vec<IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text
            .get(..offset.min(self.text.len()))
            .map_or(1, |s| s.bytes().filter(|b| *b == b'\n').count() + 1)
    }
    fn err<T>(
        &self,
        span: Option<std::ops::Range<usize>>,
        field: &str,
        message: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError {
            file: self.file.to_string(),
            line: span.map(|s| self.line_of(s.start)),
            field: Some(field.to_string()),
            message: message.into(),
        })
    }
    fn duration(
        &self,
        v: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => match parse_duration_ms(s.get_ref()) {
                Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
                Ok(_) => self.err(Some(s.span()), field, "must be longer than zero"),
                Err(e) => self.err(Some(s.span()), field, e),
            },
        }
    }
}

/// Parses and validates configuration text. `base` resolves a relative `assign_file`.
pub fn parse(text: &str, file: &str, base: Option<&Path>) -> Result<Config, ConfigError> {
    let cx = Ctx { file, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let (field, message) = split_toml_error(&e);
        ConfigError {
            file: file.to_string(),
            line: e.span().map(|s| cx.line_of(s.start)),
            field,
            message,
        }
    })?;
    let mut cfg = minimal();
    cfg.source = file.to_string();

    // [server]
    let s = &raw.server;
    if let Some(listen) = &s.listen {
        if listen.is_empty() {
            return cx.err(None, "server.listen", "needs at least one address");
        }
        cfg.server.listen = listen
            .iter()
            .map(|l| {
                l.get_ref()
                    .parse()
                    .or_else(|e: String| cx.err(Some(l.span()), "server.listen", e))
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(allow) = &s.allow {
        cfg.server.allow = allow
            .iter()
            .map(|a| parse_net(a.get_ref()).or_else(|e| cx.err(Some(a.span()), "server.allow", e)))
            .collect::<Result<_, _>>()?;
    }
    if let Some(m) = &s.max_connections {
        if *m.get_ref() == 0 {
            return cx.err(
                Some(m.span()),
                "server.max_connections",
                "must be at least 1",
            );
        }
        cfg.server.max_connections = *m.get_ref();
    }
    cfg.server.idle_timeout = cx.duration(
        &s.idle_timeout,
        "server.idle_timeout",
        cfg.server.idle_timeout,
    )?;
    cfg.server.decision_timeout = cx.duration(
        &s.decision_timeout,
        "server.decision_timeout",
        cfg.server.decision_timeout,
    )?;
    if let Some(v) = &s.on_store_error {
        cfg.server.on_store_error = match v.get_ref().as_str() {
            "open" | "dunno" => FailMode::Open,
            "closed" | "defer" => FailMode::Closed,
            other => {
                return cx.err(
                    Some(v.span()),
                    "server.on_store_error",
                    format!("\"{other}\": expected \"open\" (answer DUNNO) or \"closed\" (defer)"),
                );
            }
        };
    }
    if let Some(v) = &s.log_format {
        cfg.server.log_json = match v.get_ref().as_str() {
            "text" => false,
            "json" => true,
            other => {
                return cx.err(
                    Some(v.span()),
                    "server.log_format",
                    format!("\"{other}\": expected \"text\" or \"json\""),
                );
            }
        };
    }

    // [store]
    let st = &raw.store;
    let backend = st
        .backend
        .as_ref()
        .map_or("memory", |b| b.get_ref().as_str());
    cfg.store.backend = match backend {
        "memory" => Backend::Memory {
            max_keys: match &st.max_keys {
                Some(m) if *m.get_ref() == 0 => {
                    return cx.err(Some(m.span()), "store.max_keys", "must be at least 1");
                }
                Some(m) => *m.get_ref(),
                None => 1_000_000,
            },
        },
        "redis" => Backend::Redis {
            url: st
                .redis_url
                .clone()
                .unwrap_or_else(|| "redis://127.0.0.1:6379/".into()),
            key_prefix: st.redis_key_prefix.clone().unwrap_or_else(|| "rl:".into()),
            connect_timeout: cx.duration(
                &st.redis_connect_timeout,
                "store.redis_connect_timeout",
                Duration::from_millis(500),
            )?,
            command_timeout: cx.duration(
                &st.redis_command_timeout,
                "store.redis_command_timeout",
                Duration::from_millis(250),
            )?,
            server_time: match st
                .redis_time
                .as_ref()
                .map(|t| (t.get_ref().as_str(), t.span()))
            {
                None | Some(("server", _)) => true,
                Some(("local", _)) => false,
                Some((other, span)) => {
                    return cx.err(
                        Some(span),
                        "store.redis_time",
                        format!("\"{other}\": expected \"server\" or \"local\""),
                    );
                }
            },
        },
        other => {
            let span = st.backend.as_ref().map(|b| b.span());
            return cx.err(
                span,
                "store.backend",
                format!("\"{other}\": expected \"memory\" or \"redis\""),
            );
        }
    };
    if let Some(path) = &st.snapshot_path {
        let start_empty_if_bad = match st
            .on_bad_snapshot
            .as_ref()
            .map(|v| (v.get_ref().as_str(), v.span()))
        {
            None | Some(("refuse", _)) => false,
            Some(("start-empty", _)) => true,
            Some((other, span)) => {
                return cx.err(
                    Some(span),
                    "store.on_bad_snapshot",
                    format!("\"{other}\": expected \"refuse\" or \"start-empty\""),
                );
            }
        };
        cfg.store.snapshot = Some(SnapshotConfig {
            path: PathBuf::from(path),
            interval: cx.duration(
                &st.snapshot_interval,
                "store.snapshot_interval",
                Duration::from_secs(60),
            )?,
            start_empty_if_bad,
        });
    }
    cfg.store.sweep_interval = cx.duration(
        &st.sweep_interval,
        "store.sweep_interval",
        cfg.store.sweep_interval,
    )?;

    // [alerts], [metrics], [admin], [record]
    cfg.ops = self::ops::build(&raw.alerts, &raw.metrics, &raw.admin, &raw.record, base)
        .or_else(|(span, field, message)| cx.err(span, &field, message))?;

    // [keying]
    let k = &raw.keying;
    if let Some(v) = &k.without_sasl {
        cfg.keying.without_sasl = match v.get_ref().as_str() {
            "skip" => WithoutSasl::Skip,
            "client_address" => WithoutSasl::ClientAddress,
            "client_prefix" => WithoutSasl::ClientPrefix,
            "sender" => WithoutSasl::Sender,
            other => {
                return cx.err(
                    Some(v.span()),
                    "keying.without_sasl",
                    format!("\"{other}\": expected skip, client_address, client_prefix or sender"),
                );
            }
        };
    }
    if let Some(v) = &k.ipv4_prefix {
        if *v.get_ref() > 32 {
            return cx.err(Some(v.span()), "keying.ipv4_prefix", "must be from 0 to 32");
        }
        cfg.keying.ipv4_prefix = *v.get_ref();
    }
    if let Some(v) = &k.ipv6_prefix {
        if *v.get_ref() > 128 {
            return cx.err(
                Some(v.span()),
                "keying.ipv6_prefix",
                "must be from 0 to 128",
            );
        }
        cfg.keying.ipv6_prefix = *v.get_ref();
    }

    // [exempt]
    cfg.exempt.users = raw.exempt.users.iter().map(|u| key::from_text(u)).collect();
    cfg.exempt.domains = raw
        .exempt
        .domains
        .iter()
        .map(|d| key::from_text(d.trim_start_matches('@')))
        .collect();
    cfg.exempt.clients = raw
        .exempt
        .clients
        .iter()
        .map(|a| parse_net(a.get_ref()).or_else(|e| cx.err(Some(a.span()), "exempt.clients", e)))
        .collect::<Result<_, _>>()?;

    cfg.exempt.roaming_users = raw
        .exempt
        .roaming_users
        .iter()
        .map(|u| key::from_text(u))
        .collect();

    // [tiers.*]
    if !raw.tiers.is_empty() {
        let default_name = match &raw.default_tier {
            Some(d) => {
                if !raw.tiers.contains_key(d.get_ref()) {
                    return cx.err(
                        Some(d.span()),
                        "default_tier",
                        format!("tier \"{}\" is not defined under [tiers]", d.get_ref()),
                    );
                }
                d.get_ref().clone()
            }
            None if raw.tiers.contains_key("default") => "default".to_string(),
            None => {
                return cx.err(
                    None,
                    "default_tier",
                    "no tier is called \"default\": name one with default_tier = \"...\"",
                );
            }
        };
        let mut policies = AHashMap::new();
        let mut built = Vec::new();
        for (name, tier) in &raw.tiers {
            let field = format!("tiers.{name}");
            let span = tier.span();
            let tier = tier.get_ref();
            let mut limits = Vec::new();
            for l in &tier.limits {
                limits.push(
                    build_limit(l.get_ref())
                        .or_else(|e| cx.err(Some(l.span()), &format!("{field}.limits"), e))?,
                );
            }
            let t = Tier::new(name.clone(), limits)
                .or_else(|e| cx.err(Some(span.clone()), &field, e.to_string()))?;
            let action = build_action(tier)
                .or_else(|(span, f, e)| cx.err(span, &format!("{field}.{f}"), e))?;
            policies.insert(
                name.clone(),
                TierPolicy {
                    action,
                    message: Template::new(
                        tier.message
                            .clone()
                            .unwrap_or_else(|| DEFAULT_MESSAGE.to_string()),
                    ),
                    limits: limit_texts(t.limits()),
                },
            );
            built.push(t);
        }
        let pos = built
            .iter()
            .position(|t| t.name() == default_name)
            .unwrap_or(0);
        let default = built.remove(pos);
        let mut map = TierMap::new(default);
        for t in built {
            let name = t.name().to_string();
            map.add_tier(t)
                .or_else(|e| cx.err(None, &format!("tiers.{name}"), e.to_string()))?;
        }
        cfg.tiers.map = map;
        cfg.tiers.policies = policies;
    }

    // [networks] and the tiers' networks_* settings
    cfg.networks.by_tier = build_networks(&cx, &raw, &cfg.tiers.map)?;

    // [assign] and assign_file
    for (key, tier) in &raw.assign {
        let key = key::from_text(key);
        cfg.tiers.map.assign(&key, tier.get_ref()).or_else(|e| {
            cx.err(
                Some(tier.span()),
                &format!("assign.\"{key}\""),
                e.to_string(),
            )
        })?;
    }
    if let Some(f) = &raw.assign_file {
        let p = PathBuf::from(f.get_ref());
        let p = match base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p,
        };
        let text = std::fs::read_to_string(&p).or_else(|e| {
            cx.err(
                Some(f.span()),
                "assign_file",
                format!("cannot read {}: {e}", p.display()),
            )
        })?;
        apply_map_file(&mut cfg.tiers.map, &text, &p.display().to_string())?;
        cfg.tiers.assign_file = Some(p);
    }
    Ok(cfg)
}

/// The compromise signal of every tier: the tier's `max_networks`, `networks_window`,
/// `networks_action` and `networks_message`, else `[networks]` `max`, `window`,
/// `action` and `message`; none for a tier with `networks_exempt = true` or with no
/// threshold anywhere.
fn build_networks(
    cx: &Ctx<'_>,
    raw: &RawConfig,
    tiers: &TierMap,
) -> Result<AHashMap<String, NetworksPolicy>, ConfigError> {
    let d = &raw.networks;
    if let Some(m) = &d.max {
        check_networks_max(cx, m, "networks.max")?;
    }
    let default_window = cx.duration(&d.window, "networks.window", Duration::from_secs(3600))?;
    let default_action = match &d.action {
        Some(a) => networks_action(cx, a, "networks.action")?,
        None => ActionKind::Hold,
    };
    if d.max.is_none() && (d.window.is_some() || d.action.is_some() || d.message.is_some()) {
        return cx.err(
            None,
            "networks",
            "window, action and message need a threshold: set max (or max_networks in a tier)",
        );
    }
    let mut out = AHashMap::new();
    for tier in tiers.tiers() {
        let name = tier.name();
        let t = raw.tiers.get(name).map(|t| t.get_ref());
        let field = |f: &str| format!("tiers.{name}.{f}");
        let exempt = t.and_then(|t| t.networks_exempt.as_ref());
        let max = t.and_then(|t| t.max_networks.as_ref());
        if let Some(m) = max {
            check_networks_max(cx, m, &field("max_networks"))?;
        }
        if let Some(e) = exempt
            && *e.get_ref()
        {
            if max.is_some() {
                return cx.err(
                    Some(e.span()),
                    &field("networks_exempt"),
                    "networks_exempt = true and max_networks contradict each other",
                );
            }
            continue;
        }
        let Some(max) = max
            .map(|m| *m.get_ref())
            .or(d.max.as_ref().map(|m| *m.get_ref()))
        else {
            if let Some(t) = t
                && (t.networks_window.is_some()
                    || t.networks_action.is_some()
                    || t.networks_message.is_some())
            {
                return cx.err(
                    None,
                    &field("max_networks"),
                    "networks_window, networks_action and networks_message need a threshold: set max_networks here or max in [networks]",
                );
            }
            continue;
        };
        let window = match t {
            Some(t) => cx.duration(
                &t.networks_window,
                &field("networks_window"),
                default_window,
            )?,
            None => default_window,
        };
        let limit = match DistinctLimit::new(max, window) {
            Ok(l) => l,
            Err(e) => {
                let span = t
                    .and_then(|t| t.networks_window.as_ref())
                    .or(d.window.as_ref())
                    .map(|w| w.span());
                return cx.err(span, &field("networks_window"), e.to_string());
            }
        };
        let action = match t.and_then(|t| t.networks_action.as_ref()) {
            Some(a) => networks_action(cx, a, &field("networks_action"))?,
            None => default_action.clone(),
        };
        let message = t
            .and_then(|t| t.networks_message.clone())
            .or_else(|| d.message.clone())
            .unwrap_or_else(|| {
                match action {
                    ActionKind::Hold | ActionKind::Warn => DEFAULT_NETWORKS_MESSAGE,
                    _ => DEFAULT_NETWORKS_REFUSAL,
                }
                .to_string()
            });
        out.insert(
            name.to_string(),
            NetworksPolicy {
                limit,
                action,
                message,
            },
        );
    }
    Ok(out)
}

fn check_networks_max(cx: &Ctx<'_>, m: &Spanned<u32>, field: &str) -> Result<(), ConfigError> {
    let v = *m.get_ref();
    if v == 0 || v > DistinctLimit::MAX_THRESHOLD {
        return cx.err(
            Some(m.span()),
            field,
            format!(
                "{v}: must be from 1 to {} (the number of networks a user may send from per window)",
                DistinctLimit::MAX_THRESHOLD
            ),
        );
    }
    Ok(())
}

fn networks_action(
    cx: &Ctx<'_>,
    a: &Spanned<String>,
    field: &str,
) -> Result<ActionKind, ConfigError> {
    match a.get_ref().as_str() {
        "hold" => Ok(ActionKind::Hold),
        "defer" => Ok(ActionKind::Defer),
        "reject" => Ok(ActionKind::Reject(None)),
        "warn" | "dry-run" => Ok(ActionKind::Warn),
        other => cx.err(
            Some(a.span()),
            field,
            format!("\"{other}\": expected hold, defer, reject or warn"),
        ),
    }
}

fn split_toml_error(e: &toml::de::Error) -> (Option<String>, String) {
    let msg = e.message().trim().to_string();
    (None, msg)
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| format!("\"{s}\" is not an IP address or CIDR network"))
}

fn build_limit(raw: &RawLimit) -> Result<Limit, String> {
    match raw {
        RawLimit::Text(t) => t.parse::<Limit>().map_err(|e| e.to_string()),
        RawLimit::Table(t) => {
            let base: Limit = t
                .limit
                .parse()
                .map_err(|e: ratelimit_core::LimitError| e.to_string())?;
            let mut l = match t.algorithm.as_deref() {
                None | Some("window") | Some("sliding") => {
                    if t.burst.is_some() {
                        return Err("burst applies only to algorithm = \"bucket\"".into());
                    }
                    match t.precision {
                        Some(p) => base.with_precision(p).map_err(|e| e.to_string())?,
                        None => base,
                    }
                }
                Some("bucket") => {
                    if t.precision.is_some() {
                        return Err("precision applies only to sliding windows".into());
                    }
                    Limit::token_bucket(
                        base.count(),
                        base.window(),
                        t.burst.unwrap_or(base.count()),
                    )
                    .map_err(|e| e.to_string())?
                }
                Some(other) => {
                    return Err(format!(
                        "algorithm \"{other}\": expected \"window\" or \"bucket\""
                    ));
                }
            };
            if let Some(u) = &t.unit {
                l = l.with_unit(u.parse::<Unit>()?);
            }
            Ok(l)
        }
    }
}

type ActionErr = (Option<std::ops::Range<usize>>, &'static str, String);

fn build_action(t: &RawTier) -> Result<ActionKind, ActionErr> {
    let code = match &t.reply_code {
        None => None,
        Some(c) => Some((
            check_code(c.get_ref()).map_err(|e| (Some(c.span()), "reply_code", e))?,
            c.span(),
        )),
    };
    let action = t.action.as_ref().map_or("defer", |a| a.get_ref().as_str());
    let aspan = t.action.as_ref().map(|a| a.span());
    Ok(match (action, code) {
        ("defer", None) => ActionKind::Defer,
        ("defer", Some((c, span))) => {
            if !c.starts_with('4') {
                return Err((
                    Some(span),
                    "reply_code",
                    format!("\"{c}\": action \"defer\" needs a 4xx code"),
                ));
            }
            ActionKind::Code(c)
        }
        ("reject", c) => match c {
            Some((c, span)) if !c.starts_with('5') => {
                return Err((
                    Some(span),
                    "reply_code",
                    format!("\"{c}\": action \"reject\" needs a 5xx code"),
                ));
            }
            c => ActionKind::Reject(c.map(|(c, _)| c)),
        },
        ("hold", None) => ActionKind::Hold,
        ("warn", None) | ("dry-run", None) => ActionKind::Warn,
        ("hold" | "warn" | "dry-run", Some((_, span))) => {
            return Err((
                Some(span),
                "reply_code",
                "reply_code applies only to defer and reject".into(),
            ));
        }
        (other, _) => {
            return Err((
                aspan,
                "action",
                format!("\"{other}\": expected defer, hold, reject or warn"),
            ));
        }
    })
}

/// Checks an SMTP reply code with an optional enhanced status: `451` or `451 4.7.1`.
fn check_code(s: &str) -> Result<String, String> {
    let mut parts = s.split_whitespace();
    let code = parts.next().unwrap_or("");
    let valid_code = code.len() == 3
        && code.bytes().all(|b| b.is_ascii_digit())
        && matches!(code.as_bytes()[0], b'4' | b'5');
    let enhanced = parts.next();
    let valid_enh = enhanced.is_none_or(|e| {
        let f: Vec<&str> = e.split('.').collect();
        f.len() == 3
            && f.iter()
                .all(|x| !x.is_empty() && x.len() <= 3 && x.bytes().all(|b| b.is_ascii_digit()))
            && f[0].as_bytes().first() == code.as_bytes().first()
    });
    if !valid_code || !valid_enh || parts.next().is_some() {
        return Err(format!(
            "\"{s}\": expected a 4xx or 5xx code, optionally with a matching enhanced status (e.g. \"451 4.7.1\")"
        ));
    }
    Ok(s.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Applies a tier map file: one `user tier` or `@domain tier` per line; `#` starts a
/// comment; blank lines are ignored. Errors name the file and line.
pub fn apply_map_file(map: &mut TierMap, text: &str, file: &str) -> Result<usize, ConfigError> {
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |message: String| ConfigError {
            file: file.to_string(),
            line: Some(i + 1),
            field: None,
            message,
        };
        let mut words = line.split_whitespace();
        let (Some(key), Some(tier), None) = (words.next(), words.next(), words.next()) else {
            return Err(err(format!(
                "expected \"user tier\" or \"@domain tier\", found \"{line}\""
            )));
        };
        map.assign(&key::from_text(key), tier)
            .map_err(|e| err(e.to_string()))?;
        n += 1;
    }
    Ok(n)
}

/// A URL with any password replaced by `***` (for logs and `check-config`).
///
/// The same redaction as the Redis store's own (`RedisStoreConfig::redacted_url`): the
/// user info ends at the *last* `@` of the authority, as URL parsers read it, so a
/// password containing `@` is hidden whole, and `pass=` query parameters
/// (`redis+unix:///path?pass=...`) are hidden too.
pub fn redact_url(url: &str) -> String {
    ratelimit_core::store::RedisStoreConfig::new(url).redacted_url()
}

/// A human summary of what a configuration sets up (no secrets).
pub fn describe(cfg: &Config) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    let _ = writeln!(
        s,
        "listen: {}",
        list(
            &cfg.server
                .listen
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
        )
    );
    let _ = writeln!(
        s,
        "allow: {}",
        list(
            &cfg.server
                .allow
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
        )
    );
    let _ = writeln!(
        s,
        "max_connections: {}, idle_timeout: {:?}, decision_timeout: {:?}, on_store_error: {:?}",
        cfg.server.max_connections,
        cfg.server.idle_timeout,
        cfg.server.decision_timeout,
        cfg.server.on_store_error
    );
    match &cfg.store.backend {
        Backend::Memory { max_keys } => {
            let _ = writeln!(s, "store: memory, max_keys {max_keys}");
        }
        Backend::Redis {
            url,
            key_prefix,
            server_time,
            ..
        } => {
            let _ = writeln!(
                s,
                "store: redis {} (prefix \"{key_prefix}\", {} time)",
                redact_url(url),
                if *server_time { "server" } else { "local" }
            );
        }
    }
    if let Some(snap) = &cfg.store.snapshot {
        let _ = writeln!(
            s,
            "snapshot: {} every {:?}{}",
            snap.path.display(),
            snap.interval,
            if snap.start_empty_if_bad {
                " (start empty if unreadable)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(s, "without sasl: {:?}", cfg.keying.without_sasl);
    let mut tiers: Vec<_> = cfg.tiers.map.tiers().collect();
    tiers.sort_by(|a, b| a.name().cmp(b.name()));
    for t in tiers {
        let limits: Vec<String> = t.limits().iter().map(|l| l.to_string()).collect();
        let action = cfg
            .tiers
            .policies
            .get(t.name())
            .map(|p| format!("{:?}", p.action))
            .unwrap_or_else(|| "Defer".into());
        let default = if t.name() == cfg.tiers.map.default_tier().name() {
            " (default)"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "tier {}{default}: {} -> {action}",
            t.name(),
            if limits.is_empty() {
                "unlimited".to_string()
            } else {
                limits.join(", ")
            }
        );
    }
    let mut watched: Vec<_> = cfg.networks.by_tier.iter().collect();
    watched.sort_by(|a, b| a.0.cmp(b.0));
    for (tier, n) in watched {
        let _ = writeln!(s, "tier {tier}: networks {} -> {:?}", n.limit, n.action);
    }
    let mut assigned: Vec<_> = cfg.tiers.map.assignments().collect();
    assigned.sort();
    let _ = writeln!(s, "assignments: {}", assigned.len());
    let _ = writeln!(
        s,
        "exempt: {} users, {} domains, {} client networks",
        cfg.exempt.users.len(),
        cfg.exempt.domains.len(),
        cfg.exempt.clients.len()
    );
    if !cfg.exempt.roaming_users.is_empty() {
        let _ = writeln!(s, "roaming users: {}", cfg.exempt.roaming_users.len());
    }
    s.push_str(&self::ops::describe(&cfg.ops));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_passwords_are_redacted_whole() {
        for (url, want) in [
            ("redis://:s3cret@h:6379/", "redis://:***@h:6379/"),
            ("redis://admin:p@ss@h:6379/0", "redis://admin:***@h:6379/0"),
            (
                "redis+unix:///r.sock?db=1&pass=pw",
                "redis+unix:///r.sock?db=1&pass=***",
            ),
            ("redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/"),
        ] {
            assert_eq!(redact_url(url), want);
        }
    }

    #[test]
    fn builtin_default_is_valid() {
        let c = parse(DEFAULT_CONFIG, "default", None).unwrap();
        assert_eq!(
            c.server.listen,
            [ListenAddr::Tcp("127.0.0.1:10031".parse().unwrap())]
        );
        assert_eq!(
            c.tiers.map.default_tier().limits(),
            &["100/1h".parse().unwrap()]
        );
        assert_eq!(
            c.store.backend,
            Backend::Memory {
                max_keys: 1_000_000
            }
        );
        assert_eq!(c.keying.without_sasl, WithoutSasl::Skip);
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
        let c = load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.tiers.map.get("bulk").is_some());
    }

    fn err(text: &str) -> String {
        parse(text, "test.toml", None).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let cases = [
            (
                "[server]\nlisten = [\"nowhere\"]\n",
                "test.toml:2: server.listen: \"nowhere\" is neither",
            ),
            (
                "[server]\nbogus = 1\n",
                "test.toml:2: unknown field `bogus`",
            ),
            (
                "[tiers.default]\nlimits = [\"100/0h\"]\n",
                "test.toml:2: tiers.default.limits: invalid limit \"100/0h\"",
            ),
            (
                "[tiers.default]\nlimits = [\"10/1h\"]\naction = \"explode\"\n",
                "test.toml:3: tiers.default.action: \"explode\"",
            ),
            (
                "[tiers.default]\nreply_code = \"550\"\n",
                "test.toml:2: tiers.default.reply_code: \"550\": action \"defer\" needs a 4xx code",
            ),
            (
                "[tiers.gold]\nlimits = []\n",
                "test.toml: default_tier: no tier is called \"default\"",
            ),
            (
                "[tiers.default]\n[assign]\n\"a@b\" = \"gold\"\n",
                "test.toml:3: assign.\"a@b\": \"a@b\" is assigned to tier \"gold\"",
            ),
            (
                "[server]\nidle_timeout = \"soon\"\n",
                "test.toml:2: server.idle_timeout: \"soon\" is not a duration",
            ),
            (
                "[exempt]\nclients = [\"10.0.0.0/33\"]\n",
                "test.toml:2: exempt.clients: \"10.0.0.0/33\" is not",
            ),
            (
                "[store]\nbackend = \"sql\"\n",
                "test.toml:2: store.backend: \"sql\"",
            ),
            (
                "[tiers.default]\nlimits = [{ limit = \"10/1h\", unit = \"parsecs\" }]\n",
                "test.toml:2: tiers.default.limits: unknown unit",
            ),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(
                got.starts_with(want),
                "for\n{text}\n got: {got}\nwant: {want}"
            );
        }
    }

    #[test]
    fn limits_as_strings_and_tables() {
        let c = parse(
            r#"
[tiers.default]
limits = [
  "100/1h",
  { limit = "1000/1d", unit = "recipients" },
  { limit = "50/10m", algorithm = "bucket", burst = 10 },
  { limit = "10/1h", precision = 3600, unit = "bytes" },
]
action = "defer"
reply_code = "452 4.7.1"
message = "slow down"
"#,
            "t",
            None,
        )
        .unwrap();
        let l = c.tiers.map.default_tier().limits();
        assert_eq!(l.len(), 4);
        assert_eq!(l[1].unit(), Unit::Recipients);
        assert_eq!(
            l[2].algorithm(),
            ratelimit_core::Algorithm::TokenBucket { burst: 10 }
        );
        assert_eq!(
            l[3].algorithm(),
            ratelimit_core::Algorithm::SlidingWindow { precision: 3600 }
        );
        let p = &c.tiers.policies["default"];
        assert_eq!(p.action, ActionKind::Code("452 4.7.1".into()));
        assert_eq!(p.message, "slow down");
    }

    #[test]
    fn map_file_lines_and_errors() {
        let mut c = parse(
            "[tiers.default]\n[tiers.bulk]\nlimits=[\"1000/1h\"]\n",
            "t",
            None,
        )
        .unwrap();
        let n = apply_map_file(
            &mut c.tiers.map,
            "# comment\n\nAlice@Example.com bulk\n@lists.example bulk # trailing\n",
            "map",
        )
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(c.tiers.map.tier_of("alice@example.com").name(), "bulk");
        assert_eq!(c.tiers.map.tier_of("x@lists.example").name(), "bulk");
        let e = apply_map_file(&mut c.tiers.map, "a bulk\nb gold\n", "map").unwrap_err();
        assert_eq!(
            e.to_string(),
            "map:2: \"b\" is assigned to tier \"gold\", which is not defined"
        );
        let e = apply_map_file(&mut c.tiers.map, "just-one-word\n", "map").unwrap_err();
        assert!(e.to_string().starts_with("map:1: expected"), "{e}");
    }

    #[test]
    fn codes_are_validated() {
        assert_eq!(check_code("451 4.7.1"), Ok("451 4.7.1".into()));
        assert_eq!(check_code("421"), Ok("421".into()));
        for bad in [
            "45",
            "351",
            "451 5.7.1",
            "451 4.7",
            "abc",
            "451 4.7.1 extra",
        ] {
            assert!(check_code(bad).is_err(), "{bad}");
        }
    }
}
