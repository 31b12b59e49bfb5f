//! Hostile input against a real server (`support::server` on 127.0.0.1:0, raw bytes).
//!
//! Every test keeps a well-behaved user ("good") on its own connection and checks that
//! its answers are exactly right before, during and after the attack: DUNNO while it
//! is under its limit, DEFER_IF_PERMIT once it is over, with the counters in the store
//! holding exactly what it was charged. Nothing here may panic the server, stall the
//! good connection, or touch another user's counters. The server's clock is a stopped
//! `ManualClock`, so every decision is known exactly; timeouts are real time.

mod support;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ratelimit_policyd::protocol::{Action, Status, parse_response};
use support::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const GOOD: &str = "good@example.com";
const GOOD_LIMIT: u64 = 12;
/// How long any single answer to the good user may take, even under attack. Generous:
/// the test machine is shared and busy; a stalled server would take forever.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// The configuration every test starts from: `extra_server` lines go into `[server]`,
/// `store` lines into `[store]`; the idle timeout is 300 ms unless `extra_server` sets
/// one. Store failures (a full store) are answered with a deferral, so they show.
fn config_text(extra_server: &str, store: &str) -> String {
    let idle = if extra_server.contains("idle_timeout") {
        ""
    } else {
        "idle_timeout = \"300ms\""
    };
    format!(
        r#"
[server]
allow = ["127.0.0.1/32"]
on_store_error = "closed"
{idle}
{extra_server}

[store]
{store}

[tiers.default]
limits = ["2/1h"]

[tiers.good]
limits = ["{GOOD_LIMIT}/1h"]

[assign]
"{GOOD}" = "good"
"#
    )
}

fn eom(user: &[u8], instance: &str) -> Vec<u8> {
    let mut r =
        b"request=smtpd_access_policy\nprotocol_state=END-OF-MESSAGE\nsasl_username=".to_vec();
    r.extend_from_slice(user);
    r.extend_from_slice(
        format!("\ninstance={instance}\nrecipient_count=1\nsize=100\n\n").as_bytes(),
    );
    r
}

fn rcpt(user: &[u8]) -> Vec<u8> {
    let mut r = b"request=smtpd_access_policy\nprotocol_state=RCPT\nsasl_username=".to_vec();
    r.extend_from_slice(user);
    r.extend_from_slice(b"\nrecipient=x@example.net\n\n");
    r
}

/// Sends `request` and reads one whole reply.
async fn ask(stream: &mut TcpStream, request: &[u8]) -> io::Result<Action<'static>> {
    stream.write_all(request).await?;
    let mut buf = Vec::with_capacity(256);
    loop {
        if let Ok(Status::Complete((action, _))) = parse_response(&buf) {
            return Ok(action.into_owned());
        }
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn ask_within(stream: &mut TcpStream, request: &[u8]) -> Action<'static> {
    tokio::time::timeout(ANSWER_WITHIN, ask(stream, request))
        .await
        .expect("answered in time")
        .expect("answered")
}

/// Expects the server to close `stream` without sending a byte.
async fn expect_closed_silently(stream: &mut TcpStream, within: Duration) {
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut got))
        .await
        .expect("the server closes the connection in time");
    match read {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("unexpected error {e}"),
    }
    assert!(
        got.is_empty(),
        "the server replied: {:?}",
        got.escape_ascii().to_string()
    );
}

fn is_defer(a: &Action<'_>) -> bool {
    matches!(a, Action::DeferIfPermit(_))
}

/// The well-behaved user: one persistent connection, and an exact model of its quota.
struct Good {
    stream: TcpStream,
    charged: u64,
    instance: u64,
}

impl Good {
    async fn connect(server: &Server) -> Good {
        Good {
            stream: TcpStream::connect(server.addr).await.unwrap(),
            charged: 0,
            instance: 0,
        }
    }

    /// One message: RCPT (peek), then END-OF-MESSAGE (charge), each answered exactly.
    async fn message(&mut self) {
        let under = self.charged < GOOD_LIMIT;
        let peek = ask_within(&mut self.stream, &rcpt(GOOD.as_bytes())).await;
        assert_eq!(
            is_defer(&peek),
            !under,
            "good user at RCPT after {} of {GOOD_LIMIT}: {peek}",
            self.charged
        );
        self.instance += 1;
        let request = eom(GOOD.as_bytes(), &format!("good.{}", self.instance));
        let answer = ask_within(&mut self.stream, &request).await;
        if under {
            assert_eq!(
                answer,
                Action::Dunno,
                "good user message {}",
                self.charged + 1
            );
            self.charged += 1;
        } else {
            assert!(is_defer(&answer), "good user over its limit got {answer}");
        }
    }

    async fn messages(&mut self, n: u64) {
        for _ in 0..n {
            self.message().await;
        }
    }

    /// The store holds exactly what the good user was charged.
    fn check_counters(&self, server: &Server) {
        assert_eq!(
            server.used(GOOD, &format!("{GOOD_LIMIT}/1h")),
            self.charged,
            "the good user's counter changed"
        );
    }

    /// The attack is over: the good user sends up to and past its limit, exactly.
    async fn finish(mut self, server: &Server) {
        self.check_counters(server);
        self.messages(GOOD_LIMIT - self.charged + 2).await;
        assert_eq!(self.charged, GOOD_LIMIT);
        self.check_counters(server);
    }
}

/// Runs `attack` while the good user keeps sending (RCPT peeks and one message), and
/// checks the good user before and after.
async fn under_attack<F: std::future::Future<Output = ()>>(server: &Server, attack: F) {
    let mut good = Good::connect(server).await;
    good.messages(3).await;
    good.check_counters(server);
    let done = Arc::new(AtomicBool::new(false));
    let (_, good) = tokio::join!(
        async {
            attack.await;
            done.store(true, Ordering::SeqCst);
        },
        async {
            let mut rounds = 0;
            while !done.load(Ordering::SeqCst) || rounds == 0 {
                let peek = ask_within(&mut good.stream, &rcpt(GOOD.as_bytes())).await;
                assert_eq!(peek, Action::Dunno, "good user's peek during the attack");
                if rounds == 0 {
                    good.message().await;
                }
                rounds += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            good
        }
    );
    good.finish(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_and_requests_over_the_limits_close_only_that_connection() {
    let server = Server::start(&config_text("", "")).await;
    under_attack(&server, async {
        // One line over max_line (4096), without a newline: refused without buffering it.
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        c.write_all(b"request=smtpd_access_policy\nsasl_username=")
            .await
            .unwrap();
        let _ = c.write_all(&[b'a'; 5000]).await;
        expect_closed_silently(&mut c, Duration::from_secs(5)).await;

        // 65 attributes (max 64).
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let mut req = Vec::new();
        for i in 0..65 {
            req.extend_from_slice(format!("x{i}=y\n").as_bytes());
        }
        req.extend_from_slice(b"\n");
        let _ = c.write_all(&req).await;
        expect_closed_silently(&mut c, Duration::from_secs(5)).await;

        // 20 KiB in lines of 2 KiB (max_request is 16 KiB).
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let mut req = Vec::new();
        for i in 0..10 {
            req.extend_from_slice(format!("helo_name{i}=").as_bytes());
            req.extend_from_slice(&[b'h'; 2040]);
            req.push(b'\n');
        }
        let _ = c.write_all(&req).await;
        expect_closed_silently(&mut c, Duration::from_secs(5)).await;

        // A valid request for another user first, then an oversize one on the same
        // connection: the first is answered, then the connection is closed.
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        assert_eq!(
            ask_within(&mut c, &eom(b"other@example.com", "o.1")).await,
            Action::Dunno
        );
        let _ = c.write_all(&[b'z'; 8192]).await;
        expect_closed_silently(&mut c, Duration::from_secs(5)).await;
    })
    .await;
    assert_eq!(server.used("other@example.com", "2/1h"), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_names_and_values_is_served_and_never_merges_users() {
    let server = Server::start(&config_text("", "")).await;
    under_attack(&server, async {
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        // Invalid UTF-8 in an unknown attribute's name and in values: ignored / kept raw.
        let mut req =
            b"request=smtpd_access_policy\nprotocol_state=RCPT\n\xff\xfe=\xc3\x28\n".to_vec();
        req.extend_from_slice(b"client_name=\xe2\x82\nsender=\xf0\x28\x8c\x28@example.org\n\n");
        assert_eq!(ask_within(&mut c, &req).await, Action::Dunno);

        // Latin-1 user names (invalid UTF-8) are counted, each under its own key: two
        // names differing only in an invalid byte, and the valid name that a lossy
        // conversion would turn either into, never share counters.
        let e9 = b"jos\xe9@example.com";
        let e8 = b"jos\xe8@example.com";
        let replacement = "jos\u{fffd}@example.com".as_bytes();
        assert_eq!(ask_within(&mut c, &eom(e9, "u.1")).await, Action::Dunno);
        assert_eq!(ask_within(&mut c, &eom(e9, "u.2")).await, Action::Dunno);
        assert!(
            is_defer(&ask_within(&mut c, &eom(e9, "u.3")).await),
            "third message of 2/1h"
        );
        assert!(is_defer(&ask_within(&mut c, &rcpt(e9)).await));
        assert_eq!(
            ask_within(&mut c, &rcpt(e8)).await,
            Action::Dunno,
            "another Latin-1 user"
        );
        assert_eq!(ask_within(&mut c, &eom(e8, "u.4")).await, Action::Dunno);
        assert_eq!(
            ask_within(&mut c, &eom(replacement, "u.5")).await,
            Action::Dunno
        );
        assert_eq!(
            ask_within(&mut c, &eom(replacement, "u.6")).await,
            Action::Dunno
        );
        // Case-insensitivity still holds for the ASCII part.
        assert!(is_defer(
            &ask_within(&mut c, &rcpt(b"JOS\xe9@Example.COM")).await
        ));
    })
    .await;
    assert_eq!(server.used("jos\u{fffd}@example.com", "2/1h"), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_close_only_that_connection() {
    let server = Server::start(&config_text("", "")).await;
    under_attack(&server, async {
        for req in [
            &b"request=smtpd_access_policy\nsasl_username=a\0b@example.com\n\n"[..],
            b"request=smtpd_access_policy\nsasl_\0username=x\n\n",
            b"\0\n\n",
        ] {
            let mut c = TcpStream::connect(server.addr).await.unwrap();
            let _ = c.write_all(req).await;
            expect_closed_silently(&mut c, Duration::from_secs(5)).await;
        }
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_stage_or_user_and_unknown_stages_are_answered_dunno_and_charge_nothing() {
    let server = Server::start(&config_text("", "")).await;
    let keys_before = server.daemon.policy.backend().tracked_keys();
    under_attack(&server, async {
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let cases: [&[u8]; 6] = [
            b"request=smtpd_access_policy\nsasl_username=mallory@example.com\n\n",
            b"request=smtpd_access_policy\nprotocol_state=END-OF-MESSAGE\nsize=10\n\n",
            b"request=smtpd_access_policy\nprotocol_state=FROBNICATE\nsasl_username=mallory@example.com\n\n",
            b"request=smtpd_access_policy\nprotocol_state=\nsasl_username=mallory@example.com\n\n",
            b"protocol_state=END-OF-MESSAGE\nsasl_username=\n\n",
            b"\n",
        ];
        for _ in 0..3 {
            for req in cases {
                assert_eq!(ask_within(&mut c, req).await, Action::Dunno, "{}", req.escape_ascii());
            }
        }
    })
    .await;
    assert_eq!(server.used("mallory@example.com", "2/1h"), 0);
    // Only the good user was added.
    assert_eq!(
        server.daemon.policy.backend().tracked_keys(),
        keys_before.map(|k| k + 1)
    );
    server.stop().await;
}

/// Drips a request that never ends into a new connection, a byte every `every`,
/// until the server closes it or `give_up` passes; returns how long that took.
async fn drip(server: &Server, every: Duration, give_up: Duration) -> Duration {
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    let start = Instant::now();
    let dripped = async {
        for b in b"request=smtpd_access_policy\nprotocol_state=RCPT\nsasl_username=slow\n"
            .iter()
            .cycle()
        {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(every).await;
        }
    };
    let _ = tokio::time::timeout(give_up, dripped).await;
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalled_half_way_is_freed_by_the_idle_timeout() {
    let server = Server::start(&config_text("", "")).await;
    under_attack(&server, async {
        // Half a request, then nothing (idle_timeout is 300 ms).
        let mut stalled = TcpStream::connect(server.addr).await.unwrap();
        stalled
            .write_all(b"request=smtpd_access_policy\nprotocol_state=END-OF-MESSAGE\nsasl_user")
            .await
            .unwrap();
        let start = Instant::now();
        expect_closed_silently(&mut stalled, Duration::from_secs(5)).await;
        assert!(
            start.elapsed() >= Duration::from_millis(250),
            "closed before the timeout"
        );

        // Slowloris: a byte every 50 ms never completes a request, and the timeout
        // bounds the whole request, not each read.
        let took = drip(&server, Duration::from_millis(50), Duration::from_secs(5)).await;
        assert!(
            took < Duration::from_secs(3),
            "the slow client was not cut off"
        );
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dripped_in_is_cut_off_after_seconds_even_with_a_long_idle_timeout() {
    // The default idle_timeout (10 minutes): a connection that has begun a request
    // cannot be given to another client, so a request gets REQUEST_DEADLINE to arrive.
    let server = Server::start(&config_text("idle_timeout = \"10m\"", "")).await;
    under_attack(&server, async {
        let took = drip(&server, Duration::from_millis(200), Duration::from_secs(30)).await;
        assert!(
            took >= Duration::from_secs(9) && took < Duration::from_secs(20),
            "a dripped request was cut off after {took:?}, not about 10 s"
        );
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_is_cut_off_by_the_idle_timeout() {
    let server = Server::start(&config_text("", "")).await;
    under_attack(&server, async {
        // A user over its limit, with a long name: every RCPT gets a ~400-byte refusal.
        let user = format!("{}@example.com", "r".repeat(300));
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        for i in 0..2 {
            assert_eq!(
                ask_within(&mut c, &eom(user.as_bytes(), &format!("r.{i}"))).await,
                Action::Dunno
            );
        }
        // Pipeline refusals without ever reading them, until the buffers are full and
        // the server cannot write (nor read) any more.
        let batch = rcpt(user.as_bytes()).repeat(1000);
        let mut sent = 0usize;
        while let Ok(Ok(())) =
            tokio::time::timeout(Duration::from_secs(1), c.write_all(&batch)).await
        {
            sent += 1000;
            assert!(sent < 2_000_000, "the buffers never filled");
        }
        // The server waits `idle_timeout` (300 ms) for the client to take a reply, then
        // closes: further writes fail instead of blocking.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let more = async {
            loop {
                c.write_all(&batch).await?;
            }
        };
        let result: Result<io::Result<()>, _> =
            tokio::time::timeout(Duration::from_secs(5), more).await;
        match result {
            Ok(Err(e)) => assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ),
                "{e}"
            ),
            Ok(Ok(())) => unreachable!(),
            Err(_) => panic!(
                "the server still holds a connection that stopped reading after {sent} requests"
            ),
        }
    })
    .await;
    server.stop().await;
}

/// Raises this process's open-file limit to its hard limit; returns the soft limit now.
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

/// 5,000 clients connect at once to a server capped at 64 connections, each sending a
/// request and holding its connection. The process's open-file limit is raised to its
/// hard limit first; if that is still too low, fewer clients attack (and it says so).
/// Clients beyond the cap wait in the listen queue until a served one has been idle
/// for a second and yields its slot; those beyond the listen queue are held off by the
/// kernel (SYN retries); all give up after 3 s. The good user, busy every few
/// milliseconds, keeps its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_connections_at_once_the_cap_holds_and_served_clients_keep_being_served() {
    const WANTED: usize = 5_000;
    const CAP: usize = 64;
    let fds = raise_fd_limit();
    // Each attacking connection costs this process one fd (the server side is only
    // accepted up to the cap); keep 500 for everything else.
    let count = WANTED.min(usize::try_from(fds).unwrap_or(0).saturating_sub(500));
    if count < WANTED {
        eprintln!("open-file limit {fds}: attacking with {count} connections instead of {WANTED}");
    }
    let server = Server::start(&config_text(
        &format!("max_connections = {CAP}\nidle_timeout = \"30s\""),
        "",
    ))
    .await;
    let served = Arc::new(AtomicUsize::new(0));
    let connected = Arc::new(AtomicUsize::new(0));
    let mut held = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    let most_open = watch_open_connections(&server, Arc::clone(&stop));
    under_attack(&server, async {
        let mut tasks = Vec::with_capacity(count);
        for i in 0..count {
            let (addr, served, connected) =
                (server.addr, Arc::clone(&served), Arc::clone(&connected));
            tasks.push(tokio::spawn(async move {
                let Ok(Ok(mut c)) =
                    tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await
                else {
                    return None;
                };
                connected.fetch_add(1, Ordering::Relaxed);
                let request = eom(format!("attacker{i}@example.com").as_bytes(), "a");
                // Served clients get their answer at once; the others wait in the backlog.
                if let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_secs(3), ask(&mut c, &request)).await
                {
                    served.fetch_add(1, Ordering::Relaxed);
                }
                Some(c)
            }));
        }
        for t in tasks {
            if let Some(c) = t.await.unwrap() {
                held.push(c);
            }
        }
    })
    .await;
    let (served, connected) = (
        served.load(Ordering::Relaxed),
        connected.load(Ordering::Relaxed),
    );
    stop.store(true, Ordering::Relaxed);
    let most_open = most_open.await.unwrap();
    let evicted = server
        .daemon
        .server
        .connections_evicted
        .load(Ordering::Relaxed);
    eprintln!(
        "{count} attacking connections: {connected} connected, {served} served, {evicted} evicted, at most {most_open} open"
    );
    // The cap holds: never more connections open than that.
    assert!(
        most_open <= CAP as u64,
        "{most_open} connections open with a cap of {CAP}"
    );
    // The good user holds one slot for the whole attack; every attacker served beyond
    // the other slots took the slot of an idle one.
    assert!(
        served as u64 <= (CAP - 1) as u64 + evicted,
        "{served} attackers served with a cap of {CAP} and {evicted} evicted"
    );
    assert!(served >= 1, "nobody was served");
    // The listen queue is 1024 (capped by net.core.somaxconn), not tokio's default 128:
    // a burst of connections waits there instead of being dropped into SYN retries.
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if somaxconn >= 1024 && count >= 2000 {
        assert!(
            connected > CAP + 128,
            "only {connected} connections completed: is the listen backlog 128?"
        );
    }
    drop(held);
    // Once the attackers are gone, new clients are served again.
    let mut fresh = TcpStream::connect(server.addr).await.unwrap();
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        ask(&mut fresh, &rcpt(b"late@example.com")),
    )
    .await
    .expect("a new client is served after the flood")
    .unwrap();
    assert_eq!(answer, Action::Dunno);
    drop(fresh);
    server.stop().await;
}

/// Samples the server's open connections every 5 ms until `stop` is set; returns the
/// most seen.
fn watch_open_connections(server: &Server, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let stats = Arc::clone(&server.daemon.server);
    tokio::spawn(async move {
        let mut most = 0;
        while !stop.load(Ordering::Relaxed) {
            most = most.max(stats.connections_open.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        most
    })
}

/// One local process opens 2,000 connections and sends nothing on them: at the cap
/// (1,024, the default) every slot is held by an idle connection, for `idle_timeout`
/// (10 minutes). Postfix must still get its answers: at the cap, the connection idle
/// longest is closed to admit the new one (Postfix reconnects by itself), so a
/// well-behaved client on a new connection gets 20 answers, each within 5 s, while
/// the server never holds more than the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_from_one_process_never_lock_a_well_behaved_client_out() {
    const WANTED: usize = 2_000;
    let fds = usize::try_from(raise_fd_limit()).unwrap_or(0);
    // This process holds both ends: one fd per idle connection, one per server slot,
    // and 500 for everything else. With too few, scale the attack down.
    let (mut cap, mut count) = (1024, WANTED);
    if count + cap + 500 > fds {
        cap = fds.saturating_sub(500) / 3;
        count = 2 * cap;
        eprintln!("open-file limit {fds}: {count} idle connections against a cap of {cap}");
    }
    let server = Server::start(&config_text(
        &format!("max_connections = {cap}\nidle_timeout = \"10m\""),
        "",
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let most_open = watch_open_connections(&server, Arc::clone(&stop));

    let mut connecting = Vec::with_capacity(count);
    for _ in 0..count {
        let addr = server.addr;
        connecting.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
                .await
                .expect("connected within 10 s")
                .expect("connected")
        }));
    }
    let mut idle = Vec::with_capacity(count);
    for c in connecting {
        idle.push(c.await.unwrap());
    }
    // Every slot is taken by an idle connection.
    support::server::eventually("the cap filled with idle connections", || {
        server
            .daemon
            .server
            .connections_open
            .load(Ordering::Relaxed)
            == cap as u64
    })
    .await;

    // 20 requests, 20 exact answers. The first waits for the listen queue ahead of
    // it to drain (every idle connection beyond the cap is admitted first, each in
    // the slot of one idle longer): seconds on a busy machine, not `idle_timeout`.
    // Then a RCPT and END-OF-MESSAGE per message, each answered within 5 s.
    let mut good = Good::connect(&server).await;
    let start = Instant::now();
    let first = tokio::time::timeout(
        Duration::from_secs(60),
        ask(&mut good.stream, &rcpt(GOOD.as_bytes())),
    )
    .await
    .expect("the first request answered while the idle connections hold the cap")
    .expect("answered");
    assert_eq!(first, Action::Dunno);
    eprintln!("first answer after {:?}", start.elapsed());
    good.messages(9).await;
    assert_eq!(
        ask_within(&mut good.stream, &rcpt(GOOD.as_bytes())).await,
        Action::Dunno
    );
    assert_eq!(good.charged, 9);
    good.check_counters(&server);

    stop.store(true, Ordering::Relaxed);
    let most_open = most_open.await.unwrap();
    assert!(
        most_open <= cap as u64,
        "{most_open} connections open with a cap of {cap}"
    );
    // Every idle connection beyond the cap, and the good client, took the slot of
    // one idle longer. On a loaded machine a few idle connections reach the accept
    // queue only after the good client (the queue was full when they connected,
    // and the kernel completed them later): they are admitted, each evicting one,
    // a moment afterwards, so the count is awaited, not read once.
    let expected = (count - cap + 1) as u64;
    support::server::eventually(
        &format!(
            "{expected} evictions for {count} idle connections and the good client, cap {cap}"
        ),
        || {
            server
                .daemon
                .server
                .connections_evicted
                .load(Ordering::Relaxed)
                >= expected
        },
    )
    .await;
    drop(idle);
    good.finish(&server).await;
    server.stop().await;
}

/// At the cap, only a connection waiting between requests yields its slot: one in the
/// middle of a request keeps it, and gets its answer when the request is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_a_connection_in_the_middle_of_a_request_is_never_evicted() {
    let server = Server::start(&config_text(
        "max_connections = 2\nidle_timeout = \"10m\"",
        "",
    ))
    .await;
    let request = rcpt(b"midway@example.com");
    let (head, tail) = request.split_at(20);
    let mut midway = TcpStream::connect(server.addr).await.unwrap();
    midway.write_all(head).await.unwrap();
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    support::server::eventually("both slots taken", || {
        server
            .daemon
            .server
            .connections_open
            .load(Ordering::Relaxed)
            == 2
    })
    .await;
    // Three newcomers in turn: each takes the slot of the one idle longest, never the
    // one half-way through its request.
    for i in 0..3 {
        let mut newcomer = TcpStream::connect(server.addr).await.unwrap();
        assert_eq!(
            ask_within(
                &mut newcomer,
                &rcpt(format!("new{i}@example.com").as_bytes())
            )
            .await,
            Action::Dunno
        );
        expect_closed_silently(&mut idle, ANSWER_WITHIN).await;
        idle = newcomer;
    }
    assert_eq!(
        server
            .daemon
            .server
            .connections_evicted
            .load(Ordering::Relaxed),
        3
    );
    midway.write_all(tail).await.unwrap();
    let mut buf = Vec::new();
    let answer = tokio::time::timeout(ANSWER_WITHIN, async {
        loop {
            if let Ok(Status::Complete((action, _))) = parse_response(&buf) {
                return action.into_owned();
            }
            let mut chunk = [0u8; 512];
            let n = midway.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "the connection in the middle of a request was closed"
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("answered in time");
    assert_eq!(answer, Action::Dunno);
    drop((midway, idle));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_distinct_users_stay_under_the_key_cap_and_change_no_other_counters() {
    // Large enough that the eviction hand takes a while to go round a shard: the
    // good user, who keeps sending, is touched more often than that.
    const MAX_KEYS: usize = 50_000;
    let users: usize = std::env::var("HOSTILE_FLOOD_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    const CONNECTIONS: usize = 4;
    let server = Server::start(&config_text(
        "idle_timeout = \"60s\"",
        &format!("max_keys = {MAX_KEYS}"),
    ))
    .await;
    let max_seen = Arc::new(AtomicUsize::new(0));
    let flooding = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (policy, max_seen, flooding) = (
            Arc::clone(&server.daemon.policy),
            Arc::clone(&max_seen),
            Arc::clone(&flooding),
        );
        tokio::spawn(async move {
            while flooding.load(Ordering::Relaxed) {
                let keys = policy.backend().tracked_keys().unwrap();
                max_seen.fetch_max(keys, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let allowed = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    under_attack(&server, async {
        let mut tasks = Vec::new();
        for conn in 0..CONNECTIONS {
            let (addr, allowed, refused) =
                (server.addr, Arc::clone(&allowed), Arc::clone(&refused));
            let mine = (conn..users).step_by(CONNECTIONS).count();
            tasks.push(tokio::spawn(async move {
                let stream = TcpStream::connect(addr).await.unwrap();
                let (mut rd, mut wr) = stream.into_split();
                let writer = tokio::spawn(async move {
                    let mut buf = Vec::with_capacity(64 << 10);
                    for i in (conn..users).step_by(CONNECTIONS) {
                        buf.extend_from_slice(
                            b"protocol_state=END-OF-MESSAGE\nsasl_username=flood",
                        );
                        buf.extend_from_slice(i.to_string().as_bytes());
                        buf.extend_from_slice(b"\n\n");
                        if buf.len() >= 60 << 10 {
                            wr.write_all(&buf).await.unwrap();
                            buf.clear();
                        }
                    }
                    wr.write_all(&buf).await.unwrap();
                    wr
                });
                // Replies are `action=DUNNO\n\n` or `action=DEFER_IF_PERMIT ...\n\n`.
                let mut pending = Vec::new();
                let mut chunk = vec![0u8; 64 << 10];
                let mut seen = 0;
                while seen < mine {
                    let n = rd.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "the server closed a flood connection");
                    pending.extend_from_slice(&chunk[..n]);
                    let mut used = 0;
                    while let Ok(Status::Complete((action, len))) = parse_response(&pending[used..])
                    {
                        match action {
                            Action::Dunno => allowed.fetch_add(1, Ordering::Relaxed),
                            Action::DeferIfPermit(_) => refused.fetch_add(1, Ordering::Relaxed),
                            other => panic!("unexpected answer {other}"),
                        };
                        used += len;
                        seen += 1;
                    }
                    pending.drain(..used);
                }
                drop(writer.await.unwrap());
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await;
    flooding.store(false, Ordering::Relaxed);
    watcher.await.unwrap();
    let (allowed, refused) = (
        allowed.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    let (evictions, _) = server.daemon.policy.backend().evictions();
    let evictions = evictions.unwrap();
    eprintln!(
        "{users} flood users in {:.1?}: {allowed} counted, {refused} refused (store full); at most {} keys tracked; {evictions:?}",
        start.elapsed(),
        max_seen.load(Ordering::Relaxed)
    );
    assert_eq!(allowed + refused, users);
    assert!(max_seen.load(Ordering::Relaxed) <= MAX_KEYS);
    assert!(server.daemon.policy.backend().tracked_keys().unwrap() <= MAX_KEYS);
    // Beyond the cap a new user takes an evicted user's place (the good user, who
    // keeps sending, is not the one evicted: `under_attack` checks its counters),
    // and is counted like any other: the flood does not switch limiting off.
    let evicted = (evictions.idle + evictions.lru) as usize;
    assert_eq!(
        allowed,
        MAX_KEYS.min(users) - 1 + evicted,
        "{allowed} counted"
    );
    assert!(refused <= users / 100, "{refused} refused");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowlist_is_enforced_on_every_listener() {
    let text = config_text("listen = [\"127.0.0.1:0\", \"127.0.0.1:0\"]", "");
    let server = Server::start(&text).await;
    assert_eq!(server.addrs.len(), 2);
    let mut good = Good::connect(&server).await;
    good.messages(2).await;
    for &addr in &server.addrs {
        // From 127.0.0.2, outside allow = ["127.0.0.1/32"]: closed without an answer.
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut outsider = socket.connect(addr).await.unwrap();
        let _ = outsider.write_all(&eom(GOOD.as_bytes(), "outsider")).await;
        expect_closed_silently(&mut outsider, Duration::from_secs(5)).await;

        // From 127.0.0.1: served on this listener too.
        let mut insider = TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            ask_within(&mut insider, &rcpt(GOOD.as_bytes())).await,
            Action::Dunno
        );
    }
    good.messages(1).await;
    good.finish(&server).await;
    server.stop().await;
}

/// A config whose Redis URL holds a password.
fn redis_config(dir: &std::path::Path, url: &str) -> std::path::PathBuf {
    let path = dir.join("redis.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\non_store_error = \"closed\"\n\n[store]\nbackend = \"redis\"\nredis_url = \"{url}\"\nredis_connect_timeout = \"200ms\"\n\n[tiers.default]\nlimits = [\"2/1h\"]\n"
        ),
    )
    .unwrap();
    path
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ratelimit-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn check_config_never_prints_the_redis_password() {
    let dir = temp_dir("check-config");
    let urls = [
        ("redis://:s3cret@127.0.0.1:6379/", &["s3cret"][..]),
        ("redis://admin:p@ss@127.0.0.1:6379/0", &["p@ss", "ss@"][..]),
        (
            "redis+unix:///run/redis.sock?db=1&pass=s3cret",
            &["s3cret"][..],
        ),
    ];
    for (url, secrets) in urls {
        let path = redis_config(&dir, url);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ratelimit-policyd"))
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("store: redis"), "{text}");
        assert!(text.contains("***"), "{text}");
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "{url}: check-config printed {secret}:\n{text}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_daemon_never_logs_the_redis_password() {
    use std::io::{Read, Write};
    let dir = temp_dir("daemon-logs");
    // Nothing listens on port 1: every decision is a store failure, which is logged.
    let path = redis_config(&dir, "redis://:s3cret@127.0.0.1:1/");
    let sock = dir.join("policy.sock");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_ratelimit-policyd"))
        .arg("--config")
        .arg(&path)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .env("RATELIMIT_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stream = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("the daemon did not start: {e}"),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(&eom(b"alice@example.com", "i.1")).unwrap();
    let mut reply = [0u8; 256];
    let n = stream.read(&mut reply).unwrap();
    assert!(
        reply[..n].starts_with(b"action=DEFER_IF_PERMIT 4.3.0"),
        "{}",
        reply[..n].escape_ascii()
    );
    drop(stream);
    // SIGTERM: a graceful shutdown, logged too.
    // SAFETY: kill(2) on the child we spawned.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(logs.contains("store failure"), "{logs}");
    assert!(logs.contains("***"), "{logs}");
    assert!(
        !logs.contains("s3cret"),
        "the password is in the logs:\n{logs}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
