//! Every default of the configuration, in one table: what a key left out of the file
//! means. The section builders and the hand-built fallback configuration read these;
//! code outside `config` that needs one of these values (the memory store's
//! [`MAX_KEYS`], for one) takes it from here as well.
//!
//! The built-in configuration file ([`super::DEFAULT_CONFIG`]) spells out a few of
//! them; parsed, it gives the same configuration as an empty file.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use super::{ActionKind, FailMode, LogTarget, WithoutSasl};

// ---------------------------------------------------------------- [server]

/// `server.listen`: one TCP socket on the loopback address.
pub const LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10031));
/// `server.allow`: clients on this host only.
pub const ALLOW: [&str; 2] = ["127.0.0.0/8", "::1/128"];
/// `server.max_connections`.
pub const MAX_CONNECTIONS: usize = 1024;
/// `server.idle_timeout`.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// `server.decision_timeout`.
pub const DECISION_TIMEOUT: Duration = Duration::from_millis(500);
/// `server.on_store_error`: a broken limiter never stops mail.
pub const ON_STORE_ERROR: FailMode = FailMode::Open;
/// `server.max_store_calls_in_flight`: Redis calls in flight at once.
pub const MAX_STORE_CALLS_IN_FLIGHT: usize = 64;
/// `server.local_fraction`: with `on_store_error = "local"`, the whole limit.
pub const LOCAL_FRACTION: f64 = 1.0;
/// `server.log_format = "json"`: off (text logs).
pub const LOG_JSON: bool = false;
/// `server.log_target`: journald under systemd, stderr elsewhere.
pub const LOG_TARGET: LogTarget = LogTarget::Auto;
/// `server.syslog_socket`: the local syslog daemon's socket.
pub const SYSLOG_SOCKET: &str = "/dev/log";
/// `server.socket_mode`: owner and group may connect to a Unix socket, no one else.
pub const SOCKET_MODE: u32 = 0o660;

// ---------------------------------------------------------------- [store]

/// `store.backend`.
pub const BACKEND: &str = "memory";
/// `store.max_keys`: the most keys the memory store tracks.
pub const MAX_KEYS: usize = 1_000_000;
/// `store.sweep_interval`.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// `store.snapshot_interval` (when `snapshot_path` is set).
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(60);
/// `store.on_bad_snapshot = "start-empty"`: off (`"refuse"`).
pub const START_EMPTY_IF_BAD: bool = false;
/// `store.redis_url`.
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/";
/// `store.redis_key_prefix`.
pub const REDIS_KEY_PREFIX: &str = "rl:";
/// `store.redis_connect_timeout`. With [`REDIS_COMMAND_TIMEOUT`], short enough
/// that a call's worst case (a connect and three commands: 450 ms) fits within
/// [`DECISION_TIMEOUT`], so a single Redis is called from the connection's own
/// thread, without the hop to the blocking pool.
pub const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_millis(150);
/// `store.redis_command_timeout`: Redis answers in well under a millisecond on
/// a LAN; a command still unanswered after this is a Redis in trouble.
pub const REDIS_COMMAND_TIMEOUT: Duration = Duration::from_millis(100);
/// `store.redis_time = "server"`: the Redis server's clock.
pub const REDIS_SERVER_TIME: bool = true;

// ---------------------------------------------------------------- [keying]

/// `keying.without_sasl`.
pub const WITHOUT_SASL: WithoutSasl = WithoutSasl::Skip;
/// `keying.ipv4_prefix`.
pub const IPV4_PREFIX: u8 = 24;
/// `keying.ipv6_prefix`.
pub const IPV6_PREFIX: u8 = 64;

// ---------------------------------------------------------------- tiers

/// `default_tier`, and the one tier of a file without `[tiers]`.
pub const TIER: &str = "default";
/// The limit of that tier: this many messages...
pub const TIER_LIMIT_COUNT: u64 = 100;
/// ...per this sliding window.
pub const TIER_LIMIT_WINDOW: Duration = Duration::from_secs(3600);
/// `tiers.*.action`.
pub const TIER_ACTION: ActionKind = ActionKind::Defer;
/// `tiers.*.message`: the reply text of a user over a tier's limits.
pub const MESSAGE: &str =
    "Too much mail from {user}: limit of {limit} reached, try again in {retry}";

// ---------------------------------------------------------------- [networks]

/// `networks.window` / `tiers.*.networks_window`.
pub const NETWORKS_WINDOW: Duration = Duration::from_secs(3600);
/// `networks.action` / `tiers.*.networks_action`.
pub const NETWORKS_ACTION: ActionKind = ActionKind::Hold;
/// The text of `hold` (and `warn`) when a user sends from too many networks. Postfix
/// logs it after the stage ("Recipient address", "Data command", "End-of-data"),
/// where its own text would say "triggers HOLD action".
pub const NETWORKS_MESSAGE: &str =
    "triggers HOLD action: {user} sent from more than {max} networks within {window}";
/// The text of `defer` and `reject` for too many networks (the client sees it).
pub const NETWORKS_REFUSAL: &str =
    "{user} sent from more than {max} networks within {window}, try again in {retry}";

// ---------------------------------------------------------------- [baseline]

/// `baseline.learn`: history needed before a user is judged.
pub const BASELINE_LEARN: Duration = Duration::from_secs(7 * 86_400);
/// `baseline.factor`.
pub const BASELINE_FACTOR: f64 = 5.0;
/// `baseline.min`: never flag at this many messages in the hour or fewer.
pub const BASELINE_MIN: u32 = 10;
/// `baseline.half_life`: how fast the usual busiest hour forgets a busy day.
pub const BASELINE_HALF_LIFE: Duration = Duration::from_secs(7 * 86_400);
/// `baseline.action`.
pub const BASELINE_ACTION: ActionKind = ActionKind::Hold;
/// The text of `hold` (and `warn`) for a user far above their baseline.
pub const BASELINE_MESSAGE: &str =
    "triggers HOLD action: {user} sent more than {limit}, far above their usual";
/// The text of `defer` and `reject` for a user far above their baseline.
pub const BASELINE_REFUSAL: &str =
    "{user} sent more than {limit}, far above their usual; try again in {retry}";

// ---------------------------------------------------------------- [alerts], [admin]

/// `alerts.timeout`.
pub const ALERTS_TIMEOUT: Duration = Duration::from_secs(10);
/// `alerts.queue`.
pub const ALERTS_QUEUE: usize = 64;
/// `admin.socket`.
pub const ADMIN_SOCKET: &str = "/run/ratelimit-policyd/admin.sock";
/// `admin.tier_overrides`: where `admin tier` persists its moves.
pub const TIER_OVERRIDES: &str = "/var/lib/ratelimit-policyd/tier-overrides";
