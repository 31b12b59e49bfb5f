//! The volume decision: the user's tier's limits, peeked at RCPT and DATA, charged at
//! END-OF-MESSAGE.

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use ratelimit_core::{Cost, Decision, Mode, StoreError, Tier, Timestamp};

use super::incidents::WhileOpen;
use super::refusal::{action_name, refusal};
use super::{Counted, Outcome, Policy, Signal, Verdict};
use crate::backend::CallBounds;
use crate::config::{ActionKind, Config, FailMode, TierPolicy};
use crate::protocol::{Action, PolicyRequest, Stage};
use crate::template::{Fill, Template};

/// The policy of a tier without one of its own (every configured tier has one).
static DEFAULT_POLICY: LazyLock<TierPolicy> = LazyLock::new(|| TierPolicy {
    action: ActionKind::Defer,
    message: Template::new(crate::config::DEFAULT_MESSAGE),
    limits: Vec::new(),
});

/// The answer to a request the store failed, per `on_store_error` (`Local` has
/// none of its own: when the local store cannot decide either, it defers).
fn store_error_answer(mode: FailMode, verdict: &mut Verdict<'_>) {
    verdict.outcome = Some(Outcome::StoreError);
    verdict.action = match mode {
        FailMode::Open => Action::Dunno,
        FailMode::Closed | FailMode::Local => Action::DeferIfPermit(Cow::Borrowed(
            "4.3.0 Rate limiter temporarily unavailable, try again later",
        )),
    };
}

/// An incident with no retry time (a message larger than the limit) lasts a window;
/// this long when the limit is unknown.
const DEFAULT_INCIDENT_MS: u64 = 3_600_000;

impl Policy {
    /// Decides `key`'s request by its tier's limits into `verdict`; a refusal's text
    /// goes in `text`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn volume<'t>(
        &self,
        cfg: &Config,
        key: &str,
        tier: &Arc<Tier>,
        now: Timestamp,
        mode: Mode,
        req: &PolicyRequest<'_>,
        text: &'t mut String,
        verdict: &mut Verdict<'t>,
    ) {
        let recipients = req.recipient_count.unwrap_or(0).max(1);
        let cost = match req.protocol_state {
            Stage::Rcpt => Cost::message(1, req.size.unwrap_or(0)),
            _ => Cost::message(recipients, req.size.unwrap_or(0)),
        };
        let bounds = CallBounds::of(&cfg.server);
        let failed = match self.backend.check(key, tier, cost, now, mode, bounds).await {
            Ok(decision) => {
                return self.judge(cfg, key, tier, &decision, now, req, text, verdict);
            }
            Err(StoreError::Full { max_keys }) => {
                return self.table_full(key, max_keys, now, verdict);
            }
            Err(e) => e,
        };
        self.tally.add(Counted::StoreErrors);
        let fail_mode = cfg.server.on_store_error;
        if fail_mode != FailMode::Local {
            self.store_failed(key, &failed, now, "store failure");
            return store_error_answer(fail_mode, verdict);
        }
        // The local fallback: this server's own counters, with its share of each limit.
        self.store_failed(
            key,
            &failed,
            now,
            "store failure: deciding with this server's own counters",
        );
        let local = cfg.server.local_tiers.get(tier.name()).unwrap_or(tier);
        match self.backend.check_local(key, local, cost, now, mode) {
            Ok(decision) => self.judge(cfg, key, local, &decision, now, req, text, verdict),
            Err(StoreError::Full { max_keys }) => self.table_full(key, max_keys, now, verdict),
            // The memory store fails only when full; were it to, nothing is unchecked.
            Err(_) => store_error_answer(FailMode::Closed, verdict),
        }
    }

    /// The verdict on `decision`: `DUNNO` when admitted, else the tier's action.
    #[allow(clippy::too_many_arguments)]
    fn judge<'t>(
        &self,
        cfg: &Config,
        key: &str,
        tier: &Tier,
        decision: &Decision,
        now: Timestamp,
        req: &PolicyRequest<'_>,
        text: &'t mut String,
        verdict: &mut Verdict<'t>,
    ) {
        let Some(denial) = decision.denial() else {
            self.tally.add(Counted::Allowed);
            if req.protocol_state == Stage::EndOfMessage {
                self.tally.add(Counted::Charged);
            }
            verdict.outcome = Some(Outcome::Allow);
            verdict.action = Action::Dunno;
            return;
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
        let signal = Signal::Limit(denial.limit);
        verdict.signal = Some(signal);
        let now_ms = now.as_millis();
        let until =
            clears_at.unwrap_or(now_ms + limit.map_or(DEFAULT_INCIDENT_MS, |l| l.window_ms()));
        if self
            .incidents
            .refused(key, signal, until, now_ms, WhileOpen::Keep)
        {
            let incident = self.incident(
                key,
                tier.name(),
                signal,
                limit.map(|l| l.to_string()).unwrap_or_default(),
                used,
                clears_at,
                req,
                dry_run,
                action_name(&policy.action),
            );
            verdict.incidents.push(incident);
        }
        if dry_run {
            self.tally.add(Counted::DryRun);
            tracing::debug!(user = %key, tier = tier.name(), limit = %limit.map(|l| l.to_string()).unwrap_or_default(), "dry run: would refuse");
            verdict.dry_run = true;
            verdict.outcome = Some(Outcome::DryRun);
            verdict.action = Action::Dunno;
            return;
        }
        self.tally.add(Counted::Refused);
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
            networks: None,
        };
        let action = refusal(&policy.action, &policy.message, &fill, text);
        verdict.outcome = Some(Outcome::of_refusal(&action));
        verdict.action = action;
    }
}
