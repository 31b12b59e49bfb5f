//! What a decision returns: the answer for Postfix and why it was given.
//!
//! Logs, metrics, records and replay read a [`Verdict`]; none of them reconstructs
//! the reason from the answer's text.

use crate::protocol::Action;

/// How a counted request was answered, for `ratelimit_decisions_total{action}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Under every limit: `DUNNO`.
    Allow,
    /// Refused temporarily (`DEFER_IF_PERMIT`, a 4xx code).
    Defer,
    /// Put in the hold queue.
    Hold,
    /// Refused for good (`REJECT`, a 5xx code).
    Reject,
    /// Over a limit of a warn tier (or flagged by a warn signal): logged, `DUNNO`.
    DryRun,
    /// The store failed or timed out (answered per `on_store_error`).
    StoreError,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 6] = [
        Outcome::Allow,
        Outcome::Defer,
        Outcome::Hold,
        Outcome::Reject,
        Outcome::DryRun,
        Outcome::StoreError,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Defer => "defer",
            Outcome::Hold => "hold",
            Outcome::Reject => "reject",
            Outcome::DryRun => "dry_run",
            Outcome::StoreError => "store_error",
        }
    }

    /// Its position in [`Outcome::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The outcome of refusing with `action` (a refusal action, not `DUNNO`).
    pub fn of_refusal(action: &Action<'_>) -> Outcome {
        match action {
            Action::Hold(_) => Outcome::Hold,
            Action::Reject(_) => Outcome::Reject,
            Action::Code { code, .. } if !code.is_temporary() => Outcome::Reject,
            _ => Outcome::Defer,
        }
    }
}

/// What decided a refusal (or a dry run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The tier's limit at this position.
    Limit(usize),
    /// Too many client networks (the compromise signal).
    Networks,
    /// Far above the user's own baseline (the second compromise signal).
    Baseline,
}

/// An incident: the first refusal of a key for one limit or signal, until it clears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incident {
    /// The key (user).
    pub key: String,
    /// Its tier.
    pub tier: String,
    /// What refused: a limit as written (`100/1h`), or the networks signal
    /// (`networks5/1h`).
    pub limit: String,
    /// The limit's count used, or the networks seen, when refused.
    pub used: u64,
    /// Which signal opened it.
    pub signal: Signal,
    /// When it clears (ms since the epoch), if ever.
    pub clears_at: Option<u64>,
    /// The client address of the refused request.
    pub client_address: Option<String>,
    /// The last few distinct client addresses of the key, most recent first.
    pub clients: Vec<String>,
    /// Whether the refusal was only logged (warn).
    pub dry_run: bool,
    /// What is done to the key's mail meanwhile (`defer`, `hold`, ...).
    pub action: &'static str,
    /// Why, in words and numbers, when the signal says more than `limit` and `used`
    /// (the baseline signal: the hour, the usual busiest hour, the history); empty
    /// otherwise.
    pub detail: String,
}

/// The decision on one request.
#[derive(Debug, Clone)]
pub struct Verdict<'c> {
    /// The answer for Postfix.
    pub action: Action<'c>,
    /// How it counts (`None`: not counted — another stage, no key, exempt, an
    /// unlimited tier, or a message already charged on this connection).
    pub outcome: Option<Outcome>,
    /// What refused (or would have, in a dry run).
    pub signal: Option<Signal>,
    /// A refusal was only logged: the answer is `DUNNO`.
    pub dry_run: bool,
    /// Incidents this request opened (usually none; at most one per signal).
    pub incidents: Vec<Incident>,
}

impl<'c> Verdict<'c> {
    /// A request that is not counted: `DUNNO`.
    pub fn skip() -> Verdict<'c> {
        Verdict::answer(Action::Dunno)
    }

    /// `action`, not counted.
    pub fn answer(action: Action<'c>) -> Verdict<'c> {
        Verdict {
            action,
            outcome: None,
            signal: None,
            dry_run: false,
            incidents: Vec::new(),
        }
    }

    /// Refused, or would have been in a dry run.
    pub fn is_refusal(&self) -> bool {
        self.action.is_refusal() || self.dry_run
    }
}
