//! The compromise signal: the distinct client networks a user sends from.
//!
//! Every RCPT, DATA and END-OF-MESSAGE request of a watched user (a tier with
//! `max_networks`, or `[networks]`) *observes* the client's network (`ipv4_prefix` /
//! `ipv6_prefix`) before the volume limits are checked, so a request that the volume
//! limits refuse still reveals its address. Observing is idempotent (a network seen
//! again only moves its last-seen time), so one message observed at three stages
//! counts once. A user seen from more than `max_networks` networks within
//! `networks_window` is flagged for a window after the last crossing; while flagged,
//! each request gets the networks action (default `HOLD`) instead of the volume
//! decision, and nothing is charged. `warn` only logs and alerts. Roaming users
//! (`[exempt] roaming_users`) and tiers with `networks_exempt` are not watched.
//! A new user the network store has no room for (full, nothing to evict) is
//! deferred like one the counters have no room for: never left unwatched.

use ratelimit_core::{StoreError, Tier, Timestamp};

use super::incidents::WhileOpen;
use super::keying::{canonical_ip, client_network, parse_ip};
use super::refusal::{action_name, refusal};
use super::{Counted, Outcome, Policy, Signal, Verdict};
use crate::backend::CallBounds;
use crate::config::{ActionKind, Config, FailMode, NetworksPolicy};
use crate::protocol::PolicyRequest;
use crate::template::{Fill, NetworksFill};

impl Policy {
    /// Observes the request's client network for `key`. When the user is flagged,
    /// the verdict gets the networks action (or, with `warn`, only its dry run and
    /// incident, and the volume decision goes on). A store failure is logged and
    /// counted, and the volume decision (with its own failure policy) decides; with
    /// `on_store_error = "local"` the network is observed by this server's own store.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn watch_networks(
        &self,
        cfg: &Config,
        key: &str,
        tier: &Tier,
        policy: &NetworksPolicy,
        now: Timestamp,
        req: &PolicyRequest<'_>,
        verdict: &mut Verdict<'_>,
    ) {
        let Some(ip) = req.client_address.and_then(parse_ip).map(canonical_ip) else {
            return;
        };
        let network =
            client_network(ip, cfg.keying.ipv4_prefix, cfg.keying.ipv6_prefix).to_string();
        let bounds = CallBounds::of(&cfg.server);
        let observed = match self
            .backend
            .observe(key, &network, &policy.limit, now, bounds)
            .await
        {
            Err(e)
                if cfg.server.on_store_error == FailMode::Local
                    && !matches!(e, StoreError::Full { .. }) =>
            {
                // The local fallback: this server's own record of the networks.
                self.tally.add(Counted::StoreErrors);
                self.store_failed(
                    key,
                    &e,
                    now,
                    "store failure observing the client network: observed by this server's own store",
                );
                self.backend
                    .observe_local(key, &network, &policy.limit, now)
            }
            other => other,
        };
        let observation = match observed {
            Ok(o) => o,
            Err(StoreError::Full { max_keys }) => {
                // Unwatched is not unlimited: a new user waits until there is room.
                self.table_full(key, max_keys, now, verdict);
                return;
            }
            Err(e) => {
                self.tally.add(Counted::StoreErrors);
                self.store_failed(
                    key,
                    &e,
                    now,
                    "store failure observing the client network; volume limits only",
                );
                return;
            }
        };
        let Some(until) = observation.flagged_until else {
            return;
        };
        let dry_run = policy.action == ActionKind::Warn;
        let limit = format!("networks{}", policy.limit);
        if self.incidents.refused(
            key,
            Signal::Networks,
            until.as_millis(),
            now.as_millis(),
            WhileOpen::Extend,
        ) {
            verdict.incidents.push(self.incident(
                key,
                tier.name(),
                Signal::Networks,
                limit.clone(),
                u64::from(observation.distinct),
                Some(until.as_millis()),
                req,
                dry_run,
                action_name(&policy.action),
            ));
        }
        verdict.signal = Some(Signal::Networks);
        if dry_run {
            self.tally.add(Counted::DryRun);
            tracing::info!(user = %key, tier = tier.name(), network = %network, networks = observation.distinct, "dry run: would act on too many networks");
            verdict.dry_run = true;
            return;
        }
        self.tally.add(Counted::NetworksFlagged);
        let fill = Fill {
            user: key,
            tier: tier.name(),
            limit: &limit,
            retry_after: Some(until.saturating_duration_since(now)),
            clears_at: Some(until.as_millis()),
            networks: Some(NetworksFill {
                max: policy.limit.max(),
                window: policy.limit.window(),
                seen: observation.distinct,
            }),
        };
        let mut text = String::new();
        let action = refusal(&policy.action, &policy.message, &fill, &mut text).into_owned();
        verdict.outcome = Some(Outcome::of_refusal(&action));
        verdict.action = action;
    }
}
