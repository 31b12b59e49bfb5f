//! The in-process server for integration tests, and a raw-protocol client.
//!
//! [`Server::start`] writes the configuration text to `ratelimit.toml` in a
//! directory (its own temporary one, or the test's with [`Server::start_in`]), loads
//! it as the daemon does (relative paths are relative to that directory, and
//! `admin reload` re-reads the file), and serves it with [`Daemon::run`] on
//! `127.0.0.1:0` at the times of one [`ManualClock`] starting at [`T0`]. Unless the
//! configuration says otherwise, there is no admin socket (tests run in parallel and
//! must not share the default path). [`Server::stop`] shuts it down gracefully and
//! checks that it stopped cleanly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ratelimit_core::{Clock, Limit, ManualClock, Timestamp};
use ratelimit_policyd::backend::{Backend, CallBounds};
use ratelimit_policyd::config::{self, ListenAddr};
use ratelimit_policyd::daemon::{self, Daemon};
use ratelimit_policyd::policy::{Incident, Observer, Verdict};
use ratelimit_policyd::protocol::PolicyRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// When every test server starts: 2023-11-14T22:00:00Z, a whole hour (so windows of
/// an hour or less start on their boundaries).
pub const T0: u64 = 1_699_999_200_000;

/// A running server. Dropping it without [`Server::stop`] stops it too, without
/// waiting.
pub struct Server {
    /// The first TCP listener's address (`0.0.0.0:0` when it listens on Unix
    /// sockets only).
    pub addr: SocketAddr,
    /// Every TCP listener's address, in configuration order.
    pub addrs: Vec<SocketAddr>,
    /// The daemon: its policy, server counts and operations.
    pub daemon: Daemon,
    /// The server's clock, at [`T0`] when it starts.
    pub clock: ManualClock,
    /// The configuration file (rewrite it, then `admin reload`).
    pub config_path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    /// The temporary directory, when the server made its own.
    _dir: Option<tempfile::TempDir>,
}

/// How to start a [`Server`]: [`Server::with`], options, then [`Start::start`].
pub struct Start<'a> {
    text: &'a str,
    dir: Option<&'a Path>,
    observer: Option<Arc<dyn Observer>>,
}

impl<'a> Start<'a> {
    /// Writes the configuration into `dir` (kept after the server stops) instead of
    /// a temporary directory of the server's own.
    pub fn dir(mut self, dir: &'a Path) -> Self {
        self.dir = Some(dir);
        self
    }

    /// Shows every verdict to `observer` too (e.g. an [`Incidents`] collector).
    pub fn observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Starts the server; returns once it serves (and its admin socket and metrics
    /// endpoint, if configured, are up).
    pub async fn start(self) -> Server {
        crate::support::logs::init_logs();
        let own_dir = match self.dir {
            Some(_) => None,
            None => Some(tempfile::tempdir().unwrap()),
        };
        let dir = self
            .dir
            .or(own_dir.as_ref().map(|d| d.path()))
            .unwrap()
            .to_path_buf();
        let config_path = dir.join("ratelimit.toml");
        std::fs::write(&config_path, self.text).unwrap();
        let builtin = config::builtin();
        let mut cfg =
            daemon::load_config(Some(&config_path), &[]).unwrap_or_else(|e| panic!("{e}"));
        // Port 0 unless the configuration names its listeners; no admin socket at
        // the default path.
        let mut listen: Vec<ListenAddr> = Vec::new();
        if cfg.server.listen == builtin.server.listen {
            listen = vec!["127.0.0.1:0".parse().unwrap()];
            cfg.server.listen = listen.clone();
        }
        if cfg.ops.admin.socket == builtin.ops.admin.socket {
            cfg.ops.admin.socket = None;
        }
        let clock = ManualClock::new(Timestamp::from_millis(T0));
        let backend = Backend::open(&cfg.store, CallBounds::of(&cfg.server), clock.now())
            .map_err(daemon::StartError::from)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut daemon = Daemon::with_backend(cfg, backend, Arc::new(clock.clone()), self.observer);
        daemon.reload_from(Some(config_path.clone()), listen);
        let listeners = daemon::bind(&daemon.policy.config()).await.unwrap();
        let addrs: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr()).collect();
        let (stop, stopped) = oneshot::channel::<()>();
        let running = daemon.clone();
        let task = tokio::spawn(async move {
            running
                .run(listeners, async {
                    let _ = stopped.await;
                })
                .await
        });
        daemon.ops.ready().await;
        Server {
            addr: addrs
                .first()
                .copied()
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            addrs,
            daemon,
            clock,
            config_path,
            stop: Some(stop),
            task: Some(task),
            _dir: own_dir,
        }
    }
}

impl Server {
    /// A server for this configuration text, in a temporary directory of its own.
    pub async fn start(text: &str) -> Server {
        Server::with(text).start().await
    }

    /// A server for this configuration text, written to `dir/ratelimit.toml`.
    pub async fn start_in(dir: &Path, text: &str) -> Server {
        Server::with(text).dir(dir).start().await
    }

    /// A server for this configuration text, with options.
    pub fn with(text: &str) -> Start<'_> {
        Start {
            text,
            dir: None,
            observer: None,
        }
    }

    /// The directory the configuration file is in.
    pub fn dir(&self) -> &Path {
        self.config_path.parent().unwrap()
    }

    /// A new connection to the first listener.
    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// Moves the server's clock forward.
    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }

    /// Units the store holds for `user` against `limit` (0 when not tracked).
    pub fn used(&self, user: &str, limit: &str) -> u64 {
        let limit: Limit = limit.parse().unwrap();
        let policy = &self.daemon.policy;
        let now = policy.now();
        let mut used = 0;
        policy
            .backend()
            .scan(&mut |key, state| {
                if key == user {
                    used = state.used(&limit, now);
                }
            })
            .unwrap();
        used
    }

    /// Stops the server gracefully and checks that it stopped cleanly (within 30 s,
    /// no panic, no error): connections finished, files flushed, the admin socket
    /// removed.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.task.take().unwrap())
            .await
            .expect("the server stops in time")
            .expect("the server task did not panic")
            .expect("the server returned Ok");
    }
}

/// An observer that keeps every incident the policy opens.
#[derive(Clone, Default)]
pub struct Incidents(Arc<Mutex<Vec<Incident>>>);

impl Incidents {
    /// The incidents so far, oldest first.
    pub fn all(&self) -> Vec<Incident> {
        self.0.lock().unwrap().clone()
    }
}

impl Observer for Incidents {
    fn decided(&self, _: u64, _: Timestamp, _: &PolicyRequest<'_>, verdict: &Verdict<'_>) {
        if !verdict.incidents.is_empty() {
            self.0
                .lock()
                .unwrap()
                .extend(verdict.incidents.iter().cloned());
        }
    }
}

/// Waits (up to 20 s of real time) until `cond` holds: for work done by another task
/// or process (an alert command, a webhook), not for time to pass.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One policy request: stage, user, instance, recipient count, size, client address
/// and sender, with every other attribute Postfix sends set to a fixed value.
#[derive(Clone, Debug)]
pub struct Req<'a> {
    pub stage: &'a str,
    pub user: &'a str,
    pub instance: &'a str,
    /// The message's recipients (sent as `recipient_count` except at RCPT, where
    /// Postfix sends 0).
    pub rcpts: u64,
    pub size: u64,
    pub client: &'a str,
    pub sender: &'a str,
}

impl<'a> Req<'a> {
    /// A request of `user` at `stage` for message `instance`: one recipient, 1000
    /// bytes, from 192.0.2.10.
    pub fn new(stage: &'a str, user: &'a str, instance: &'a str) -> Self {
        Req {
            stage,
            user,
            instance,
            rcpts: 1,
            size: 1000,
            client: "192.0.2.10",
            sender: "someone@example.com",
        }
    }

    /// The same request from `client`.
    pub fn from(mut self, client: &'a str) -> Self {
        self.client = client;
        self
    }

    /// The request's bytes, ending with the empty line.
    pub fn bytes(&self) -> Vec<u8> {
        let rcpt_count = if self.stage == "RCPT" { 0 } else { self.rcpts };
        format!(
            "request=smtpd_access_policy\nprotocol_state={}\nprotocol_name=ESMTP\n\
             client_address={}\nclient_name=client.example\nhelo_name=client.example\n\
             sender={}\nrecipient=rcpt@example.net\nrecipient_count={rcpt_count}\n\
             queue_id=\ninstance={}\nsize={}\nsasl_method=PLAIN\nsasl_username={}\n\n",
            self.stage, self.client, self.sender, self.instance, self.size, self.user
        )
        .into_bytes()
    }
}

/// A connection speaking the policy protocol in raw bytes. Every answer is returned
/// as the reply's action without `action=` (`DUNNO`, `DEFER_IF_PERMIT text`); a
/// reply that is not exactly one `action=` line and an empty line fails the test.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Client {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// Sends bytes without reading (for pipelining: read the replies with
    /// [`Client::reply`]).
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Sends raw bytes and reads one reply; `None` if the server closed the
    /// connection first.
    pub async fn raw(&mut self, bytes: &[u8]) -> Option<String> {
        self.stream.write_all(bytes).await.ok()?;
        self.reply().await
    }

    /// Reads one reply (within 10 s); `None` if the server closed the connection
    /// first.
    pub async fn reply(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let text = String::from_utf8_lossy(&self.buf[..pos]).to_string();
                self.buf.drain(..pos + 2);
                let action = text
                    .strip_prefix("action=")
                    .filter(|a| !a.contains('\n'))
                    .unwrap_or_else(|| panic!("not a reply: {text:?}"));
                return Some(action.to_string());
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
                .await
                .expect("no reply within 10 s")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends one request and reads its reply.
    pub async fn ask(&mut self, req: &Req<'_>) -> String {
        self.raw(&req.bytes()).await.expect("connection closed")
    }

    /// Sends a request of exactly these attributes (after `request=smtpd_access_policy`)
    /// and reads its reply.
    pub async fn ask_attrs(&mut self, attrs: &[(&str, &str)]) -> String {
        let mut req = String::from("request=smtpd_access_policy\n");
        for (k, v) in attrs {
            req.push_str(&format!("{k}={v}\n"));
        }
        req.push('\n');
        self.raw(req.as_bytes()).await.expect("connection closed")
    }

    /// Sends one message as Postfix does: RCPT per recipient, DATA, END-OF-MESSAGE.
    /// Returns the first answer that is not `DUNNO`, or `DUNNO`.
    pub async fn message(&mut self, user: &str, instance: &str, rcpts: u64) -> String {
        let mut req = Req::new("RCPT", user, instance);
        req.rcpts = rcpts;
        for _ in 0..rcpts {
            let a = self.ask(&req).await;
            if a != "DUNNO" {
                return a;
            }
        }
        req.stage = "DATA";
        let a = self.ask(&req).await;
        if a != "DUNNO" {
            return a;
        }
        req.stage = "END-OF-MESSAGE";
        self.ask(&req).await
    }

    /// END-OF-MESSAGE for one message of `user` from `client` (one recipient).
    pub async fn eom(&mut self, user: &str, instance: &str, client: &str) -> String {
        self.ask(&Req::new("END-OF-MESSAGE", user, instance).from(client))
            .await
    }

    /// RCPT for `user` from `client` (a peek: refused when blocked, nothing counted).
    pub async fn rcpt(&mut self, user: &str, instance: &str, client: &str) -> String {
        self.ask(&Req::new("RCPT", user, instance).from(client))
            .await
    }

    /// True when the server has closed the connection (EOF within 5 s).
    pub async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}
