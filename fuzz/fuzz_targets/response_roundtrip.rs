//! Any action built from the input decodes back to its sanitized form; any input given
//! to the reply decoder does not panic.
//!
//! Input layout: byte 0 picks the action, bytes 1-2 the reply code, the rest is text.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use ratelimit_policyd::protocol::{Action, ReplyCode, encode_response, parse_response};

fuzz_target!(|data: &[u8]| {
    let _ = parse_response(data);

    let [kind, hi, lo, text @ ..] = data else {
        return;
    };
    let text = String::from_utf8_lossy(text);
    let code = ReplyCode::new(400 + u16::from_be_bytes([*hi, *lo]) % 200).unwrap();
    let text = Cow::Borrowed(&*text);
    let action = match kind % 10 {
        0 => Action::Dunno,
        1 => Action::Ok,
        2 => Action::DeferIfPermit(text),
        3 => Action::Defer(text),
        4 => Action::Reject(text),
        5 => Action::Hold(text),
        6 => Action::Code { code, text },
        7 => Action::Warn(text),
        8 => Action::Info(text),
        _ => Action::Prepend(text),
    };
    let mut out = Vec::new();
    encode_response(&action, &mut out);
    let (decoded, used) = parse_response(&out).unwrap().complete().unwrap();
    assert_eq!(used, out.len());
    assert_eq!(decoded, action.sanitized());
});
