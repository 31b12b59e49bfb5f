//! The decision code, `redis_check.lua`: loading it (a function library where the
//! server has functions, else a script), calling it with a decision's arguments, and
//! reading its reply back into a [`Decision`].
//!
//! With functions (Redis 7 and later) the library is loaded once per server with
//! `FUNCTION LOAD` and each decision is an `FCALL`. The library's functions and the
//! arguments it has parsed outlive the call, where a script called with `EVALSHA`
//! makes its functions and tables again on every call: under callgrind, one window
//! on a key holding one slot, 56,300 instructions per `FCALL` against 88,600 per
//! `EVALSHA` of the same file, and 82,900 per `EVALSHA` of the script before it was
//! a library (the time passed by the caller; with `TIME` read by the code, the
//! default: 62,700, 95,400 and 91,300). A
//! server without functions (before Redis 7), or an ACL user not allowed `FCALL` or
//! `FUNCTION`, gets the same file as a script (`EVALSHA`, and `EVAL` of its text
//! where the server lacks it) from then on: the decisions are the same.

use std::sync::LazyLock;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::{Cmd, ErrorKind, RedisError, RedisWrite, ServerErrorKind, ToRedisArgs, Value};
use smallvec::SmallVec;

use super::RedisStore;
use super::connection::Conn as Connection;
use crate::clock::Timestamp;
use crate::decision::{Cost, Decision, Denial, LimitStatus, MAX_LIMITS, Mode};
use crate::quota::{Algorithm, Limit};
use crate::store::StoreError;

/// The decision code: a function library without its first and last lines.
const SOURCE: &str = include_str!("redis_check.lua");

/// The decision code as a script, for `EVALSHA`.
const SCRIPT: &str = concat!(
    include_str!("redis_check.lua"),
    "\nreturn check(KEYS, ARGV, true)\n"
);

/// The decision code as a function library: the functions' names, and the text for
/// `FUNCTION LOAD`. The same code is registered twice: for decisions that may write,
/// and, flagged `no-writes`, for peeks, which Redis then runs even when it is out
/// of memory (`maxmemory` with `noeviction`), as it runs a script that does not
/// write; a function that may write is refused there before it starts.
pub(super) struct Library {
    pub(super) check: String,
    pub(super) peek: String,
    pub(super) text: String,
}

/// Named after a hash of the code, so that servers of different versions sharing
/// one Redis (during an upgrade) each load and call their own library instead of
/// replacing each other's.
pub(super) static LIBRARY: LazyLock<Library> = LazyLock::new(|| {
    // FNV-1a, 64 bits: a name, not a defence.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in SOURCE.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let name = format!("ratelimit_{h:016x}");
    let check = format!("{name}_check");
    let peek = format!("{name}_peek");
    let text = format!(
        "#!lua name={name}\n{SOURCE}\nredis.register_function('{check}', check)\n\
         redis.register_function{{function_name = '{peek}', callback = check, \
         flags = {{'no-writes'}}}}\n"
    );
    Library { check, peek, text }
});

/// Whether `e` says the server lacks the library's function (a restart without
/// persistence, `FUNCTION FLUSH`, a node that never had it).
fn function_missing(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
        && e.detail()
            .is_some_and(|d| d.starts_with("Function not found"))
}

/// Whether `e` says functions cannot be used here: a server without them (before
/// Redis 7: an unknown command), or an ACL user not allowed them.
fn functions_refused(e: &RedisError) -> bool {
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::NoPerm) => true,
        ErrorKind::Server(ServerErrorKind::ResponseError) => e
            .detail()
            .is_some_and(|d| d.to_ascii_lowercase().starts_with("unknown command")),
        _ => false,
    }
}

/// The script's SHA1, for `EVALSHA`.
static SCRIPT_SHA: LazyLock<String> =
    LazyLock::new(|| redis::Script::new(SCRIPT).get_hash().to_string());

/// Whether `e` says the server lacks the decision code: with `functions`, the
/// library's function (a restart without persistence, `FUNCTION FLUSH`, a node that
/// never had it) or functions altogether; else the script (`NOSCRIPT`: a restart, a
/// `SCRIPT FLUSH`, a promoted replica).
pub(super) fn lacks_code(e: &RedisError, functions: bool) -> bool {
    if functions {
        function_missing(e) || functions_refused(e)
    } else {
        e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
    }
}

impl RedisStore {
    /// Whether decisions go out as `FCALL` (until the server refused functions).
    pub(super) fn uses_functions(&self) -> bool {
        !self.no_functions.load(Ordering::Relaxed)
    }

    /// One decision's command: `FCALL` of the library's function, or `EVALSHA` of
    /// the script.
    pub(super) fn decision_cmd(functions: bool, key: &str, args: &DecisionArgs) -> Cmd {
        let (name, code) = if functions {
            let function = if args.is_peek() {
                &LIBRARY.peek
            } else {
                &LIBRARY.check
            };
            ("FCALL", function.as_str())
        } else {
            ("EVALSHA", SCRIPT_SHA.as_str())
        };
        // Sized up front: growing the command's buffers was a few per cent of the
        // server's CPU per decision.
        let data = name.len() + code.len() + 1 + key.len() + args.text.len();
        let mut cmd = Cmd::with_capacity(4 + args.ends.len(), data);
        cmd.arg(name).arg(code).arg(1).arg(key).arg(args);
        cmd
    }

    /// One decision as `EVAL` of the script's text, which also caches the script
    /// for the `EVALSHA`s after it.
    pub(super) fn eval_text_cmd(key: &str, args: &DecisionArgs) -> Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SCRIPT).arg(1).arg(key).arg(args);
        cmd
    }

    /// After `FCALL`s answered that the code is missing (`e`, one of the answers):
    /// loads the library, or, where the server refuses functions, switches this
    /// store to the script for good. Whether to call the function again (else:
    /// `EVAL`).
    pub(super) fn reload_library(
        &self,
        con: &mut Connection,
        e: &RedisError,
    ) -> redis::RedisResult<bool> {
        if !functions_refused(e) {
            let loaded: redis::RedisResult<String> = redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg(&LIBRARY.text)
                .query(con);
            match loaded {
                Ok(_) => return Ok(true),
                // Another server loaded it meanwhile.
                Err(e)
                    if e.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
                        && e.detail().is_some_and(|d| d.contains("already exists")) =>
                {
                    return Ok(true);
                }
                Err(e) if functions_refused(&e) => {}
                Err(e) => return Err(e),
            }
        }
        self.no_functions.store(true, Ordering::Relaxed);
        Ok(false)
    }

    /// One decision, in at most three round trips: `FCALL`; where the server lacks
    /// the function, `FUNCTION LOAD` and `FCALL` again; where it refuses functions,
    /// the script from then on. The script: `EVALSHA`, and where the server lacks
    /// it, `EVAL` of its text.
    pub(super) fn eval(
        &self,
        con: &mut Connection,
        key: &str,
        args: &DecisionArgs,
    ) -> redis::RedisResult<Value> {
        let functions = self.uses_functions();
        let first = Self::decision_cmd(functions, key, args).query::<Value>(con);
        let e = match first {
            Err(e) if lacks_code(&e, functions) => e,
            other => return other,
        };
        if functions && self.reload_library(con, &e)? {
            return Self::decision_cmd(true, key, args).query(con);
        }
        Self::eval_text_cmd(key, args).query(con)
    }
}

/// The decision's arguments after the key (see the header of `redis_check.lua`):
/// the flags, the time, then a limit and its cost for each limit. The flags and the
/// limits are the same text on every call of a tier, which the library parses once.
///
/// Written one after the other into one buffer, each ending where `ends` says: one
/// allocation per decision, where a string per argument made six for one limit
/// (with their formatting, about 10% of this process's instructions per decision).
pub(super) struct DecisionArgs {
    text: String,
    ends: SmallVec<[usize; 6]>,
}

impl DecisionArgs {
    /// The arguments of one decision on `limits` (`now`: the caller's time, or
    /// `None` for Redis's `TIME`).
    pub(super) fn new(
        limits: &[Limit],
        cost: Cost,
        now: Option<Timestamp>,
        grace_ms: u64,
        mode: Mode,
    ) -> DecisionArgs {
        let mut args = DecisionArgs {
            text: String::with_capacity(32 + 48 * limits.len()),
            ends: SmallVec::new(),
        };
        let mut num = itoa::Buffer::new();
        args.text
            .push_str(if mode == Mode::Acquire { "1 " } else { "0 " });
        args.text.push_str(num.format(grace_ms));
        args.end();
        if let Some(t) = now {
            args.text.push_str(num.format(t.as_millis()));
        }
        args.end();
        for l in limits {
            let (kind, extra) = match l.algorithm() {
                Algorithm::SlidingWindow { precision } => (" w ", u64::from(precision)),
                Algorithm::TokenBucket { burst } => (" b ", u64::from(burst)),
            };
            args.text.push_str(num.format(l.counter_id().as_u64()));
            args.text.push_str(kind);
            for n in [l.count(), l.window_ms()] {
                args.text.push_str(num.format(n));
                args.text.push(' ');
            }
            args.text.push_str(num.format(extra));
            args.end();
            args.text.push_str(num.format(cost.get(l.unit())));
            args.end();
        }
        args
    }

    /// Ends the argument being written.
    fn end(&mut self) {
        self.ends.push(self.text.len());
    }

    /// The arguments, in order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &str> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| self.text.get(start..end).unwrap_or_default())
    }

    /// Whether this decision only looks (the flags, the first argument, start with
    /// 0, as the code reads them).
    pub(super) fn is_peek(&self) -> bool {
        self.text.starts_with('0')
    }
}

/// Each argument as one argument of the command (`cmd.arg(&args)`).
impl ToRedisArgs for &DecisionArgs {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        for arg in self.iter() {
            out.write_arg(arg.as_bytes());
        }
    }

    fn num_of_args(&self) -> usize {
        self.ends.len()
    }
}

/// One number of the script's reply: an integer reply (Lua numbers), or a decimal
/// string (what the big-integer path computes); `None` for the empty string (a
/// retry_after of never). `Err` for anything else.
fn reply_number(v: &Value) -> Result<Option<i128>, ()> {
    let text = match v {
        Value::Int(n) => return Ok(Some(i128::from(*n))),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).map_err(|_| ())?,
        Value::SimpleString(s) => s.as_str(),
        _ => return Err(()),
    };
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| ())
}

/// Builds the [`Decision`] from the script's reply.
pub(super) fn decision_from_reply(reply: &Value, limits: &[Limit]) -> Result<Decision, StoreError> {
    let bad = || {
        StoreError::Protocol(format!(
            "the decision script answered {reply:?} for {} limits",
            limits.len()
        ))
    };
    let items = match reply {
        Value::Array(items) if items.len() == 2 + 2 * limits.len() => items.as_slice(),
        _ => return Err(bad()),
    };
    let number = |i: usize| items.get(i).ok_or(()).and_then(reply_number);
    // Values the script computes exactly may exceed u64 (a bucket's retry_after);
    // clamp them as `KeyState::apply` does.
    let count = |i: usize| -> Result<u64, StoreError> {
        match number(i) {
            Ok(Some(v)) if v >= 0 => Ok(u64::try_from(v).unwrap_or(u64::MAX)),
            _ => Err(bad()),
        }
    };
    let denial = match number(0) {
        Ok(Some(-1)) => None,
        Ok(Some(limit)) if (0..limits.len() as i128).contains(&limit) => Some(Denial {
            limit: limit as usize,
            retry_after: match number(1) {
                Ok(None) => None,
                _ => Some(Duration::from_millis(count(1)?)),
            },
        }),
        _ => return Err(bad()),
    };
    let mut statuses = SmallVec::<[LimitStatus; MAX_LIMITS]>::with_capacity(limits.len());
    for (i, l) in limits.iter().enumerate() {
        statuses.push(LimitStatus {
            used: count(2 + 2 * i)?,
            limit: match l.algorithm() {
                Algorithm::SlidingWindow { .. } => l.count(),
                Algorithm::TokenBucket { burst } => u64::from(burst),
            },
            remaining: count(3 + 2 * i)?,
        });
    }
    Ok(Decision::new(denial, &statuses))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_of_the_wrong_shape_are_protocol_errors() {
        let limits = ["1/1m".parse::<Limit>().unwrap()];
        // As Redis sends them: Lua numbers as integers, strings as bulk strings.
        let v = |items: &[&str]| {
            Value::Array(
                items
                    .iter()
                    .map(|x| match x.strip_prefix('"') {
                        Some(text) => Value::BulkString(text.trim_end_matches('"').into()),
                        None => Value::Int(x.parse().unwrap()),
                    })
                    .collect(),
            )
        };
        let ok = decision_from_reply(&v(&["-1", "\"\"", "0", "1"]), &limits).unwrap();
        assert!(ok.is_allowed() && ok.remaining() == 1);
        let refused = decision_from_reply(&v(&["0", "\"1500\"", "\"1\"", "0"]), &limits).unwrap();
        assert_eq!(
            refused.denial().and_then(|d| d.retry_after),
            Some(Duration::from_millis(1500))
        );
        let never = decision_from_reply(&v(&["0", "\"\"", "1", "0"]), &limits).unwrap();
        assert!(!never.is_allowed() && never.denial().is_some_and(|d| d.retry_after.is_none()));
        // A count past u64 (the exact path) is clamped, as KeyState::apply does.
        let huge = decision_from_reply(
            &v(&["-1", "\"\"", "0", "\"36893488147419103232\""]),
            &limits,
        );
        assert_eq!(huge.unwrap().remaining(), u64::MAX);
        for bad in [
            &["-1", "\"\""][..],
            &["5", "\"\"", "0", "1"],
            &["\"x\"", "\"\"", "0", "1"],
            &["0", "\"soon\"", "0", "1"],
            &["-1", "\"\"", "-3", "1"],
            &["-2", "\"\"", "0", "1"],
        ] {
            let err = decision_from_reply(&v(bad), &limits).unwrap_err();
            assert!(matches!(err, StoreError::Protocol(_)), "{bad:?}: {err}");
        }
        assert!(decision_from_reply(&Value::Nil, &limits).is_err());
    }

    #[test]
    fn the_arguments_are_the_texts_the_code_parses() {
        let limits = ["100/1h".parse::<Limit>().unwrap()];
        let args = DecisionArgs::new(&limits, Cost::units(1), None, 60_000, Mode::Acquire);
        let l = &limits[0];
        let Algorithm::SlidingWindow { precision } = l.algorithm() else {
            panic!("a window");
        };
        let limit = format!("{} w 100 3600000 {precision}", l.counter_id().as_u64());
        assert_eq!(
            args.iter().collect::<Vec<_>>(),
            ["1 60000", "", limit.as_str(), "1"]
        );
        assert!(!args.is_peek());
        assert_eq!((&args).to_redis_args().len(), (&args).num_of_args());
        let now = Some(Timestamp::from_millis(1_765_000_000_000));
        let peek = DecisionArgs::new(&limits, Cost::units(1), now, 5, Mode::Peek);
        assert_eq!(
            peek.iter().collect::<Vec<_>>(),
            ["0 5", "1765000000000", limit.as_str(), "1"]
        );
        assert!(peek.is_peek());
    }
}
