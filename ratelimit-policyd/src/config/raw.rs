//! The configuration file as written: one serde struct per section, every field
//! optional, unknown fields rejected. Values that can be wrong carry their byte span
//! ([`Spanned`]) so that an error can name the line. The section builders turn these
//! into the typed values of [`super`].

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// The whole file.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) store: RawStore,
    #[serde(default)]
    pub(super) keying: RawKeying,
    #[serde(default)]
    pub(super) exempt: RawExempt,
    #[serde(default)]
    pub(super) networks: RawNetworks,
    pub(super) baseline: Option<RawBaseline>,
    #[serde(default)]
    pub(super) tiers: BTreeMap<String, Spanned<RawTier>>,
    pub(super) default_tier: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) assign: BTreeMap<String, Spanned<String>>,
    pub(super) assign_file: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) alerts: RawAlerts,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) record: RawRecord,
}

/// `[server]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<Vec<Spanned<String>>>,
    pub(super) allow: Option<Vec<Spanned<String>>>,
    pub(super) max_connections: Option<Spanned<usize>>,
    pub(super) idle_timeout: Option<Spanned<String>>,
    pub(super) decision_timeout: Option<Spanned<String>>,
    pub(super) on_store_error: Option<Spanned<String>>,
    pub(super) max_store_calls_in_flight: Option<Spanned<usize>>,
    pub(super) local_fraction: Option<Spanned<f64>>,
    pub(super) log_format: Option<Spanned<String>>,
    pub(super) log_target: Option<Spanned<String>>,
    pub(super) syslog_socket: Option<Spanned<String>>,
    pub(super) socket_mode: Option<Spanned<String>>,
    pub(super) socket_group: Option<Spanned<String>>,
    pub(super) allow_uids: Option<Spanned<Vec<Spanned<RawId>>>>,
}

/// A user or group as written: its numeric id or its name.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawId {
    Id(u32),
    Name(String),
}

/// `[store]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) backend: Option<Spanned<String>>,
    pub(super) max_keys: Option<Spanned<usize>>,
    pub(super) snapshot_path: Option<Spanned<String>>,
    pub(super) snapshot_interval: Option<Spanned<String>>,
    pub(super) on_bad_snapshot: Option<Spanned<String>>,
    pub(super) sweep_interval: Option<Spanned<String>>,
    pub(super) redis_url: Option<String>,
    pub(super) redis_cluster_nodes: Option<Spanned<Vec<String>>>,
    pub(super) redis_ca_file: Option<Spanned<String>>,
    pub(super) redis_client_cert_file: Option<Spanned<String>>,
    pub(super) redis_client_key_file: Option<Spanned<String>>,
    pub(super) redis_password_file: Option<Spanned<String>>,
    pub(super) redis_key_prefix: Option<String>,
    pub(super) redis_connect_timeout: Option<Spanned<String>>,
    pub(super) redis_command_timeout: Option<Spanned<String>>,
    pub(super) redis_time: Option<Spanned<String>>,
    pub(super) redis_batch: Option<Spanned<bool>>,
}

/// `[keying]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeying {
    pub(super) without_sasl: Option<Spanned<String>>,
    pub(super) ipv4_prefix: Option<Spanned<u8>>,
    pub(super) ipv6_prefix: Option<Spanned<u8>>,
}

/// `[exempt]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExempt {
    #[serde(default)]
    pub(super) users: Vec<String>,
    #[serde(default)]
    pub(super) domains: Vec<String>,
    #[serde(default)]
    pub(super) clients: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) roaming_users: Vec<String>,
    #[serde(default)]
    pub(super) baseline_users: Vec<String>,
}

/// `[networks]` as written: the compromise signal's defaults for every tier.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNetworks {
    pub(super) max: Option<Spanned<u32>>,
    pub(super) window: Option<Spanned<String>>,
    pub(super) action: Option<Spanned<String>>,
    pub(super) message: Option<String>,
}

/// `[baseline]` as written: the baseline signal (on when the section is present).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBaseline {
    pub(super) learn: Option<Spanned<String>>,
    pub(super) factor: Option<Spanned<f64>>,
    pub(super) min: Option<Spanned<u32>>,
    pub(super) half_life: Option<Spanned<String>>,
    pub(super) action: Option<Spanned<String>>,
    pub(super) message: Option<String>,
}

/// `[tiers.NAME]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTier {
    #[serde(default)]
    pub(super) limits: Vec<Spanned<RawLimit>>,
    pub(super) action: Option<Spanned<String>>,
    pub(super) reply_code: Option<Spanned<String>>,
    pub(super) message: Option<String>,
    pub(super) max_networks: Option<Spanned<u32>>,
    pub(super) networks_window: Option<Spanned<String>>,
    pub(super) networks_action: Option<Spanned<String>>,
    pub(super) networks_message: Option<String>,
    pub(super) networks_exempt: Option<Spanned<bool>>,
    pub(super) baseline_factor: Option<Spanned<f64>>,
    pub(super) baseline_exempt: Option<Spanned<bool>>,
}

/// One entry of a tier's `limits`: `"100/1h"` or a table.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawLimit {
    Text(String),
    Table(RawLimitTable),
}

/// `{ limit = "100/1h", unit = ..., algorithm = ..., burst = ..., precision = ... }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimitTable {
    pub(super) limit: String,
    pub(super) unit: Option<String>,
    pub(super) algorithm: Option<String>,
    pub(super) burst: Option<u64>,
    pub(super) precision: Option<u64>,
}

/// `[alerts]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    pub(super) command: Option<Spanned<String>>,
    pub(super) webhook_url: Option<Spanned<String>>,
    pub(super) webhook_token: Option<Spanned<String>>,
    pub(super) webhook_token_file: Option<Spanned<String>>,
    pub(super) webhook_ca_file: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) queue: Option<Spanned<usize>>,
}

/// `[metrics]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub(super) listen: Option<Spanned<String>>,
}

/// `[admin]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub(super) socket: Option<Spanned<String>>,
    pub(super) enabled: Option<bool>,
    pub(super) tier_overrides: Option<Spanned<String>>,
}

/// `[record]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRecord {
    pub(super) path: Option<Spanned<String>>,
}
