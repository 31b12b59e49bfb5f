//! A real server on 127.0.0.1:0 with a manual clock, and a raw-protocol client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ratelimit_core::{ManualClock, Timestamp};
use ratelimit_policyd::config::ListenAddr;
use ratelimit_policyd::daemon;
use ratelimit_policyd::policy::Engine;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// 2023-11-14T22:13:20Z.
pub const T0: u64 = 1_700_000_000_000;

pub struct Server {
    pub addr: SocketAddr,
    pub engine: Arc<Engine>,
    pub clock: ManualClock,
    pub config_path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<std::io::Result<()>>,
}

/// Writes `toml` to `dir/ratelimit.toml` and serves it (listening on 127.0.0.1:0), with
/// the clock at `T0`. Relative paths in the config are relative to `dir`.
pub async fn start(dir: &Path, toml: &str) -> Server {
    start_at(dir, toml, ManualClock::new(Timestamp::from_millis(T0))).await
}

pub async fn start_at(dir: &Path, toml: &str, clock: ManualClock) -> Server {
    init_logs();
    let config_path = dir.join("ratelimit.toml");
    std::fs::write(&config_path, toml).unwrap();
    let listen: ListenAddr = "127.0.0.1:0".parse().unwrap();
    let cfg = daemon::load_config(Some(&config_path), &[listen]).unwrap_or_else(|e| panic!("{e}"));
    let engine = daemon::build_engine(cfg, Arc::new(clock.clone())).unwrap();
    let listeners = daemon::bind(&engine.config()).await.unwrap();
    let addr = listeners[0].local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(ratelimit_policyd::server::run(
        listeners,
        Arc::clone(&engine),
        async {
            let _ = rx.await;
        },
    ));
    engine.ops.ready().await;
    Server {
        addr,
        engine,
        clock,
        config_path,
        stop: Some(tx),
        handle,
    }
}

impl Server {
    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// Stops the server and waits until it has (connections closed, files flushed).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.handle).await.unwrap().unwrap();
    }
}

pub struct Client {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        Client {
            r: BufReader::new(r),
            w,
        }
    }

    /// Sends the attributes as one request; returns the `action=` line's value.
    pub async fn ask(&mut self, attrs: &[(&str, &str)]) -> String {
        let mut req = String::from("request=smtpd_access_policy\n");
        for (k, v) in attrs {
            req.push_str(&format!("{k}={v}\n"));
        }
        req.push('\n');
        self.w.write_all(req.as_bytes()).await.unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).await.unwrap();
        let mut blank = String::new();
        self.r.read_line(&mut blank).await.unwrap();
        assert_eq!(blank, "\n", "reply not terminated by an empty line");
        line.trim_end()
            .strip_prefix("action=")
            .unwrap_or_else(|| panic!("not a reply: {line:?}"))
            .to_string()
    }

    /// END-OF-MESSAGE for one message of `user` from `client`.
    pub async fn eom(&mut self, user: &str, instance: &str, client: &str) -> String {
        self.ask(&[
            ("protocol_state", "END-OF-MESSAGE"),
            ("sasl_username", user),
            ("client_address", client),
            ("instance", instance),
            ("recipient_count", "1"),
            ("size", "1000"),
        ])
        .await
    }

    /// RCPT for `user` (a peek: refused when blocked, nothing counted).
    pub async fn rcpt(&mut self, user: &str, instance: &str, client: &str) -> String {
        self.ask(&[
            ("protocol_state", "RCPT"),
            ("sasl_username", user),
            ("client_address", client),
            ("instance", instance),
            ("recipient", "someone@example.net"),
        ])
        .await
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

/// Log lines captured by a test subscriber.
#[derive(Clone, Default)]
pub struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

thread_local! {
    static CURRENT: std::cell::RefCell<Option<tracing::Dispatch>> = const { std::cell::RefCell::new(None) };
}

/// The global subscriber of the test binary: forwards to this thread's capturing
/// subscriber, if any. (Scoped `set_default` subscribers share tracing's global
/// callsite cache, so tests running in parallel could disable each other's events.)
struct PerThread;

fn with_current<T>(f: impl FnOnce(&tracing::Dispatch) -> T) -> Option<T> {
    CURRENT.with(|c| c.borrow().as_ref().map(f))
}

impl tracing::Subscriber for PerThread {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        with_current(|d| d.enabled(m)).unwrap_or(false)
    }
    fn new_span(&self, a: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        with_current(|d| d.new_span(a)).unwrap_or_else(|| tracing::span::Id::from_u64(1))
    }
    fn record(&self, id: &tracing::span::Id, v: &tracing::span::Record<'_>) {
        with_current(|d| d.record(id, v));
    }
    fn record_follows_from(&self, a: &tracing::span::Id, b: &tracing::span::Id) {
        with_current(|d| d.record_follows_from(a, b));
    }
    fn event(&self, e: &tracing::Event<'_>) {
        with_current(|d| d.event(e));
    }
    fn enter(&self, id: &tracing::span::Id) {
        with_current(|d| d.enter(id));
    }
    fn exit(&self, id: &tracing::span::Id) {
        with_current(|d| d.exit(id));
    }
}

/// A scoped subscriber that forwards to one capturing subscriber, and, like
/// [`PerThread`], never lets tracing cache a callsite as disabled. The server hands
/// the scoped default of the thread that accepted a connection to the thread that
/// serves it, so a test captures its own server's connection threads too.
struct Fixed(tracing::Dispatch);

impl tracing::Subscriber for Fixed {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        self.0.enabled(m)
    }
    fn new_span(&self, a: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        self.0.new_span(a)
    }
    fn record(&self, id: &tracing::span::Id, v: &tracing::span::Record<'_>) {
        self.0.record(id, v);
    }
    fn record_follows_from(&self, a: &tracing::span::Id, b: &tracing::span::Id) {
        self.0.record_follows_from(a, b);
    }
    fn event(&self, e: &tracing::Event<'_>) {
        self.0.event(e);
    }
    fn enter(&self, id: &tracing::span::Id) {
        self.0.enter(id);
    }
    fn exit(&self, id: &tracing::span::Id) {
        self.0.exit(id);
    }
}

/// Installs [`PerThread`] as the global subscriber (once per test binary).
pub fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(PerThread);
    });
}

/// Stops capturing on this thread when dropped.
pub struct Capture(#[allow(dead_code)] tracing::dispatcher::DefaultGuard);

impl Drop for Capture {
    fn drop(&mut self) {
        CURRENT.with(|c| c.borrow_mut().take());
    }
}

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Captures this thread's logs at `level` (text format) until the guard is dropped.
    /// Tests run the server on a current-thread runtime, so its tasks log on this thread.
    pub fn capture(&self, level: tracing::Level) -> Capture {
        let logs = self.clone();
        self.capture_with(
            tracing_subscriber::fmt()
                .with_max_level(level)
                .with_ansi(false)
                .with_writer(move || logs.clone())
                .finish(),
        )
    }

    /// Captures in JSON.
    pub fn capture_json(&self, level: tracing::Level) -> Capture {
        let logs = self.clone();
        self.capture_with(
            tracing_subscriber::fmt()
                .json()
                .with_max_level(level)
                .with_ansi(false)
                .with_writer(move || logs.clone())
                .finish(),
        )
    }

    fn capture_with(&self, sub: impl tracing::Subscriber + Send + Sync + 'static) -> Capture {
        init_logs();
        let dispatch = tracing::Dispatch::new(sub);
        CURRENT.with(|c| *c.borrow_mut() = Some(dispatch.clone()));
        Capture(tracing::dispatcher::set_default(&tracing::Dispatch::new(
            Fixed(dispatch),
        )))
    }
}
