//! The baseline signal: each user against their own past.
//!
//! For a judged user (a tier with a baseline policy, `[baseline]`, and not in
//! `[exempt] baseline_users`), every RCPT, DATA and END-OF-MESSAGE request first
//! *looks* at the user's baseline ([`ratelimit_core::baseline`]): with at least
//! `learn` of history, a message that would take the hour's accepted volume over
//! `max(min, factor × usual)` is flagged, and gets the baseline action (default
//! `HOLD`) instead of the volume decision; nothing is charged. `warn` only logs and
//! alerts. After the decision, a message accepted at END-OF-MESSAGE (answered `DUNNO`:
//! under every limit, or only logged by a warn tier or signal) is *fed* to the
//! baseline: held, deferred or refused mail never is, so an abuser cannot teach the
//! estimator their own volume. The flag clears by itself when the hour's volume falls
//! back under the threshold; `admin reset` clears it at once (keeping the history),
//! `admin reset --baseline` forgets the history too.
//!
//! One incident (log line and alert) per flagging, with the numbers: "alice sent 11
//! in the last hour; their usual busiest hour is 2 (learned over 23 days)".

use ratelimit_core::baseline::Judgement;
use ratelimit_core::{StoreError, Tier, Timestamp};

use super::incidents::WhileOpen;
use super::refusal::{action_name, refusal};
use super::{Counted, Outcome, Policy, Signal, Verdict};
use crate::config::{ActionKind, BaselinePolicy, Config};
use crate::protocol::{Action, PolicyRequest};
use crate::template::Fill;

/// The baseline policy `key` is judged by in `tier`, if any.
pub(super) fn judged<'c>(cfg: &'c Config, key: &str, tier: &Tier) -> Option<&'c BaselinePolicy> {
    cfg.baseline
        .by_tier
        .get(tier.name())
        .filter(|_| !cfg.exempt.baseline_users.contains(key))
}

/// The incident text: who sent how much, against what.
pub fn explain(key: &str, j: &Judgement) -> String {
    format!(
        "{key} sent {} in the last hour; their usual busiest hour is {} (learned over {} days), threshold {}",
        u64::from(j.hour) + 1,
        j.usual_messages(),
        j.learned_days(),
        j.threshold.unwrap_or(0)
    )
}

impl Policy {
    /// Judges `key` by its baseline. When flagged, the verdict gets the baseline
    /// action (or, with `warn`, only its dry run and incident). A store failure is
    /// logged and counted, and the volume decision decides.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn judge_baseline(
        &self,
        cfg: &Config,
        key: &str,
        tier: &Tier,
        policy: &BaselinePolicy,
        now: Timestamp,
        req: &PolicyRequest<'_>,
        verdict: &mut Verdict<'_>,
    ) {
        let timeout = cfg.server.decision_timeout;
        let j = match self
            .backend
            .baseline(key, 0, &policy.cfg, now, timeout)
            .await
        {
            Ok(j) => j,
            Err(e) => {
                self.tally.add(Counted::StoreErrors);
                self.store_failed(
                    key,
                    &e,
                    now,
                    "store failure reading the baseline; volume limits only",
                );
                return;
            }
        };
        if !j.flagged {
            return;
        }
        let threshold = j.threshold.unwrap_or(0);
        let limit = format!("baseline{threshold}/1h");
        let clears_at = j.clears_at.unwrap_or(now.as_millis() + 3_600_000);
        let dry_run = policy.action == ActionKind::Warn;
        if self.incidents.refused(
            key,
            Signal::Baseline,
            clears_at,
            now.as_millis(),
            WhileOpen::Extend,
        ) {
            let mut incident = self.incident(
                key,
                tier.name(),
                Signal::Baseline,
                limit.clone(),
                u64::from(j.hour) + 1,
                Some(clears_at),
                req,
                dry_run,
                action_name(&policy.action),
            );
            incident.detail = explain(key, &j);
            verdict.incidents.push(incident);
        }
        verdict.signal = Some(Signal::Baseline);
        if dry_run {
            self.tally.add(Counted::DryRun);
            tracing::info!(user = %key, tier = tier.name(), hour = j.hour, threshold, "dry run: would act on a user far above their baseline");
            verdict.dry_run = true;
            return;
        }
        self.tally.add(Counted::BaselineFlagged);
        let limit_text = format!("{threshold} messages in an hour");
        let fill = Fill {
            user: key,
            tier: tier.name(),
            limit: &limit_text,
            retry_after: Some(Timestamp::from_millis(clears_at).saturating_duration_since(now)),
            clears_at: Some(clears_at),
            networks: None,
        };
        let mut text = String::new();
        let action = refusal(&policy.action, &policy.message, &fill, &mut text).into_owned();
        verdict.outcome = Some(Outcome::of_refusal(&action));
        verdict.action = action;
    }

    /// Feeds one message accepted at END-OF-MESSAGE to `key`'s baseline: only when
    /// the verdict let it through (`DUNNO`, not a store failure).
    pub(super) async fn feed_baseline(
        &self,
        cfg: &Config,
        key: &str,
        policy: &BaselinePolicy,
        now: Timestamp,
        verdict: &Verdict<'_>,
    ) {
        let accepted = matches!(verdict.action, Action::Dunno)
            && matches!(
                verdict.outcome,
                None | Some(Outcome::Allow) | Some(Outcome::DryRun)
            );
        if !accepted {
            return;
        }
        let timeout = cfg.server.decision_timeout;
        match self
            .backend
            .baseline(key, 1, &policy.cfg, now, timeout)
            .await
        {
            Ok(_) => {}
            Err(StoreError::Full { max_keys }) => {
                tracing::debug!(user = %key, max_keys, "baseline table full: message not learned");
            }
            Err(e) => {
                self.tally.add(Counted::StoreErrors);
                self.store_failed(key, &e, now, "store failure feeding the baseline");
            }
        }
    }
}

impl Policy {
    /// `key`'s baseline now, judged as in its tier (`None`: the signal is off for
    /// it). Blocking: call it off the async threads.
    pub fn baseline_of(&self, key: &str) -> Result<Option<Judgement>, StoreError> {
        let cfg = self.config();
        let tier = cfg.tiers.map.tier_of(key);
        let Some(policy) = judged(&cfg, key, tier) else {
            return Ok(None);
        };
        self.backend
            .baseline_peek(key, &policy.cfg, self.now())
            .map(Some)
    }

    /// Clears `key`'s baseline flag (the hour's volume), keeping its history.
    /// Blocking.
    pub(super) fn clear_baseline_flag(&self, key: &str) -> Result<bool, StoreError> {
        match self.config().baseline.any() {
            Some(c) => self.backend.baseline_clear_hour(key, &c, self.now()),
            None => Ok(false),
        }
    }

    /// Forgets `key`'s baseline, history included (`admin reset --baseline`): the
    /// user learns again from nothing. Blocking.
    pub fn forget_baseline(&self, key: &str) -> Result<bool, StoreError> {
        self.backend.baseline_forget(key)
    }

    /// Sweeps baselines decayed to nothing; returns how many users went.
    pub(super) fn sweep_baselines(&self, now: Timestamp) -> usize {
        match self.config().baseline.any() {
            Some(c) => self.backend.sweep_baselines(now, &c),
            None => 0,
        }
    }
}
