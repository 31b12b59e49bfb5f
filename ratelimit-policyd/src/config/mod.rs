//! Configuration: TOML parsed into raw structs (`raw`), then validated once, section
//! by section, into typed values.
//!
//! Unknown fields are rejected. Every error names the file, the line and the field
//! (`file:line: field: message`). The full reference is `config/example.toml`.
//!
//! - `raw`: the serde structs, one per section, as written.
//! - [`defaults`]: every default, in one table.
//! - `server`, `store`, `keying` (with `[exempt]`), `tiers`, `networks`, [`ops`]:
//!   one builder per section, `raw -> typed`; every error is a [`ConfigError`] made by
//!   one helper (`Ctx`), which turns a byte span into `file:line: field: message`.
//! - `describe`: the `check-config` summary.
//!
//! User names and domains are normalized by [`crate::key::from_text`], as requests and
//! admin commands are.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ahash::{AHashMap, AHashSet};
use ipnet::IpNet;
use ratelimit_core::distinct::DistinctLimit;
use ratelimit_core::quota::parse_duration_ms;
use ratelimit_core::{Limit, Tier, TierMap};
use toml::Spanned;

use crate::template::Template;

mod baseline;
pub mod defaults;
mod describe;
mod keying;
mod networks;
pub mod ops;
mod raw;
mod server;
mod store;
mod tiers;

pub use self::defaults::{
    MESSAGE as DEFAULT_MESSAGE, NETWORKS_MESSAGE as DEFAULT_NETWORKS_MESSAGE,
    NETWORKS_REFUSAL as DEFAULT_NETWORKS_REFUSAL,
};
pub use self::describe::{describe, redact_url};
pub use self::ops::OpsConfig;
pub use self::store::RedisTls;
pub use self::tiers::{MAX_TIER_NAME, apply_map_file, check_tier_name};

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
    /// Decide with this server's own in-process counters
    /// ([`ServerConfig::local_tiers`]) while the shared store fails.
    Local,
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

/// The compromise signal of a tier: more than `limit.max()` distinct client networks
/// (`[keying] ipv4_prefix` / `ipv6_prefix`) per window for one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworksPolicy {
    /// The threshold and window.
    pub limit: DistinctLimit,
    /// What to do while the user is flagged (default hold; `Warn` only logs).
    pub action: ActionKind,
    /// The text (`{user}`, `{tier}`, `{max}`, `{window}`, `{networks}`, `{limit}`,
    /// `{retry}`, `{retry_at}`), compiled so that a refusal only fills it in.
    pub message: Template,
}

/// The baseline signal of a tier: flag a user whose hour is far above their usual
/// busiest hour ([`ratelimit_core::baseline`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaselinePolicy {
    /// Learning time, factor (the tier's `baseline_factor` or `[baseline] factor`),
    /// minimum and half-life.
    pub cfg: ratelimit_core::baseline::BaselineConfig,
    /// What to do while the user is flagged (default hold; `Warn` only logs).
    pub action: ActionKind,
    /// The text (`{user}`, `{tier}`, `{limit}`, `{retry}`, `{retry_at}`).
    pub message: Template,
}

/// The baseline signal of each tier that has one (none without `[baseline]`).
#[derive(Debug, Clone, Default)]
pub struct BaselineSignal {
    /// By tier name (tiers without one are not judged).
    pub by_tier: AHashMap<String, BaselinePolicy>,
    /// `[baseline] half_life` in days (0 when the signal is off).
    pub half_life_days: u32,
}

impl BaselineSignal {
    /// Whether any tier is judged.
    pub fn is_on(&self) -> bool {
        !self.by_tier.is_empty()
    }

    /// The configuration maintenance rolls states with (any tier's: they differ only
    /// in the factor), when the signal is on.
    pub fn any(&self) -> Option<ratelimit_core::baseline::BaselineConfig> {
        self.by_tier.values().next().map(|p| p.cfg)
    }
}

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
        /// `redis://[:password@]host:port/db` or `rediss://...`; empty with
        /// `cluster_nodes`.
        url: String,
        /// `redis_cluster_nodes`: the seed nodes of a Redis Cluster; empty for one
        /// server at `url`.
        cluster_nodes: Vec<String>,
        /// `redis_ca_file`, `redis_client_cert_file`, `redis_client_key_file`, read.
        tls: RedisTls,
        /// The password, read from `redis_password_file` (sent instead of one in the URL).
        password: Option<ops::Secret>,
        /// Prefix of every key written.
        key_prefix: String,
        /// Connect timeout.
        connect_timeout: Duration,
        /// Per-command timeout.
        command_timeout: Duration,
        /// Use the Redis server's clock (true) or this host's.
        server_time: bool,
        /// `redis_batch`: send concurrent decisions as one pipelined batch.
        batch: bool,
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
    /// `[baseline]` and the tiers' `baseline_*` keys: each user against their past.
    pub baseline: BaselineSignal,
    /// Alerts, metrics, admin socket, recording (`[alerts]`, `[metrics]`, `[admin]`, `[record]`).
    pub ops: OpsConfig,
}

/// `server.log_target`: where log lines go. Read at start only (a reload keeps the
/// target the server started with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// journald when the server's stderr is the journal (`$JOURNAL_STREAM` names it,
    /// as systemd sets it), stderr otherwise.
    Auto,
    /// Text or JSON lines on stderr.
    Stderr,
    /// journald's native protocol: a priority per level and `SYSLOG_IDENTIFIER`.
    Journald,
    /// A syslog datagram socket ([`ServerConfig::syslog_socket`]), facility `mail`,
    /// so that incidents land in `mail.log` beside Postfix's lines.
    Syslog,
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
    /// Most calls to a store that waits on the network (Redis) in flight at once;
    /// a request beyond it gets the `on_store_error` answer at once.
    pub max_store_calls_in_flight: usize,
    /// With `on_store_error = "local"`: the share of each limit a server enforces
    /// on its own (`0 < f <= 1`; several servers share the load).
    pub local_fraction: f64,
    /// The tiers with `local_fraction` applied, by name: built once when the file
    /// is loaded (empty unless `on_store_error = "local"`).
    pub local_tiers: AHashMap<String, Arc<Tier>>,
    /// Log as JSON lines instead of text.
    pub log_json: bool,
    /// Where log lines go: stderr, journald or syslog (facility mail).
    pub log_target: LogTarget,
    /// The syslog socket for `log_target = "syslog"` (`/dev/log`).
    pub syslog_socket: PathBuf,
    /// Permission bits of Unix listening sockets (connecting needs write permission).
    pub socket_mode: u32,
    /// Group of Unix listening sockets (Postfix's, so that smtpd may connect).
    pub socket_group: Option<SocketGroup>,
    /// Peer uids allowed on Unix sockets (checked with `SO_PEERCRED`); `None`: every
    /// peer that can open the socket.
    pub allow_uids: Option<Vec<u32>>,
}

/// `[server] socket_group`, resolved when the configuration is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketGroup {
    /// As written (a name, or a number).
    pub name: String,
    /// Its id.
    pub gid: u32,
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
    /// `max_keys`: the memory store's cap, and with Redis, the cap of the local
    /// fallback's stores (`on_store_error = "local"`).
    pub local_max_keys: usize,
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
    /// Users never judged against their baseline (normalized).
    pub baseline_users: AHashSet<String>,
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

/// Every section at its defaults ([`defaults`]).
fn minimal() -> Config {
    Config {
        source: "built-in default".into(),
        server: ServerConfig::default(),
        store: StoreConfig::default(),
        keying: KeyingConfig::default(),
        exempt: ExemptConfig::default(),
        tiers: TiersConfig::default(),
        networks: NetworksConfig::default(),
        baseline: BaselineSignal::default(),
        ops: OpsConfig::default(),
    }
}

/// Parses and validates configuration text. `base` resolves relative paths
/// (`assign_file`, the admin socket, ...): the configuration file's directory.
pub fn parse(text: &str, file: &str, base: Option<&Path>) -> Result<Config, ConfigError> {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    let cx = Ctx {
        file,
        text,
        base,
        credentials: credentials.as_deref(),
    };
    let raw: raw::RawConfig = toml::from_str(text).map_err(|e| ConfigError {
        file: file.to_string(),
        line: e.span().map(|s| cx.line_of(s.start)),
        field: None,
        message: e.message().trim().to_string(),
    })?;
    // Section by section, in this order: the first error found is the one reported.
    let server = server::build(&cx, &raw.server)?;
    let store = store::build(&cx, &raw.store)?;
    let ops = ops::build(&cx, &raw.alerts, &raw.metrics, &raw.admin, &raw.record)?;
    let keying = keying::build(&cx, &raw.keying)?;
    let exempt = keying::build_exempt(&cx, &raw.exempt)?;
    let mut tiers = tiers::build(&cx, &raw.tiers, raw.default_tier.as_ref())?;
    let networks = networks::build(&cx, &raw.networks, &raw.tiers, &tiers.map)?;
    let baseline = baseline::build(&cx, raw.baseline.as_ref(), &raw.tiers, &tiers.map)?;
    tiers::assign(&cx, &raw.assign, raw.assign_file.as_ref(), &mut tiers)?;
    let mut server = server;
    server.local_tiers = server::local_tiers(&cx, &server, &tiers.map)?;
    Ok(Config {
        source: file.to_string(),
        server,
        store,
        keying,
        exempt,
        tiers,
        networks,
        baseline,
        ops,
    })
}

/// What every section builder needs: the file's name and text (to turn a byte span
/// into `file:line: field: message`), its directory (to resolve relative paths), and
/// systemd's credentials directory (`$CREDENTIALS_DIRECTORY`), if set.
struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
    base: Option<&'a Path>,
    credentials: Option<&'a Path>,
}

impl Ctx<'_> {
    /// The 1-based line of a byte offset.
    fn line_of(&self, offset: usize) -> usize {
        self.text
            .get(..offset.min(self.text.len()))
            .map_or(1, |s| s.bytes().filter(|b| *b == b'\n').count() + 1)
    }

    /// An error at `span` (its line; no line when `None`) in `field`.
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

    /// A duration longer than zero (`500ms`, `1h`), or `default` when not set.
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

    /// One of a closed set of words, or `default` when not set. Anything else is
    /// `"word": expected` (`expected` says what is).
    fn keyword<T: Clone>(
        &self,
        v: &Option<Spanned<String>>,
        field: &str,
        default: T,
        words: &[(&str, T)],
        expected: &str,
    ) -> Result<T, ConfigError> {
        let Some(v) = v else {
            return Ok(default);
        };
        let word = v.get_ref().as_str();
        match words.iter().find(|(w, _)| *w == word) {
            Some((_, t)) => Ok(t.clone()),
            None => self.err(Some(v.span()), field, format!("\"{word}\": {expected}")),
        }
    }

    /// IP addresses or CIDR networks (host bits cleared).
    fn nets(&self, v: &[Spanned<String>], field: &str) -> Result<Vec<IpNet>, ConfigError> {
        v.iter()
            .map(|a| {
                let s = a.get_ref();
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map(|n| n.trunc())
                    .or_else(|_| {
                        self.err(
                            Some(a.span()),
                            field,
                            format!("\"{s}\" is not an IP address or CIDR network"),
                        )
                    })
            })
            .collect()
    }

    /// A secret read from the file named by `v` (`*_password_file`, `*_token_file`):
    /// a name without a slash is a systemd credential when `$CREDENTIALS_DIRECTORY`
    /// is set, else the path is relative to the configuration's directory. One
    /// trailing line end is removed; an empty or non-UTF-8 file is an error.
    fn secret_file(&self, v: &Spanned<String>, field: &str) -> Result<String, ConfigError> {
        let name = v.get_ref();
        if name.trim().is_empty() {
            return self.err(Some(v.span()), field, "must not be empty");
        }
        let path = match self.credentials {
            Some(dir) if !name.contains('/') => dir.join(name),
            _ => self.resolve(name),
        };
        let bytes = std::fs::read(&path).or_else(|e| {
            self.err(
                Some(v.span()),
                field,
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let Ok(text) = String::from_utf8(bytes) else {
            return self.err(
                Some(v.span()),
                field,
                format!("{} is not UTF-8", path.display()),
            );
        };
        let secret = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(&text);
        if secret.is_empty() {
            return self.err(
                Some(v.span()),
                field,
                format!("{} is empty", path.display()),
            );
        }
        Ok(secret.to_string())
    }

    /// A path from the file, relative to its directory.
    fn resolve(&self, path: &str) -> PathBuf {
        let p = PathBuf::from(path);
        match self.base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_equals_the_builtin_file_and_an_empty_file() {
        let want = describe(&minimal());
        assert_eq!(describe(&builtin()), want);
        assert_eq!(describe(&parse("", "empty.toml", None).unwrap()), want);
    }
}
