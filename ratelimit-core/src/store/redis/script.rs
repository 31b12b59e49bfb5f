//! The decision script, `redis_check.lua`: loading it, calling it with a
//! decision's arguments, and reading its reply back into a [`Decision`].

use std::time::Duration;

use redis::{ErrorKind, ServerErrorKind};

use super::RedisStore;
use super::connection::Conn as Connection;
use crate::clock::Timestamp;
use crate::decision::{Cost, Decision, Denial, LimitStatus, Mode};
use crate::quota::{Algorithm, Limit};
use crate::store::StoreError;

/// The decision script (see the module docs).
const SCRIPT: &str = include_str!("redis_check.lua");

impl RedisStore {
    pub(super) fn load_script(&self, con: &mut Connection) -> redis::RedisResult<String> {
        let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(SCRIPT).query(con)?;
        *self.sha.lock() = Some(sha.clone());
        Ok(sha)
    }

    /// `EVALSHA` with `args`, loading the script first if this store has not yet, or
    /// again if the server has lost it (`NOSCRIPT`, after a restart or `SCRIPT FLUSH`).
    pub(super) fn eval(
        &self,
        con: &mut Connection,
        key: &str,
        args: &[String],
    ) -> redis::RedisResult<Vec<String>> {
        let call = |con: &mut Connection, sha: &str| {
            redis::cmd("EVALSHA")
                .arg(sha)
                .arg(1)
                .arg(key)
                .arg(args)
                .query::<Vec<String>>(con)
        };
        let known = self.sha.lock().clone();
        let sha = match known {
            Some(sha) => sha,
            None => self.load_script(con)?,
        };
        match call(con, &sha) {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                let sha = self.load_script(con)?;
                call(con, &sha)
            }
            other => other,
        }
    }
}

/// The script's arguments after the key (see the header of `redis_check.lua`): one
/// for the call, then one per limit, so that a one-limit tier is two arguments.
pub(super) fn script_args(
    limits: &[Limit],
    cost: Cost,
    now: Option<Timestamp>,
    grace_ms: u64,
    mode: Mode,
) -> Vec<String> {
    let mut args = Vec::with_capacity(1 + limits.len());
    let acquire = u8::from(mode == Mode::Acquire);
    args.push(match now {
        Some(t) => format!("{acquire} {} {grace_ms}", t.as_millis()),
        None => format!("{acquire}  {grace_ms}"),
    });
    for l in limits {
        let (kind, extra) = match l.algorithm() {
            Algorithm::SlidingWindow { precision } => ('w', u64::from(precision)),
            Algorithm::TokenBucket { burst } => ('b', u64::from(burst)),
        };
        args.push(format!(
            "{} {kind} {} {} {extra} {}",
            l.counter_id().as_u64(),
            l.count(),
            l.window_ms(),
            cost.get(l.unit())
        ));
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
