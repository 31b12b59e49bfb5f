//! Batched decisions ([`RedisStoreConfig::batch`](super::RedisStoreConfig::batch)):
//! the decisions of several threads that wait for Redis at the same moment go out as
//! one pipelined write of `FCALL`s (or `EVALSHA`s) and come back in one read, so
//! Redis and this process make one pair of system calls for the lot instead of one
//! per decision.
//!
//! No thread of its own: the first caller to find no batch in flight leads one (its
//! own decision and whatever queued meanwhile); callers that arrive while a batch is
//! in flight queue and wait. When a batch ends, the leader hands the lead to the
//! oldest queued caller and returns. A caller never waits longer than one call may
//! take without batching (`connect_timeout + 3 × command_timeout`): past that it
//! gives up with [`StoreError::Timeout`], and a leader whose budget is shorter than
//! `command_timeout` shortens the batch's read timeout to what it has left.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use redis::{Cmd, ErrorKind, RedisResult, Value};

use super::connection::Conn;
use super::script::DecisionArgs;
use super::{RedisStore, script};
use crate::store::StoreError;

/// The longest a caller waits, in command timeouts beyond one connect (the same
/// bound as an unbatched call: a connect, the call, loading the code, the call again).
const ROUND_TRIPS: u32 = 3;

/// Batches in flight at once, each on its own connection. Two measured no faster
/// than one on two cores (see benches/README.md), and one gives the biggest
/// batches.
const MAX_BATCHES: usize = 1;

/// Callers waiting for a batch, and whether one is in flight.
#[derive(Default)]
pub(super) struct Batcher {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Leaders running a batch (or handed the lead and not yet taking it), at most
    /// [`MAX_BATCHES`].
    leaders: usize,
    queue: Vec<Arc<Job>>,
}

/// One decision: the script's key and arguments, and where its outcome lands.
struct Job {
    name: String,
    args: DecisionArgs,
    outcome: Mutex<Option<Outcome>>,
    ready: Condvar,
}

enum Outcome {
    Done(Result<Value, StoreError>),
    /// This caller leads the next batch.
    Lead,
}

impl Job {
    fn set(&self, outcome: Outcome) {
        *self.outcome.lock() = Some(outcome);
        self.ready.notify_one();
    }
}

/// Ends a leader's turn: the oldest queued caller leads next, or no batch is in
/// flight.
struct HandOver<'a>(&'a Batcher);

impl Drop for HandOver<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        if state.queue.is_empty() {
            state.leaders -= 1;
        } else {
            let next = state.queue.remove(0);
            next.set(Outcome::Lead);
        }
    }
}

impl RedisStore {
    /// The script's reply for `name` and `args`, in a batch with the decisions of the
    /// other callers waiting at the same moment (see the module docs).
    pub(super) fn eval_batched(
        &self,
        name: String,
        args: DecisionArgs,
    ) -> Result<Value, StoreError> {
        let budget = self
            .config
            .connect_timeout
            .saturating_add(self.config.command_timeout.saturating_mul(ROUND_TRIPS));
        let deadline = Instant::now() + budget;
        let job = Arc::new(Job {
            name,
            args,
            outcome: Mutex::new(None),
            ready: Condvar::new(),
        });
        {
            let mut state = self.batcher.state.lock();
            if state.leaders >= MAX_BATCHES {
                state.queue.push(Arc::clone(&job));
                drop(state);
                if let Some(done) = self.wait(&job, deadline, budget) {
                    return done;
                }
                // Handed the lead: counted in `leaders` by the one who handed it.
            } else {
                state.leaders += 1;
            }
        }
        self.lead(&job, deadline);
        match job.outcome.lock().take() {
            Some(Outcome::Done(result)) => result,
            _ => Err(StoreError::Protocol(
                "a batched decision ended without an outcome".into(),
            )),
        }
    }

    /// Waits for `job`'s outcome until `deadline`: `Some` with it, or `None` when the
    /// caller was handed the lead.
    fn wait(
        &self,
        job: &Arc<Job>,
        deadline: Instant,
        budget: Duration,
    ) -> Option<Result<Value, StoreError>> {
        let mut outcome = job.outcome.lock();
        loop {
            match outcome.take() {
                Some(Outcome::Done(result)) => return Some(result),
                Some(Outcome::Lead) => return None,
                None => {}
            }
            if job.ready.wait_until(&mut outcome, deadline).timed_out() {
                break;
            }
        }
        drop(outcome);
        // Out of time. Leave the queue if still in it; if the lead came meanwhile,
        // take it (the others queued behind this caller need a leader).
        let mut state = self.batcher.state.lock();
        if let Some(i) = state.queue.iter().position(|j| Arc::ptr_eq(j, job)) {
            state.queue.remove(i);
            return Some(Err(StoreError::Timeout(budget)));
        }
        drop(state);
        match job.outcome.lock().take() {
            Some(Outcome::Done(result)) => Some(result),
            Some(Outcome::Lead) => None,
            // In a batch that is still running: its outcome will go unread.
            None => Some(Err(StoreError::Timeout(budget))),
        }
    }

    /// Runs one batch: `own` and everyone queued now; then hands the lead on.
    fn lead(&self, own: &Arc<Job>, deadline: Instant) {
        // Hands the lead on when this returns, or if the batch panics (its callers
        // then time out; the ones queued behind it still get a leader).
        let _hand_over = HandOver(&self.batcher);
        let mut jobs = vec![Arc::clone(own)];
        jobs.append(&mut self.batcher.state.lock().queue);
        let results = self.run_until(Some(deadline), |con, cut| {
            self.pipeline(con, &jobs, deadline, cut)
        });
        match results {
            Ok(replies) => {
                for (job, reply) in jobs.iter().zip(replies) {
                    job.set(Outcome::Done(reply.map_err(|e| self.command_error(&e))));
                }
            }
            Err(e) => {
                for job in &jobs {
                    job.set(Outcome::Done(Err(e.clone())));
                }
            }
        }
    }

    /// The pipelined decisions (`FCALL`s, or `EVALSHA`s) of `jobs` on `con`, one
    /// reply (or error reply) per job. The calls that found the code missing are
    /// sent again after loading it ([`RedisStore::reload_library`]), or as `EVAL`s
    /// of the script's text: at most three round trips. Before each round trip the
    /// connection's timeouts are cut to what is left until `deadline` (`cut` says
    /// whether they were).
    fn pipeline(
        &self,
        con: &mut Conn,
        jobs: &[Arc<Job>],
        deadline: Instant,
        cut: &mut bool,
    ) -> RedisResult<Vec<RedisResult<Value>>> {
        if !matches!(con, Conn::Single(_)) {
            return Err((ErrorKind::Client, "batching needs one Redis server").into());
        }
        let timeout = self.config.command_timeout;
        let mut fit = |con: &mut Conn| -> RedisResult<()> {
            *cut |= con.fit(deadline, timeout)?;
            Ok(())
        };
        let send = |con: &mut Conn, cmds: &mut dyn Iterator<Item = Cmd>| {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for cmd in cmds {
                pipe.add_command(cmd);
            }
            pipe.query::<Vec<RedisResult<Value>>>(con)
        };
        let functions = self.uses_functions();
        fit(con)?;
        let mut replies = send(
            con,
            &mut jobs
                .iter()
                .map(|job| Self::decision_cmd(functions, &job.name, &job.args)),
        )?;
        let missing: Vec<usize> = replies
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Err(e) if script::lacks_code(e, functions)))
            .map(|(i, _)| i)
            .collect();
        let first_missing = missing
            .first()
            .and_then(|&i| replies.get(i))
            .and_then(|r| r.as_ref().err().cloned());
        if let Some(e) = first_missing {
            // The server lacks the code (a restart, a flush) or refuses functions:
            // none of these ran. Load it and send them again.
            let again_functions = if functions {
                fit(con)?;
                self.reload_library(con, &e)?
            } else {
                false
            };
            fit(con)?;
            let retried = send(
                con,
                &mut missing.iter().filter_map(|&i| jobs.get(i)).map(|job| {
                    if again_functions {
                        Self::decision_cmd(true, &job.name, &job.args)
                    } else {
                        Self::eval_text_cmd(&job.name, &job.args)
                    }
                }),
            )?;
            for (i, reply) in missing.into_iter().zip(retried) {
                if let Some(slot) = replies.get_mut(i) {
                    *slot = reply;
                }
            }
        }
        if replies.len() != jobs.len() {
            return Err((
                ErrorKind::Client,
                "a pipelined batch got the wrong number of replies",
            )
                .into());
        }
        Ok(replies)
    }
}
#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    use crate::store::{RedisStore, RedisStoreConfig};
    use crate::{Cost, Limit, Mode, Store, StoreError, Timestamp};

    #[test]
    fn batched_callers_of_a_server_that_never_answers_give_up_within_one_calls_bound() {
        // Accepts connections and never reads or answers them: a hung Redis.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("redis://{}/", listener.local_addr().unwrap());
        let config = RedisStoreConfig::new(url)
            .with_connect_timeout(Duration::from_millis(100))
            .with_command_timeout(Duration::from_millis(50))
            .with_batching(true);
        let store = RedisStore::new(config).unwrap();
        let bound = Duration::from_millis(100 + 3 * 50);
        let limits = ["5/1m".parse::<Limit>().unwrap()];
        std::thread::scope(|s| {
            let callers: Vec<_> = (0..8)
                .map(|i| {
                    let store = &store;
                    let limits = &limits;
                    s.spawn(move || {
                        let start = Instant::now();
                        let r = store.check(
                            &format!("user{i}"),
                            limits,
                            Cost::units(1),
                            Timestamp::from_millis(1),
                            Mode::Acquire,
                        );
                        (r, start.elapsed())
                    })
                })
                .collect();
            for caller in callers {
                let (r, took) = caller.join().unwrap();
                let err = r.expect_err("a server that never answers decides nothing");
                assert!(
                    matches!(err, StoreError::Timeout(_) | StoreError::Unavailable(_)),
                    "{err}"
                );
                // The bound, plus scheduling slack on a loaded test machine.
                assert!(
                    took <= bound + Duration::from_millis(150),
                    "a batched caller waited {took:?} (bound {bound:?})"
                );
            }
        });
        drop(listener);
    }
}
