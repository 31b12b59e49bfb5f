//! The store's connections to Redis: one server or a Redis Cluster, a small pool of
//! idle synchronous connections, timeouts on every connect and command, bounded
//! retries, and Redis errors mapped to [`StoreError`] (see "Connections" and
//! "Redis Cluster" in the [module docs](super)).

use std::thread;
use std::time::{Duration, Instant};

use redis::cluster::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, SingleNodeRoutingInfo,
};
use redis::{
    Cmd, Connection, ConnectionLike, ErrorKind, RedisError, RedisResult, ServerErrorKind, Value,
};

use super::RedisStore;
use super::client::Client;
use crate::store::StoreError;

/// What the store was doing when Redis failed (picks the timeout and the wording).
#[derive(Clone, Copy)]
enum Phase {
    Connect,
    Command,
}

/// The pause between two attempts of a cluster command that failed because the
/// cluster is changing (a node down, a failover, a slot moving).
const CLUSTER_RETRY_PAUSE: Duration = Duration::from_millis(25);

/// One connection: to the server, or to every node of the cluster (with the slot map
/// read when it was opened).
pub(super) enum Conn {
    Single(Connection),
    Cluster {
        con: Box<ClusterConnection>,
        /// A reply said the slot map is out of date (`MOVED`, `READONLY`): the
        /// connection is closed after this use, and the next one reads the map again.
        stale: bool,
    },
}

impl Conn {
    /// The masters of a cluster (`host`, `port`), from `CLUSTER SLOTS`; `[None]` for
    /// one server. [`Conn::scan_page`] walks each.
    pub(super) fn masters(&mut self) -> RedisResult<Vec<Option<(String, u16)>>> {
        let Conn::Cluster { con, .. } = self else {
            return Ok(vec![None]);
        };
        let slots: Value = con.req_command(redis::cmd("CLUSTER").arg("SLOTS"))?;
        let mut masters = Vec::new();
        let Value::Array(ranges) = slots else {
            return Err(unexpected("CLUSTER SLOTS", &slots));
        };
        for range in &ranges {
            // [start, end, [host, port, id, ...], replicas...]
            let master = match range {
                Value::Array(items) => items.get(2),
                _ => None,
            };
            let parsed = match master {
                Some(Value::Array(node)) => match (node.first(), node.get(1)) {
                    (Some(host), Some(Value::Int(port))) => {
                        redis::from_redis_value_ref::<String>(host)
                            .ok()
                            .zip(u16::try_from(*port).ok())
                    }
                    _ => None,
                },
                _ => None,
            };
            let Some(node) = parsed else {
                return Err(unexpected("CLUSTER SLOTS", range));
            };
            if !masters.contains(&Some(node.clone())) {
                masters.push(Some(node));
            }
        }
        Ok(masters)
    }

    /// One `SCAN` step on `node` (a master from [`Conn::masters`]).
    pub(super) fn scan_page(
        &mut self,
        node: Option<&(String, u16)>,
        cursor: u64,
        pattern: &str,
    ) -> RedisResult<(u64, Vec<String>)> {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000);
        match (self, node) {
            (Conn::Cluster { con, .. }, Some((host, port))) => {
                let value = con.route_command(&scan, by_address(host, *port))?;
                Ok(redis::from_redis_value(value.extract_error()?)?)
            }
            (con, _) => scan.query(con),
        }
    }

    /// Cuts the read and write timeouts to what is left until `deadline` when that is
    /// less than `timeout` (a timeout error once nothing is left).
    pub(super) fn fit(&self, deadline: Instant, timeout: Duration) -> RedisResult<bool> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the batch's time is up",
            )));
        }
        if left < timeout {
            self.set_timeouts(left)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Sets the read and write timeouts of every node connection.
    fn set_timeouts(&self, timeout: Duration) -> RedisResult<()> {
        match self {
            Conn::Single(con) => {
                con.set_read_timeout(Some(timeout))?;
                con.set_write_timeout(Some(timeout))
            }
            Conn::Cluster { con, .. } => {
                con.set_read_timeout(Some(timeout))?;
                con.set_write_timeout(Some(timeout))
            }
        }
    }

    /// `HGETALL` of every name, in one pipelined round trip per node.
    pub(super) fn hgetall_all(
        &mut self,
        names: &[String],
    ) -> RedisResult<Vec<Vec<(String, String)>>> {
        match self {
            Conn::Single(con) => {
                let mut pipe = redis::pipe();
                for name in names {
                    pipe.cmd("HGETALL").arg(name);
                }
                pipe.query(con)
            }
            Conn::Cluster { con, .. } => {
                let mut pipe = redis::cluster::cluster_pipe();
                for name in names {
                    pipe.cmd("HGETALL").arg(name);
                }
                pipe.query(con)
            }
        }
    }
}

fn unexpected(what: &str, value: &Value) -> RedisError {
    RedisError::from((
        ErrorKind::UnexpectedReturnType,
        "unexpected reply",
        format!("{what} answered {value:?}"),
    ))
}

fn by_address(host: &str, port: u16) -> RoutingInfo {
    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
        host: host.to_string(),
        port,
    })
}

/// Whether `cmd` is `SCRIPT LOAD` or `FUNCTION LOAD`.
fn is_code_load(cmd: &Cmd) -> bool {
    let mut args = cmd.args_iter().map(|a| match a {
        redis::Arg::Simple(bytes) => bytes,
        _ => &b""[..],
    });
    args.next()
        .is_some_and(|a| a.eq_ignore_ascii_case(b"SCRIPT") || a.eq_ignore_ascii_case(b"FUNCTION"))
        && args.next().is_some_and(|a| a.eq_ignore_ascii_case(b"LOAD"))
}

/// `cmd` on a cluster: routed by its key to the slot's master, following one `MOVED`
/// or `ASK` redirection (the client itself is built without retries).
fn cluster_command(con: &mut ClusterConnection, stale: &mut bool, cmd: &Cmd) -> RedisResult<Value> {
    if is_code_load(cmd) {
        // Scripts are cached per node and not replicated, and a function library
        // loaded on one master is not on the others: load on every master (a master
        // that is down is skipped; it will answer NOSCRIPT, or that the function is
        // not found, once it is back).
        let route = RoutingInfo::MultiNode((
            MultipleNodeRoutingInfo::AllMasters,
            Some(ResponsePolicy::OneSucceeded),
        ));
        return con.route_command(cmd, route);
    }
    let err = match con.req_command(cmd) {
        Err(e) => e,
        ok => return ok,
    };
    match err.kind() {
        ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::Ask) => {
            let asking = err.kind() == ErrorKind::Server(ServerErrorKind::Ask);
            // MOVED: the slot map is out of date. ASK: the slot is migrating and this
            // key already moved; the map stays right for the slot's other keys.
            *stale |= !asking;
            let Some((host, port)) = err
                .redirect_node()
                .and_then(|(addr, _)| addr.rsplit_once(':'))
                .and_then(|(host, port)| Some((host.to_string(), port.parse::<u16>().ok()?)))
            else {
                return Err(err);
            };
            if asking {
                con.route_command(&redis::cmd("ASKING"), by_address(&host, port))?
                    .extract_error()?;
            }
            con.route_command(cmd, by_address(&host, port))?
                .extract_error()
        }
        ErrorKind::Server(ServerErrorKind::ReadOnly) => {
            // A write reached a replica: a failover happened since the map was read.
            *stale = true;
            Err(err)
        }
        _ => Err(err),
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        match self {
            Conn::Single(con) => con.req_packed_command(cmd),
            Conn::Cluster { con, .. } => con.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        match self {
            Conn::Single(con) => con.req_packed_commands(cmd, offset, count),
            Conn::Cluster { con, .. } => con.req_packed_commands(cmd, offset, count),
        }
    }

    fn req_command(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Conn::Single(con) => con.req_command(cmd),
            Conn::Cluster { con, stale } => cluster_command(con, stale, cmd),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(con) => con.get_db(),
            Conn::Cluster { con, .. } => con.get_db(),
        }
    }

    fn supports_pipelining(&self) -> bool {
        match self {
            Conn::Single(con) => con.supports_pipelining(),
            Conn::Cluster { con, .. } => con.supports_pipelining(),
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            Conn::Single(con) => con.check_connection(),
            Conn::Cluster { con, .. } => con.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Conn::Single(con) => con.is_open(),
            Conn::Cluster { con, stale } => !*stale && con.is_open(),
        }
    }
}

/// Whether a cluster command that failed with `e` may be sent again: the cluster is
/// changing and the command did not run (or, for a dropped connection, the node that
/// may have run it is gone).
fn cluster_retryable(e: &RedisError) -> bool {
    if e.is_timeout() {
        return false;
    }
    match e.kind() {
        ErrorKind::Io | ErrorKind::ClusterConnectionNotFound => true,
        ErrorKind::Server(kind) => matches!(
            kind,
            ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::TryAgain
                | ServerErrorKind::MasterDown
                | ServerErrorKind::BusyLoading
        ),
        _ => false,
    }
}

impl RedisStore {
    fn open(&self) -> RedisResult<Conn> {
        self.open_within(self.config.connect_timeout)
    }

    /// A new connection, opened within `connect_timeout` (one server; a cluster
    /// uses the configured timeouts).
    fn open_within(&self, connect_timeout: Duration) -> RedisResult<Conn> {
        match &self.client {
            Client::Single(client) => {
                let con = client.get_connection_with_timeout(connect_timeout)?;
                let timeout = Some(self.config.command_timeout);
                con.set_read_timeout(timeout)?;
                con.set_write_timeout(timeout)?;
                Ok(Conn::Single(con))
            }
            Client::Cluster(client) => {
                // Connects to the first seed that answers, reads the slot map, and
                // connects to every node in it.
                let con = client.get_connection()?;
                con.set_write_timeout(Some(self.config.command_timeout))?;
                Ok(Conn::Cluster {
                    con: Box::new(con),
                    stale: false,
                })
            }
        }
    }

    fn give_back(&self, con: Conn) {
        let mut pool = self.pool.lock();
        if let Conn::Cluster { stale: true, .. } = con {
            // A reply said the slot map changed: the idle connections have the old
            // one too. Close them all; the next ones read the map afresh.
            pool.clear();
            return;
        }
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
        op: impl FnMut(&mut Conn) -> RedisResult<T>,
    ) -> Result<T, StoreError> {
        match self.client {
            Client::Single(_) => self.run_single(op),
            Client::Cluster(_) => self.run_cluster(op),
        }
    }

    /// [`RedisStore::run`] on one server, with every step bounded by `deadline` if
    /// given: a connection is opened within what is left, and `op` gets a
    /// connection whose timeouts it may cut to what is left (with [`Conn::fit`],
    /// setting its `bool`); they are restored before the connection goes back to the
    /// pool.
    pub(super) fn run_until<T>(
        &self,
        deadline: Option<Instant>,
        mut op: impl FnMut(&mut Conn, &mut bool) -> RedisResult<T>,
    ) -> Result<T, StoreError> {
        let open = || {
            let timeout = match deadline {
                None => self.config.connect_timeout,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(StoreError::Timeout(self.config.command_timeout));
                    }
                    left.min(self.config.connect_timeout)
                }
            };
            self.open_within(timeout)
                .map_err(|e| self.store_error(&e, Phase::Connect))
        };
        let pooled = self.pool.lock().pop();
        let reused = pooled.is_some();
        let mut con = match pooled {
            Some(con) => con,
            None => open()?,
        };
        let mut cut = false;
        let mut result = op(&mut con, &mut cut);
        if let Err(e) = &result
            && reused
            && !e.is_timeout()
            && e.is_connection_dropped()
        {
            // The idle connection was dead (Redis restarted, or closed it): the
            // command reached no live server. The other idle ones are likely dead
            // too. Retry once on a fresh connection.
            drop(con);
            self.pool.lock().clear();
            con = open()?;
            cut = false;
            result = op(&mut con, &mut cut);
        }
        if cut && con.set_timeouts(self.config.command_timeout).is_err() {
            // Not back to its own timeouts: not for the pool.
            return result.map_err(|e| self.store_error(&e, Phase::Command));
        }
        self.finish(con, result)
    }

    fn run_single<T>(
        &self,
        mut op: impl FnMut(&mut Conn) -> RedisResult<T>,
    ) -> Result<T, StoreError> {
        self.run_until(None, |con, _| op(con))
    }

    /// A cluster command: attempts on pooled or new connections until one succeeds, a
    /// failure is final (a timeout, a script error), or `command_timeout` has passed
    /// since the first attempt. A connection that saw a failure other than an error
    /// reply is closed, so the next attempt reads the slot map afresh.
    fn run_cluster<T>(
        &self,
        mut op: impl FnMut(&mut Conn) -> RedisResult<T>,
    ) -> Result<T, StoreError> {
        let deadline = Instant::now() + self.config.command_timeout;
        let mut shortened = None;
        loop {
            match self.cluster_attempt(&mut op, shortened) {
                Ok(v) => return Ok(v),
                Err((StoreError::Timeout(d), _)) => return Err(StoreError::Timeout(d)),
                Err((e, retry)) => {
                    if !retry || Instant::now() + CLUSTER_RETRY_PAUSE >= deadline {
                        return Err(e);
                    }
                    thread::sleep(CLUSTER_RETRY_PAUSE);
                    // A retry may wait on a reply only for what is left of the budget.
                    shortened = Some(
                        deadline
                            .saturating_duration_since(Instant::now())
                            .max(Duration::from_millis(1)),
                    );
                }
            }
        }
    }

    /// One attempt of [`RedisStore::run_cluster`], with the command timeout
    /// `shortened` if given; the error says whether to try again.
    fn cluster_attempt<T>(
        &self,
        op: &mut impl FnMut(&mut Conn) -> RedisResult<T>,
        shortened: Option<Duration>,
    ) -> Result<T, (StoreError, bool)> {
        let pooled = self.pool.lock().pop();
        let mut con = match pooled {
            Some(con) => Ok(con),
            None => self.open(),
        }
        .and_then(|con| match shortened {
            Some(left) => con.set_timeouts(left).map(|()| con),
            None => Ok(con),
        })
        .map_err(|e| (self.store_error(&e, Phase::Connect), cluster_retryable(&e)))?;
        let result = op(&mut con);
        // An error reply leaves the connections in step; anything else (I/O, a
        // timeout, a garbled reply) does not: drop them.
        let in_step = match &result {
            Ok(_) => true,
            Err(e) => matches!(e.kind(), ErrorKind::Server(_) | ErrorKind::Extension),
        };
        let restored = match shortened {
            Some(_) if in_step => con.set_timeouts(self.config.command_timeout),
            _ => Ok(()),
        };
        if in_step && restored.is_ok() {
            self.give_back(con);
        }
        result.map_err(|e| {
            if matches!(
                e.kind(),
                ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::ReadOnly)
            ) {
                // Every idle connection has the same out-of-date slot map.
                self.pool.lock().clear();
            }
            (self.store_error(&e, Phase::Command), cluster_retryable(&e))
        })
    }

    fn finish<T>(&self, con: Conn, result: RedisResult<T>) -> Result<T, StoreError> {
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

    /// A failed command's error, as [`StoreError`].
    pub(super) fn command_error(&self, e: &RedisError) -> StoreError {
        self.store_error(e, Phase::Command)
    }

    fn store_error(&self, e: &RedisError, phase: Phase) -> StoreError {
        let at = &self.endpoint;
        if e.is_timeout() {
            return StoreError::Timeout(match phase {
                Phase::Connect => self.config.connect_timeout,
                Phase::Command => self.config.command_timeout,
            });
        }
        match (e.kind(), phase) {
            (ErrorKind::AuthenticationFailed, _) => {
                StoreError::Unavailable(format!("Redis at {at} refused the credentials: {e}"))
            }
            (ErrorKind::InvalidClientConfig, _) => {
                StoreError::Unavailable(format!("bad Redis configuration for {at}: {e}"))
            }
            (_, Phase::Connect) => StoreError::Unavailable(format!(
                "cannot connect to Redis at {at}: {e}{}",
                self.hint(e)
            )),
            (ErrorKind::Io | ErrorKind::ClusterConnectionNotFound, Phase::Command) => {
                StoreError::Unavailable(format!("lost the connection to Redis at {at}: {e}"))
            }
            (
                ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
                    | ServerErrorKind::Moved
                    | ServerErrorKind::Ask
                    | ServerErrorKind::NoPerm,
                ),
                _,
            ) => StoreError::Unavailable(format!("Redis at {at} cannot serve now: {e}")),
            _ => StoreError::Protocol(format!("Redis at {at}: {e}")),
        }
    }

    /// A hint for a connect error that is likely a TLS mismatch.
    fn hint(&self, e: &RedisError) -> &'static str {
        let tls = self.endpoint.contains("rediss://");
        let text = e.to_string().to_ascii_lowercase();
        if tls
            && (text.contains("certificate") || text.contains("tls") || text.contains("handshake"))
        {
            " (the TLS handshake failed: check redis_ca_file, the server's certificate and \
             its host name)"
        } else if !tls
            && !self.config.is_cluster()
            && e.is_connection_dropped()
            && !e.is_connection_refusal()
        {
            " (the server closed the connection: if it speaks only TLS, use a rediss:// URL)"
        } else {
            ""
        }
    }
}
