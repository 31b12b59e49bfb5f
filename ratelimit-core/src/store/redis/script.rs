//! The decision code, `redis_check.lua`: loading it (a function library where the
//! server has functions, else a script), calling it with a decision's arguments, and
//! reading its reply back into a [`Decision`].
//!
//! With functions (Redis 7 and later) the library is loaded once per server with
//! `FUNCTION LOAD` and each decision is an `FCALL`. The library's functions and the
//! arguments it has parsed outlive the call, where a script called with `EVALSHA`
//! makes its functions and tables again on every call: under callgrind, one window
//! on a key holding one slot, 61,300 instructions per `FCALL` against 98,300 per
//! `EVALSHA` of the same file, and 82,900 per `EVALSHA` of the script before it was
//! a library (the time passed by the caller; with `TIME` read by the code, the
//! default: 68,100, 104,700 and 91,300). A
//! server without functions (before Redis 7), or an ACL user not allowed `FCALL` or
//! `FUNCTION`, gets the same file as a script (`EVALSHA`, and `EVAL` of its text
//! where the server lacks it) from then on: the decisions are the same.

use std::sync::LazyLock;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::{Cmd, ErrorKind, RedisError, ServerErrorKind};

use super::RedisStore;
use super::connection::Conn as Connection;
use crate::clock::Timestamp;
use crate::decision::{Cost, Decision, Denial, LimitStatus, Mode};
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
    pub(super) fn decision_cmd(functions: bool, key: &str, args: &[String]) -> Cmd {
        let (name, code) = if functions {
            // The flags argument (the first) says whether this is a peek, as the
            // code reads it.
            let peek = args.first().is_some_and(|flags| flags.starts_with('0'));
            let function = if peek { &LIBRARY.peek } else { &LIBRARY.check };
            ("FCALL", function.as_str())
        } else {
            ("EVALSHA", SCRIPT_SHA.as_str())
        };
        // Sized up front: growing the command's buffers was a few per cent of the
        // server's CPU per decision.
        let data =
            name.len() + code.len() + 1 + key.len() + args.iter().map(String::len).sum::<usize>();
        let mut cmd = Cmd::with_capacity(4 + args.len(), data);
        cmd.arg(name).arg(code).arg(1).arg(key).arg(args);
        cmd
    }

    /// One decision as `EVAL` of the script's text, which also caches the script
    /// for the `EVALSHA`s after it.
    pub(super) fn eval_text_cmd(key: &str, args: &[String]) -> Cmd {
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
        args: &[String],
    ) -> redis::RedisResult<Vec<String>> {
        let functions = self.uses_functions();
        let first = Self::decision_cmd(functions, key, args).query::<Vec<String>>(con);
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
pub(super) fn script_args(
    limits: &[Limit],
    cost: Cost,
    now: Option<Timestamp>,
    grace_ms: u64,
    mode: Mode,
) -> Vec<String> {
    let mut args = Vec::with_capacity(2 + 2 * limits.len());
    let acquire = u8::from(mode == Mode::Acquire);
    args.push(format!("{acquire} {grace_ms}"));
    args.push(match now {
        Some(t) => t.as_millis().to_string(),
        None => String::new(),
    });
    for l in limits {
        let (kind, extra) = match l.algorithm() {
            Algorithm::SlidingWindow { precision } => ('w', u64::from(precision)),
            Algorithm::TokenBucket { burst } => ('b', u64::from(burst)),
        };
        args.push(format!(
            "{} {kind} {} {} {extra}",
            l.counter_id().as_u64(),
            l.count(),
            l.window_ms(),
        ));
        args.push(cost.get(l.unit()).to_string());
    }
    args
}

/// Builds the [`Decision`] from the script's reply.
pub(super) fn decision_from_reply(
    reply: &[String],
    limits: &[Limit],
) -> Result<Decision, StoreError> {
    let bad = || {
        StoreError::Protocol(format!(
            "the decision script answered {reply:?} for {} limits",
            limits.len()
        ))
    };
    if reply.len() != 2 + 2 * limits.len() {
        return Err(bad());
    }
    // Values the script computes exactly may exceed u64 (a bucket's retry_after);
    // clamp them as `KeyState::apply` does.
    let num = |s: &str| -> Result<u64, StoreError> {
        let v: u128 = s.parse().map_err(|_| bad())?;
        Ok(u64::try_from(v).unwrap_or(u64::MAX))
    };
    let denied: i64 = reply[0].parse().map_err(|_| bad())?;
    let denial = match usize::try_from(denied) {
        Ok(limit) if limit < limits.len() => Some(Denial {
            limit,
            retry_after: match reply[1].as_str() {
                "" => None,
                ms => Some(Duration::from_millis(num(ms)?)),
            },
        }),
        Ok(_) => return Err(bad()),
        Err(_) => None,
    };
    let mut statuses = Vec::with_capacity(limits.len());
    for (i, l) in limits.iter().enumerate() {
        statuses.push(LimitStatus {
            used: num(&reply[2 + 2 * i])?,
            limit: match l.algorithm() {
                Algorithm::SlidingWindow { .. } => l.count(),
                Algorithm::TokenBucket { burst } => u64::from(burst),
            },
            remaining: num(&reply[3 + 2 * i])?,
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
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(decision_from_reply(&s(&["-1", "", "0", "1"]), &limits).is_ok());
        for bad in [
            &["-1", ""][..],
            &["5", "", "0", "1"],
            &["x", "", "0", "1"],
            &["0", "soon", "0", "1"],
            &["-1", "", "-3", "1"],
        ] {
            let err = decision_from_reply(&s(bad), &limits).unwrap_err();
            assert!(matches!(err, StoreError::Protocol(_)), "{bad:?}: {err}");
        }
    }
}
