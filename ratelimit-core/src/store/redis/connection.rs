//! The store's connections to Redis: a small pool of idle synchronous
//! connections, timeouts on every connect and command, one retry on a pooled
//! connection found dead, and Redis errors mapped to [`StoreError`] (see
//! "Connections" in the [module docs](super)).

use redis::{Connection, ConnectionLike, ErrorKind, RedisError, ServerErrorKind};

use super::RedisStore;
use crate::store::StoreError;

/// What the store was doing when Redis failed (picks the timeout to report).
#[derive(Clone, Copy)]
enum Phase {
    Connect,
    Command,
}

impl RedisStore {
    pub(super) fn connect(&self) -> Result<Connection, StoreError> {
        let con = self
            .client
            .get_connection_with_timeout(self.config.connect_timeout)
            .map_err(|e| self.store_error(&e, Phase::Connect))?;
        let timeout = Some(self.config.command_timeout);
        con.set_read_timeout(timeout)
            .and_then(|()| con.set_write_timeout(timeout))
            .map_err(|e| self.store_error(&e, Phase::Connect))?;
        Ok(con)
    }

    fn give_back(&self, con: Connection) {
        let mut pool = self.pool.lock();
        if pool.len() < self.config.max_idle_connections && con.is_open() {
            pool.push(con);
        }
    }

    /// One `DEL` of the hash `name`; whether it existed.
    pub(crate) fn delete(&self, name: &str) -> Result<bool, StoreError> {
        let n: i64 = self.run(|con| redis::cmd("DEL").arg(name).query(con))?;
        Ok(n > 0)
    }

    /// Runs `op` on a pooled or new connection (see "Connections" in the module docs).
    pub(super) fn run<T>(
        &self,
        mut op: impl FnMut(&mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let pooled = self.pool.lock().pop();
        let reused = pooled.is_some();
        let mut con = match pooled {
            Some(con) => con,
            None => self.connect()?,
        };
        match op(&mut con) {
            Ok(v) => {
                self.give_back(con);
                Ok(v)
            }
            Err(e) if reused && !e.is_timeout() && e.is_connection_dropped() => {
                // The idle connection was dead (Redis restarted, or closed it): the
                // command reached no live server. The other idle ones are likely
                // dead too. Retry once on a fresh connection.
                drop(con);
                self.pool.lock().clear();
                let mut con = self.connect()?;
                let result = op(&mut con);
                self.finish(con, result)
            }
            Err(e) => self.finish(con, Err(e)),
        }
    }

    fn finish<T>(&self, con: Connection, result: redis::RedisResult<T>) -> Result<T, StoreError> {
        match result {
            Ok(v) => {
                self.give_back(con);
                Ok(v)
            }
            Err(e) => {
                // An error reply leaves the connection in step; anything else
                // (I/O, timeout, garbled reply) does not: drop it.
                if matches!(e.kind(), ErrorKind::Server(_) | ErrorKind::Extension) {
                    self.give_back(con);
                }
                Err(self.store_error(&e, Phase::Command))
            }
        }
    }

    fn store_error(&self, e: &RedisError, phase: Phase) -> StoreError {
        let url = self.config.redacted_url();
        if e.is_timeout() {
            return StoreError::Timeout(match phase {
                Phase::Connect => self.config.connect_timeout,
                Phase::Command => self.config.command_timeout,
            });
        }
        match e.kind() {
            ErrorKind::Io => StoreError::Unavailable(match phase {
                Phase::Connect => format!("cannot connect to Redis at {url}: {e}"),
                Phase::Command => format!("lost the connection to Redis at {url}: {e}"),
            }),
            ErrorKind::AuthenticationFailed => {
                StoreError::Unavailable(format!("Redis at {url} refused the credentials: {e}"))
            }
            ErrorKind::InvalidClientConfig => {
                StoreError::Unavailable(format!("bad Redis configuration for {url}: {e}"))
            }
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::NoPerm,
            ) => StoreError::Unavailable(format!("Redis at {url} cannot serve now: {e}")),
            _ => StoreError::Protocol(format!("Redis at {url}: {e}")),
        }
    }
}
