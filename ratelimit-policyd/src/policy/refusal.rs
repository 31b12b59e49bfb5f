//! The answer of an action (a tier's, or the networks signal's) to a user it refuses.

use std::borrow::Cow;

use crate::config::ActionKind;
use crate::protocol::Action;
use crate::template::{Fill, Template};

/// The answer of `action`, its text `template` filled with `fill` and written into
/// `text` (after the enhanced status code of an explicit reply code, as in
/// `451 4.7.1`; a code that is not 4xx or 5xx defers instead).
pub fn refusal<'t>(
    action: &ActionKind,
    template: &Template,
    fill: &Fill<'_>,
    text: &'t mut String,
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
    template.write(text, fill);
    let text = Cow::Borrowed(text.as_str());
    match (action, code) {
        (_, Some(num)) => Action::code(num, text.clone()).unwrap_or(Action::DeferIfPermit(text)),
        (ActionKind::Hold, _) => Action::Hold(text),
        (ActionKind::Reject(_), _) => Action::Reject(text),
        _ => Action::DeferIfPermit(text),
    }
}

/// The action's name in incident lines and alerts.
pub fn action_name(action: &ActionKind) -> &'static str {
    match action {
        ActionKind::Defer | ActionKind::Code(_) => "defer",
        ActionKind::Hold => "hold",
        ActionKind::Reject(_) => "reject",
        ActionKind::Warn => "warn",
    }
}
