//! Load generator for the Postfix policy delegation protocol.
//!
//! Each connection behaves like one Postfix smtpd process: one outstanding
//! request at a time (write a request, read the whole `action=...\n\n`
//! reply, then the next), on a persistent connection that is reopened only
//! after an error. Requests are rendered once per connection and patched in
//! place (user number, `instance`, `queue_id`), so the generator does not
//! allocate per request. See `benches/README.md` for the options.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use ratelimit_benches::duration::parse_duration;
use ratelimit_benches::reply::{ActionCounts, MAX_REPLY, Status, parse_reply};
use ratelimit_benches::request::{MessageStream, Mix, StreamConfig};
use ratelimit_benches::users::{Dist, UserPicker};

/// Load generator for Postfix policy servers (one outstanding request per
/// connection, like Postfix).
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
struct Args {
    /// Server address: HOST:PORT, or unix:/path for a Unix socket.
    #[arg(long, default_value = "127.0.0.1:10031")]
    addr: String,
    /// Number of persistent connections (each is one simulated smtpd).
    #[arg(short = 'c', long, default_value_t = 16)]
    connections: u32,
    /// Number of distinct SASL users (u0..u(N-1)@example.com).
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// How the sender of each message is drawn.
    #[arg(long, value_enum, default_value_t = Dist::Uniform)]
    dist: Dist,
    /// Exponent s of --dist zipf (P(rank k) ~ 1/k^s).
    #[arg(long, default_value_t = 1.0)]
    zipf_exponent: f64,
    /// Send messages from users 0, 1, 2, ... in order (shared by all
    /// connections) instead of drawing them; N messages touch N users.
    #[arg(long)]
    users_sequential: bool,
    /// How long to measure (after the warm-up), e.g. 10s, 500ms, 1m.
    /// With --requests it is only an upper bound.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many measured requests instead of after --duration.
    #[arg(long)]
    requests: Option<u64>,
    /// Run this long before measuring (requests sent then are not counted).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Request stream: eom = one END-OF-MESSAGE per message; postfix = RCPT
    /// per recipient, DATA, END-OF-MESSAGE with one instance.
    #[arg(long, value_enum, default_value_t = Mix::Eom)]
    mix: Mix,
    /// Recipients per message.
    #[arg(long, default_value_t = 1)]
    recipients: u32,
    /// Give up on a request (and reconnect) after this long.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    timeout: Duration,
    /// I/O back end: one OS thread per connection, or tokio tasks.
    #[arg(long, value_enum, default_value_t = Runtime::Threads)]
    runtime: Runtime,
    /// Worker threads for --runtime tokio (1 = current-thread runtime).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Seed for the user draws (connection i uses seed + i).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also report the CPU time this process (the server) used while
    /// measuring, from /proc/PID/stat.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Also report the CPU time of this process (the server's back end, e.g.
    /// a redis-server) while measuring, from /proc/PID/stat.
    #[arg(long)]
    backend_pid: Option<u32>,
    /// Print the result as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Runtime {
    Threads,
    Tokio,
}

#[derive(Debug, Clone)]
enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Addr {
    fn parse(s: &str) -> io::Result<Addr> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Addr::Unix(path.into()));
        }
        s.to_socket_addrs()?
            .next()
            .map(Addr::Tcp)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "address did not resolve"))
    }
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// Run phase and request budget, shared by every connection.
struct Control {
    phase: AtomicU8,
    budget: Option<u64>,
    issued: AtomicU64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Next {
    Stop,
    /// Send, but do not count (warm-up).
    Warmup,
    /// Send and count.
    Measure,
}

impl Control {
    fn next(&self) -> Next {
        match self.phase.load(Ordering::Relaxed) {
            WARMUP => Next::Warmup,
            MEASURE => match self.budget {
                Some(n) if self.issued.fetch_add(1, Ordering::Relaxed) >= n => Next::Stop,
                _ => Next::Measure,
            },
            _ => Next::Stop,
        }
    }

    fn stopped(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == STOP
    }

    fn measuring(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == MEASURE
    }
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
struct Errors {
    /// Connection attempts that failed.
    connect: u64,
    /// Write or read errors, and the server closing the connection.
    io: u64,
    /// Requests not answered within --timeout.
    timeout: u64,
    /// Replies that are not `action=...` + empty line, or extra bytes.
    malformed: u64,
}

impl Errors {
    fn add(&mut self, o: &Errors) {
        self.connect += o.connect;
        self.io += o.io;
        self.timeout += o.timeout;
        self.malformed += o.malformed;
    }

    fn total(&self) -> u64 {
        self.connect + self.io + self.timeout + self.malformed
    }
}

/// What one connection measured.
struct Stats {
    /// Latency of each measured request, in nanoseconds.
    hist: Histogram<u64>,
    actions: ActionCounts,
    requests: u64,
    errors: Errors,
    /// When this connection sent its last request and got its reply.
    finished: Option<Instant>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"),
            actions: ActionCounts::default(),
            requests: 0,
            errors: Errors::default(),
            finished: None,
        }
    }

    fn merge(&mut self, o: &Stats) {
        self.hist.add(&o.hist).expect("same bounds");
        self.actions.merge(&o.actions);
        self.requests += o.requests;
        self.errors.add(&o.errors);
        self.finished = self.finished.max(o.finished);
    }
}

/// Why one request/reply exchange failed.
enum Failure {
    Io,
    Timeout,
    Malformed,
}

impl Failure {
    fn from_io(e: &io::Error) -> Failure {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Failure::Timeout,
            _ => Failure::Io,
        }
    }

    fn count(&self, errors: &mut Errors) {
        match self {
            Failure::Io => errors.io += 1,
            Failure::Timeout => errors.timeout += 1,
            Failure::Malformed => errors.malformed += 1,
        }
    }
}

/// The request stream of one connection.
struct Generator {
    stream: MessageStream,
    picker: UserPicker,
    rng: SmallRng,
    /// Index of the next request within the current message.
    next: usize,
    message: u64,
}

impl Generator {
    fn next_request(&mut self) -> &[u8] {
        if self.next == 0 {
            let user = self.picker.pick(&mut self.rng);
            self.message += 1;
            self.stream.begin_message(user, self.message);
        }
        let i = self.next;
        self.next = (i + 1) % self.stream.requests_per_message();
        self.stream.request(i)
    }

    /// After an error the message in progress is abandoned, as Postfix
    /// would abort the SMTP transaction.
    fn abandon_message(&mut self) {
        self.next = 0;
    }
}

/// Reply buffer of one connection, reused for every reply.
struct ReplyBuf {
    buf: Vec<u8>,
    len: usize,
}

impl ReplyBuf {
    fn new() -> ReplyBuf {
        ReplyBuf {
            buf: vec![0; 512],
            len: 0,
        }
    }

    /// Room to read into, growing up to just past `MAX_REPLY`.
    fn spare(&mut self) -> &mut [u8] {
        if self.len == self.buf.len() {
            let grown = (self.buf.len() * 2).min(MAX_REPLY + 1);
            self.buf.resize(grown.max(self.len + 1), 0);
        }
        &mut self.buf[self.len..]
    }

    /// After `n` more bytes: `Some(action)` once a whole reply is present.
    fn filled(&mut self, n: usize) -> Result<Option<Range<usize>>, Failure> {
        self.len += n;
        match parse_reply(&self.buf[..self.len]) {
            Ok(Status::Partial) => Ok(None),
            // Bytes past the reply answer a request that was never sent.
            Ok(Status::Complete { len, action }) if len == self.len => Ok(Some(action)),
            Ok(Status::Complete { .. }) | Err(_) => Err(Failure::Malformed),
        }
    }
}

/// Everything one connection owns.
struct Conn {
    generator: Generator,
    reply: ReplyBuf,
    stats: Stats,
}

impl Conn {
    fn new(args: &Args, index: u32, picker: UserPicker) -> Conn {
        let cfg = StreamConfig {
            mix: args.mix,
            recipients: args.recipients,
            users: args.users,
            connection: index,
        };
        Conn {
            generator: Generator {
                stream: MessageStream::new(&cfg),
                picker,
                rng: SmallRng::seed_from_u64(args.seed.wrapping_add(u64::from(index))),
                next: 0,
                message: 0,
            },
            reply: ReplyBuf::new(),
            stats: Stats::new(),
        }
    }

    fn record(&mut self, next: Next, started: Instant, action: Range<usize>) {
        if next == Next::Measure {
            let now = Instant::now();
            let ns = now.duration_since(started).as_nanos() as u64;
            self.stats.hist.saturating_record(ns.max(1));
            self.stats.actions.add(&self.reply.buf[action]);
            self.stats.requests += 1;
            self.stats.finished = Some(now);
        }
    }

    fn fail(&mut self, failure: Failure, control: &Control) {
        if control.measuring() {
            failure.count(&mut self.stats.errors);
        }
        self.generator.abandon_message();
    }
}

/// Pause between failed connection attempts, doubled up to a limit.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(Duration::from_millis(10))
    }

    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_millis(500));
        d
    }
}

// ---------------------------------------------------------------------------
// Back end 1: one OS thread per connection, blocking I/O.

enum SyncStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl SyncStream {
    fn connect(addr: &Addr, timeout: Duration) -> io::Result<SyncStream> {
        let s = match addr {
            Addr::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, timeout)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                SyncStream::Tcp(s)
            }
            Addr::Unix(p) => {
                let s = UnixStream::connect(p)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                SyncStream::Unix(s)
            }
        };
        Ok(s)
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            SyncStream::Tcp(s) => s.write_all(b),
            SyncStream::Unix(s) => s.write_all(b),
        }
    }

    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            SyncStream::Tcp(s) => s.read(b),
            SyncStream::Unix(s) => s.read(b),
        }
    }
}

/// One request and its reply; returns the action word's range.
fn exchange_sync(
    s: &mut SyncStream,
    generator: &mut Generator,
    reply: &mut ReplyBuf,
) -> Result<Range<usize>, Failure> {
    s.write_all(generator.next_request())
        .map_err(|e| Failure::from_io(&e))?;
    reply.len = 0;
    loop {
        let n = s.read(reply.spare()).map_err(|e| Failure::from_io(&e))?;
        if n == 0 {
            return Err(Failure::Io);
        }
        if let Some(action) = reply.filled(n)? {
            return Ok(action);
        }
    }
}

fn run_conn_sync(mut conn: Conn, addr: &Addr, control: &Control, timeout: Duration) -> Stats {
    let mut backoff = Backoff::new();
    'connect: while !control.stopped() {
        let mut s = match SyncStream::connect(addr, timeout) {
            Ok(s) => s,
            Err(_) => {
                if control.measuring() {
                    conn.stats.errors.connect += 1;
                }
                thread::sleep(backoff.next());
                continue;
            }
        };
        backoff = Backoff::new();
        loop {
            let next = control.next();
            if next == Next::Stop {
                break 'connect;
            }
            let started = Instant::now();
            match exchange_sync(&mut s, &mut conn.generator, &mut conn.reply) {
                Ok(action) => conn.record(next, started, action),
                Err(f) => {
                    conn.fail(f, control);
                    continue 'connect;
                }
            }
        }
    }
    conn.stats
}

// ---------------------------------------------------------------------------
// Back end 2: tokio tasks.

async fn exchange_async<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    generator: &mut Generator,
    reply: &mut ReplyBuf,
) -> Result<Range<usize>, Failure> {
    s.write_all(generator.next_request())
        .await
        .map_err(|e| Failure::from_io(&e))?;
    reply.len = 0;
    loop {
        let n = s
            .read(reply.spare())
            .await
            .map_err(|e| Failure::from_io(&e))?;
        if n == 0 {
            return Err(Failure::Io);
        }
        if let Some(action) = reply.filled(n)? {
            return Ok(action);
        }
    }
}

/// Runs requests on one open connection until an error or the end.
/// Returns `true` if the run is over.
async fn drive_async<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    conn: &mut Conn,
    control: &Control,
    timeout: Duration,
) -> bool {
    loop {
        let next = control.next();
        if next == Next::Stop {
            return true;
        }
        let started = Instant::now();
        let exchange = exchange_async(&mut s, &mut conn.generator, &mut conn.reply);
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(action)) => conn.record(next, started, action),
            Ok(Err(f)) => {
                conn.fail(f, control);
                return false;
            }
            Err(_) => {
                conn.fail(Failure::Timeout, control);
                return false;
            }
        }
    }
}

async fn connect_async(
    addr: &Addr,
    timeout: Duration,
) -> io::Result<either::Stream<tokio::net::TcpStream, tokio::net::UnixStream>> {
    let connect = async {
        match addr {
            Addr::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                Ok(either::Stream::Left(s))
            }
            Addr::Unix(p) => Ok(either::Stream::Right(
                tokio::net::UnixStream::connect(p).await?,
            )),
        }
    };
    tokio::time::timeout(timeout, connect)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

async fn run_conn_async(
    mut conn: Conn,
    addr: Arc<Addr>,
    control: Arc<Control>,
    timeout: Duration,
) -> Stats {
    let mut backoff = Backoff::new();
    while !control.stopped() {
        let done = match connect_async(&addr, timeout).await {
            Ok(either::Stream::Left(s)) => drive_async(s, &mut conn, &control, timeout).await,
            Ok(either::Stream::Right(s)) => drive_async(s, &mut conn, &control, timeout).await,
            Err(_) => {
                if control.measuring() {
                    conn.stats.errors.connect += 1;
                }
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        backoff = Backoff::new();
        if done {
            break;
        }
    }
    conn.stats
}

/// A two-way choice of stream type, without boxing.
mod either {
    pub enum Stream<L, R> {
        Left(L),
        Right(R),
    }
}

// ---------------------------------------------------------------------------
// Run and report.

fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct we pass; a zeroed
    // `rusage` is a valid value of that plain-data C struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// User+system CPU time of another process, from /proc/PID/stat.
fn process_cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses:
    // state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// Times and CPU use of the measured phase.
struct Measured {
    stats: Stats,
    started: Instant,
    cpu: Duration,
    /// CPU time in the measured phase of the server (with --server-pid) and
    /// of its back end (with --backend-pid).
    server_cpu: PidsCpu,
    /// When the last connection stopped (used when no request completed).
    ended: Instant,
}

/// CPU time of the --server-pid and --backend-pid processes (from /proc).
#[derive(Clone, Copy, Default)]
struct PidsCpu {
    server: Option<Duration>,
    backend: Option<Duration>,
}

impl PidsCpu {
    fn now(args: &Args) -> PidsCpu {
        PidsCpu {
            server: args.server_pid.and_then(process_cpu_time),
            backend: args.backend_pid.and_then(process_cpu_time),
        }
    }

    /// The CPU time used since `before`.
    fn since(args: &Args, before: PidsCpu) -> PidsCpu {
        let after = PidsCpu::now(args);
        let diff = |a: Option<Duration>, b: Option<Duration>| Some(a?.saturating_sub(b?));
        PidsCpu {
            server: diff(after.server, before.server),
            backend: diff(after.backend, before.backend),
        }
    }
}

/// How long the measured phase may last: --duration, else unbounded with
/// --requests, else 10 s.
fn measure_limit(args: &Args) -> Option<Duration> {
    match (args.duration, args.requests) {
        (Some(d), _) => Some(d),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    }
}

/// Runs the phases from the main thread: warm-up, measure, stop.
/// `finished` says whether every connection is done.
fn orchestrate(
    args: &Args,
    control: &Control,
    sleep: &dyn Fn(Duration),
    finished: &dyn Fn() -> bool,
    server0: &mut PidsCpu,
) -> (Instant, Duration) {
    if !args.warmup.is_zero() {
        sleep(args.warmup);
    }
    *server0 = PidsCpu::now(args);
    let cpu0 = cpu_time();
    let started = Instant::now();
    control.phase.store(MEASURE, Ordering::Relaxed);
    let limit = measure_limit(args);
    loop {
        if finished() {
            break;
        }
        if let Some(limit) = limit {
            let left = limit.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            sleep(left.min(Duration::from_millis(20)));
        } else {
            sleep(Duration::from_millis(20));
        }
    }
    control.phase.store(STOP, Ordering::Relaxed);
    (started, cpu0)
}

fn run_threads(
    args: &Args,
    addr: Addr,
    pickers: Vec<UserPicker>,
    control: Arc<Control>,
) -> Measured {
    let addr = Arc::new(addr);
    let handles: Vec<_> = pickers
        .into_iter()
        .enumerate()
        .map(|(i, picker)| {
            let conn = Conn::new(args, i as u32, picker);
            let (addr, control, timeout) = (addr.clone(), control.clone(), args.timeout);
            thread::Builder::new()
                .name(format!("conn-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || run_conn_sync(conn, &addr, &control, timeout))
                .expect("spawn connection thread")
        })
        .collect();
    let mut server0 = PidsCpu::default();
    let (started, cpu0) = orchestrate(
        args,
        &control,
        &thread::sleep,
        &|| handles.iter().all(|h| h.is_finished()),
        &mut server0,
    );
    let mut stats = Stats::new();
    for h in handles {
        stats.merge(&h.join().expect("connection thread panicked"));
    }
    Measured {
        stats,
        started,
        cpu: cpu_time().saturating_sub(cpu0),
        server_cpu: PidsCpu::since(args, server0),
        ended: Instant::now(),
    }
}

fn run_tokio(args: &Args, addr: Addr, pickers: Vec<UserPicker>, control: Arc<Control>) -> Measured {
    let rt = if args.workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.workers)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    let addr = Arc::new(addr);
    rt.block_on(async {
        let handles: Vec<_> = pickers
            .into_iter()
            .enumerate()
            .map(|(i, picker)| {
                let conn = Conn::new(args, i as u32, picker);
                tokio::spawn(run_conn_async(
                    conn,
                    addr.clone(),
                    control.clone(),
                    args.timeout,
                ))
            })
            .collect();
        // Phase changes happen between awaits, polled like the threads do.
        if !args.warmup.is_zero() {
            tokio::time::sleep(args.warmup).await;
        }
        let server0 = PidsCpu::now(args);
        let cpu0 = cpu_time();
        let started = Instant::now();
        control.phase.store(MEASURE, Ordering::Relaxed);
        let limit = measure_limit(args);
        while !handles.iter().all(|h| h.is_finished()) {
            let step = match limit {
                Some(l) => l.saturating_sub(started.elapsed()),
                None => Duration::from_millis(20),
            };
            if step.is_zero() {
                break;
            }
            tokio::time::sleep(step.min(Duration::from_millis(20))).await;
        }
        control.phase.store(STOP, Ordering::Relaxed);
        let mut stats = Stats::new();
        for h in handles {
            stats.merge(&h.await.expect("connection task panicked"));
        }
        Measured {
            stats,
            started,
            cpu: cpu_time().saturating_sub(cpu0),
            server_cpu: PidsCpu::since(args, server0),
            ended: Instant::now(),
        }
    })
}

#[derive(Serialize)]
struct LatencyUs {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
    mean: f64,
}

#[derive(Serialize)]
struct Cpu {
    user_plus_sys_s: f64,
    /// CPU time over wall time: 100 = one core busy.
    percent_of_one_core: f64,
    percent_of_machine: f64,
    nproc: usize,
    /// Generator CPU per measured request, in microseconds.
    us_per_request: f64,
}

#[derive(Serialize)]
struct Report {
    addr: String,
    runtime: Runtime,
    connections: u32,
    users: u64,
    dist: &'static str,
    zipf_exponent: Option<f64>,
    mix: Mix,
    recipients: u32,
    warmup_s: f64,
    elapsed_s: f64,
    requests: u64,
    requests_per_sec: f64,
    latency_us: LatencyUs,
    actions: BTreeMap<String, u64>,
    errors: Errors,
    loadgen_cpu: Cpu,
    /// With --server-pid: the server's CPU over the same measured phase.
    server_cpu: Option<Cpu>,
    /// With --backend-pid: the back end's CPU over the same measured phase.
    backend_cpu: Option<Cpu>,
}

fn report(args: &Args, m: &Measured) -> Report {
    let s = &m.stats;
    let end = s.finished.unwrap_or(m.ended).max(m.started);
    let elapsed = end.duration_since(m.started).as_secs_f64();
    let us = |ns: u64| ns as f64 / 1000.0;
    let nproc = thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = |t: Duration| {
        let cpu_s = t.as_secs_f64();
        let pct = if elapsed > 0.0 {
            100.0 * cpu_s / elapsed
        } else {
            0.0
        };
        Cpu {
            user_plus_sys_s: cpu_s,
            percent_of_one_core: pct,
            percent_of_machine: pct / nproc as f64,
            nproc,
            us_per_request: if s.requests > 0 {
                cpu_s * 1e6 / s.requests as f64
            } else {
                0.0
            },
        }
    };
    Report {
        addr: args.addr.clone(),
        runtime: args.runtime,
        connections: args.connections,
        users: args.users,
        dist: if args.users_sequential {
            "sequential"
        } else {
            match args.dist {
                Dist::Uniform => "uniform",
                Dist::Zipf => "zipf",
            }
        },
        zipf_exponent: (args.dist == Dist::Zipf && !args.users_sequential)
            .then_some(args.zipf_exponent),
        mix: args.mix,
        recipients: args.recipients,
        warmup_s: args.warmup.as_secs_f64(),
        elapsed_s: elapsed,
        requests: s.requests,
        requests_per_sec: if elapsed > 0.0 {
            s.requests as f64 / elapsed
        } else {
            0.0
        },
        latency_us: LatencyUs {
            p50: us(s.hist.value_at_quantile(0.5)),
            p90: us(s.hist.value_at_quantile(0.9)),
            p99: us(s.hist.value_at_quantile(0.99)),
            p999: us(s.hist.value_at_quantile(0.999)),
            max: us(s.hist.max()),
            mean: s.hist.mean() / 1000.0,
        },
        actions: s.actions.sorted().into_iter().collect(),
        errors: s.errors,
        loadgen_cpu: cpu(m.cpu),
        server_cpu: m.server_cpu.server.map(cpu),
        backend_cpu: m.server_cpu.backend.map(cpu),
    }
}

fn print_table(r: &Report) {
    let dist = match r.zipf_exponent {
        Some(s) => format!("zipf(s={s})"),
        None => r.dist.to_string(),
    };
    println!(
        "loadgen: {} | {:?} runtime | {} connections | {} users, {} | mix {:?}, {} recipient(s)",
        r.addr, r.runtime, r.connections, r.users, dist, r.mix, r.recipients
    );
    println!(
        "  measured       {:.3} s (after {:.1} s warm-up)",
        r.elapsed_s, r.warmup_s
    );
    println!("  requests       {}", r.requests);
    println!("  requests/s     {:.0}", r.requests_per_sec);
    let l = &r.latency_us;
    println!(
        "  latency (µs)   p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
        l.p50, l.p90, l.p99, l.p999, l.max, l.mean
    );
    let actions: Vec<String> = r.actions.iter().map(|(w, n)| format!("{w} {n}")).collect();
    println!(
        "  actions        {}",
        if actions.is_empty() {
            "(none)".to_string()
        } else {
            actions.join(", ")
        }
    );
    let e = &r.errors;
    println!(
        "  errors         connect {}  io {}  timeout {}  malformed {}",
        e.connect, e.io, e.timeout, e.malformed
    );
    let cpu_line = |label: &str, c: &Cpu| {
        println!(
            "  {label:<14} {:.2} s user+sys = {:.0}% of one core ({:.0}% of {} cores), {:.2} µs/request",
            c.user_plus_sys_s,
            c.percent_of_one_core,
            c.percent_of_machine,
            c.nproc,
            c.us_per_request
        );
    };
    cpu_line("loadgen CPU", &r.loadgen_cpu);
    if let Some(c) = &r.server_cpu {
        cpu_line("server CPU", c);
    }
    if let Some(c) = &r.backend_cpu {
        cpu_line("back end CPU", c);
    }
}

fn main() {
    let args = Args::parse();
    if args.connections == 0 || args.users == 0 || args.recipients == 0 {
        eprintln!("loadgen: --connections, --users and --recipients must be at least 1");
        std::process::exit(2);
    }
    let addr = match Addr::parse(&args.addr) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: bad --addr {}: {e}", args.addr);
            std::process::exit(2);
        }
    };
    let picker = if args.users_sequential {
        UserPicker::sequential(args.users)
    } else {
        match args.dist {
            Dist::Uniform => UserPicker::uniform(args.users),
            Dist::Zipf => UserPicker::zipf(args.users, args.zipf_exponent),
        }
    };
    let pickers = vec![picker; args.connections as usize];
    let control = Arc::new(Control {
        phase: AtomicU8::new(WARMUP),
        budget: args.requests,
        issued: AtomicU64::new(0),
    });
    let measured = match args.runtime {
        Runtime::Threads => run_threads(&args, addr, pickers, control),
        Runtime::Tokio => run_tokio(&args, addr, pickers, control),
    };
    let r = report(&args, &measured);
    if args.json {
        println!("{}", serde_json::to_string(&r).expect("report serializes"));
    } else {
        print_table(&r);
    }
    if r.requests == 0 {
        eprintln!(
            "loadgen: no request completed ({} errors)",
            r.errors.total()
        );
        std::process::exit(1);
    }
}
