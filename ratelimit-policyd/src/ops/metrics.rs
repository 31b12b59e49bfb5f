//! Prometheus metrics: `GET /metrics` on `[metrics] listen` (a loopback port).
//!
//! Written in the text exposition format by hand rather than with
//! `prometheus-client` or `metrics`: every value already lives in a counter of the
//! policy ([`Tally`](crate::policy::Tally)), the server
//! ([`ServerStats`](crate::server::ServerStats)) or [`Ops`](super::Ops), so a
//! registry would only mirror them; there are about thirty series, one histogram and
//! one bounded label set (tiers, from the configuration); and the whole endpoint is
//! smaller than the glue a crate would need, with no new dependency to build.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `ratelimit_requests_total` | counter | `stage` (`rcpt`, `data`, `end_of_message`, `other`) |
//! | `ratelimit_decisions_total` | counter | `action` (`allow`, `defer`, `hold`, `reject`, `dry_run`, `store_error`), `tier` |
//! | `ratelimit_skipped_total` | counter | requests not counted (no key, exempt, unlimited tier, other stages) |
//! | `ratelimit_messages_charged_total` | counter | |
//! | `ratelimit_request_duration_seconds` | histogram | request complete → answer written |
//! | `ratelimit_tracked_keys` | gauge | memory store only |
//! | `ratelimit_table_entries` | gauge | `table` (`networks`: in-process store only, `incidents`, `clients`) |
//! | `ratelimit_store_errors_total` | counter | |
//! | `ratelimit_store_calls_in_flight` | gauge | calls to a network store (Redis) running now |
//! | `ratelimit_store_calls_refused_total` | counter | `reason` (`in_flight`, `circuit_open`): answered per on_store_error without a call |
//! | `ratelimit_store_circuit_open` | gauge | 1 while the store is not called (too many failures in a row) |
//! | `ratelimit_store_circuit_opens_total` | counter | |
//! | `ratelimit_store_fallback_active` | gauge | 1 while requests are decided with this server's own counters |
//! | `ratelimit_store_fallback_seconds_total` | counter | time spent in the local fallback |
//! | `ratelimit_store_evictions_total` | counter | `store` (`counters`, `networks`), `reason` (`idle`, `lru`); in-process stores only |
//! | `ratelimit_store_full_refusals_total` | counter | new users deferred: a key table full and nothing to evict |
//! | `ratelimit_snapshot_age_seconds` | gauge | only once a snapshot was written |
//! | `ratelimit_connections_open` | gauge | |
//! | `ratelimit_connections_total` | counter | |
//! | `ratelimit_connections_refused_total` | counter | `reason` (`allowlist`, `peer_uid`) |
//! | `ratelimit_connections_evicted_total` | counter | closed at the cap, idle longest |
//! | `ratelimit_incidents_total` | counter | |
//! | `ratelimit_signal_flagged_total` | counter | `signal` (`networks`, `baseline`): requests answered with the signal's action |
//! | `ratelimit_alerts_total` | counter | `result` (`sent`, `failed`, `dropped`) |
//! | `ratelimit_records_dropped_total` | counter | |
//! | `ratelimit_uptime_seconds` | gauge | |

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::View;
use crate::backend::Health;
use crate::policy::{Counted, Outcome};
use crate::server::stats::LATENCY_BUCKETS_US;

/// The exposition format version served.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Escapes a label value (`\`, `"`, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The metrics page.
pub fn render(view: &View) -> String {
    let mut o = String::with_capacity(4096);
    let s = view.policy.tally();
    let ops = &view.ops;
    let server = &view.server;

    header(
        &mut o,
        "ratelimit_requests_total",
        "counter",
        "Policy requests received, by protocol stage.",
    );
    for (stage, n) in ["rcpt", "data", "end_of_message", "other"]
        .iter()
        .zip(s.requests())
    {
        let _ = writeln!(o, "ratelimit_requests_total{{stage=\"{stage}\"}} {n}");
    }

    header(
        &mut o,
        "ratelimit_decisions_total",
        "counter",
        "Counted requests, by answer and tier.",
    );
    let decisions = s.decisions();
    let mut tiers: Vec<String> = view
        .policy
        .config()
        .tiers
        .map
        .tiers()
        .map(|t| t.name().to_string())
        .collect();
    tiers.sort();
    for t in tiers {
        if !decisions.iter().any(|(d, _)| *d == t) {
            for oc in Outcome::ALL {
                let _ = writeln!(
                    o,
                    "ratelimit_decisions_total{{action=\"{}\",tier=\"{}\"}} 0",
                    oc.label(),
                    esc(&t)
                );
            }
        }
    }
    for (tier, counts) in &decisions {
        for (oc, n) in Outcome::ALL.iter().zip(counts) {
            let _ = writeln!(
                o,
                "ratelimit_decisions_total{{action=\"{}\",tier=\"{}\"}} {n}",
                oc.label(),
                esc(tier)
            );
        }
    }

    header(
        &mut o,
        "ratelimit_skipped_total",
        "counter",
        "Requests not counted: no key, exempt, unlimited tier, or a stage that is not checked.",
    );
    let _ = writeln!(o, "ratelimit_skipped_total {}", s.get(Counted::Skipped));
    header(
        &mut o,
        "ratelimit_messages_charged_total",
        "counter",
        "Messages charged at END-OF-MESSAGE.",
    );
    let _ = writeln!(
        o,
        "ratelimit_messages_charged_total {}",
        s.get(Counted::Charged)
    );

    header(
        &mut o,
        "ratelimit_request_duration_seconds",
        "histogram",
        "Time from a complete request to its answer ready to be written.",
    );
    let (buckets, sum_us, count) = server.latency.snapshot();
    for (le, n) in LATENCY_BUCKETS_US.iter().zip(&buckets) {
        let _ = writeln!(
            o,
            "ratelimit_request_duration_seconds_bucket{{le=\"{}\"}} {n}",
            Duration::from_micros(*le).as_secs_f64()
        );
    }
    let _ = writeln!(
        o,
        "ratelimit_request_duration_seconds_bucket{{le=\"+Inf\"}} {}",
        buckets.last().copied().unwrap_or(0)
    );
    let _ = writeln!(
        o,
        "ratelimit_request_duration_seconds_sum {}",
        Duration::from_micros(sum_us).as_secs_f64()
    );
    let _ = writeln!(o, "ratelimit_request_duration_seconds_count {count}");

    if let Some(keys) = view.policy.backend().tracked_keys() {
        header(
            &mut o,
            "ratelimit_tracked_keys",
            "gauge",
            "Users (keys) tracked by the memory store.",
        );
        let _ = writeln!(o, "ratelimit_tracked_keys {keys}");
    }
    header(
        &mut o,
        "ratelimit_table_entries",
        "gauge",
        "Entries of the server's other bounded tables: users whose networks are kept (in-process store), incidents remembered, users whose last clients are kept.",
    );
    if let Some(usage) = view.policy.backend().network_usage("") {
        let _ = writeln!(
            o,
            "ratelimit_table_entries{{table=\"networks\"}} {}",
            usage.users
        );
    }
    let _ = writeln!(
        o,
        "ratelimit_table_entries{{table=\"incidents\"}} {}",
        view.policy.incidents_remembered()
    );
    let _ = writeln!(
        o,
        "ratelimit_table_entries{{table=\"clients\"}} {}",
        view.policy.clients().users()
    );
    header(
        &mut o,
        "ratelimit_store_errors_total",
        "counter",
        "Store failures and timeouts (answered per on_store_error).",
    );
    let _ = writeln!(
        o,
        "ratelimit_store_errors_total {}",
        s.get(Counted::StoreErrors)
    );
    guarded_store(&mut o, &view.policy.backend().health());
    let (counters, networks) = view.policy.backend().evictions();
    if counters.is_some() || networks.is_some() {
        header(
            &mut o,
            "ratelimit_store_evictions_total",
            "counter",
            "Keys evicted from a full key table to make room for new ones, by store and reason.",
        );
        for (store, ev) in [("counters", counters), ("networks", networks)] {
            let Some(ev) = ev else { continue };
            for (reason, n) in [("idle", ev.idle), ("lru", ev.lru)] {
                let _ = writeln!(
                    o,
                    "ratelimit_store_evictions_total{{store=\"{store}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
    }
    header(
        &mut o,
        "ratelimit_store_full_refusals_total",
        "counter",
        "New users deferred because a key table was full and nothing could be evicted.",
    );
    let _ = writeln!(
        o,
        "ratelimit_store_full_refusals_total {}",
        s.get(Counted::FullRefusals)
    );
    if let Some(at) = view.policy.backend().last_snapshot() {
        header(
            &mut o,
            "ratelimit_snapshot_age_seconds",
            "gauge",
            "Seconds since the last snapshot was written.",
        );
        let age = view.policy.now().saturating_duration_since(at);
        let _ = writeln!(o, "ratelimit_snapshot_age_seconds {}", age.as_secs_f64());
    }

    header(
        &mut o,
        "ratelimit_connections_open",
        "gauge",
        "Policy client connections open now.",
    );
    let _ = writeln!(
        o,
        "ratelimit_connections_open {}",
        load(&server.connections_open)
    );
    header(
        &mut o,
        "ratelimit_connections_total",
        "counter",
        "Policy client connections accepted.",
    );
    let _ = writeln!(
        o,
        "ratelimit_connections_total {}",
        load(&server.connections_total)
    );
    header(
        &mut o,
        "ratelimit_connections_refused_total",
        "counter",
        "Connections refused, by reason.",
    );
    let _ = writeln!(
        o,
        "ratelimit_connections_refused_total{{reason=\"allowlist\"}} {}",
        load(&server.connections_refused)
    );
    let _ = writeln!(
        o,
        "ratelimit_connections_refused_total{{reason=\"peer_uid\"}} {}",
        load(&server.connections_refused_uid)
    );
    header(
        &mut o,
        "ratelimit_connections_evicted_total",
        "counter",
        "Connections closed at max_connections, the one idle longest, to admit a new one.",
    );
    let _ = writeln!(
        o,
        "ratelimit_connections_evicted_total {}",
        load(&server.connections_evicted)
    );

    header(
        &mut o,
        "ratelimit_incidents_total",
        "counter",
        "Incidents: first refusals of a user for a limit.",
    );
    let _ = writeln!(o, "ratelimit_incidents_total {}", load(&ops.incidents));
    header(
        &mut o,
        "ratelimit_signal_flagged_total",
        "counter",
        "Requests answered with a compromise signal's action, by signal (networks: too many client networks; baseline: far above the user's usual busiest hour).",
    );
    for (signal, counted) in [
        ("networks", Counted::NetworksFlagged),
        ("baseline", Counted::BaselineFlagged),
    ] {
        let _ = writeln!(
            o,
            "ratelimit_signal_flagged_total{{signal=\"{signal}\"}} {}",
            s.get(counted)
        );
    }
    header(
        &mut o,
        "ratelimit_alerts_total",
        "counter",
        "Alert deliveries (command, webhook), by result.",
    );
    for (result, n) in [
        ("sent", &ops.alerts.sent),
        ("failed", &ops.alerts.failed),
        ("dropped", &ops.alerts.dropped),
    ] {
        let _ = writeln!(
            o,
            "ratelimit_alerts_total{{result=\"{result}\"}} {}",
            load(n)
        );
    }
    header(
        &mut o,
        "ratelimit_records_dropped_total",
        "counter",
        "Request records dropped because the recorder fell behind.",
    );
    let _ = writeln!(
        o,
        "ratelimit_records_dropped_total {}",
        load(&ops.recorder.dropped)
    );
    header(
        &mut o,
        "ratelimit_uptime_seconds",
        "gauge",
        "Seconds since start.",
    );
    let _ = writeln!(
        o,
        "ratelimit_uptime_seconds {}",
        server.uptime().as_secs_f64()
    );
    o
}

/// The cap on store calls in flight, the circuit and the local fallback.
fn guarded_store(o: &mut String, h: &Health) {
    header(
        o,
        "ratelimit_store_calls_in_flight",
        "gauge",
        "Calls to a network store (Redis) running now (max_store_calls_in_flight caps them).",
    );
    let _ = writeln!(o, "ratelimit_store_calls_in_flight {}", h.in_flight);
    header(
        o,
        "ratelimit_store_calls_refused_total",
        "counter",
        "Requests answered per on_store_error without calling the store, by reason.",
    );
    for (reason, n) in [
        ("in_flight", h.refused_in_flight),
        ("circuit_open", h.refused_circuit_open),
    ] {
        let _ = writeln!(
            o,
            "ratelimit_store_calls_refused_total{{reason=\"{reason}\"}} {n}"
        );
    }
    header(
        o,
        "ratelimit_store_circuit_open",
        "gauge",
        "1 while the store is not called after failing repeatedly (probed in the background).",
    );
    let _ = writeln!(
        o,
        "ratelimit_store_circuit_open {}",
        u8::from(h.circuit_open)
    );
    header(
        o,
        "ratelimit_store_circuit_opens_total",
        "counter",
        "Times the store's circuit opened.",
    );
    let _ = writeln!(o, "ratelimit_store_circuit_opens_total {}", h.circuit_opens);
    header(
        o,
        "ratelimit_store_fallback_active",
        "gauge",
        "1 while requests are decided with this server's own counters (on_store_error = \"local\").",
    );
    let _ = writeln!(
        o,
        "ratelimit_store_fallback_active {}",
        u8::from(h.local_active)
    );
    header(
        o,
        "ratelimit_store_fallback_seconds_total",
        "counter",
        "Seconds spent deciding with this server's own counters while the shared store failed.",
    );
    let _ = writeln!(
        o,
        "ratelimit_store_fallback_seconds_total {}",
        h.local_seconds
    );
}

/// Longest request head accepted.
const MAX_HEAD: usize = 8192;
/// Longest a scraper may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest writing the answer may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most scrapes served at once; a connection beyond it is closed at once. Prometheus
/// scrapes one at a time; this only keeps a connection flood from holding tasks and
/// buffers.
pub const MAX_SCRAPES: usize = 32;

/// Serves `GET /metrics` until `stop`.
pub async fn serve(listener: TcpListener, view: View, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    // Closed at once: dropping the stream.
                    tracing::debug!(
                        "metrics: {MAX_SCRAPES} scrapes in progress; connection closed"
                    );
                    continue;
                };
                let view = view.clone();
                tokio::spawn(async move {
                    let _ = answer(stream, &view).await;
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Finds the end of an HTTP request head (an empty line: `\r\n\r\n` or `\n\n`) in
/// a buffer that grows, looking at each byte once.
#[derive(Debug, Default)]
struct HeadEnd {
    /// Bytes of the buffer already looked at.
    scanned: usize,
}

impl HeadEnd {
    /// The length of the head in `buf`, once it is complete. `buf` must hold what
    /// it held at the previous call, and maybe more.
    fn find(&mut self, buf: &[u8]) -> Option<usize> {
        let from = self.scanned.min(buf.len());
        self.scanned = buf.len();
        let new = buf.get(from..).unwrap_or(&[]);
        memchr::memchr_iter(b'\n', new)
            .map(|i| from + i)
            .find(|&i| {
                let prev = |back: usize| i.checked_sub(back).and_then(|j| buf.get(j)).copied();
                prev(1) == Some(b'\n') || (prev(1) == Some(b'\r') && prev(2) == Some(b'\n'))
            })
            .map(|i| i + 1)
    }
}

/// Reads the request head: at most [`MAX_HEAD`] bytes within [`HEADER_TIMEOUT`].
/// `Ok(None)`: too long; `Err`: closed, failed or too slow.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let read = async {
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        let mut end = HeadEnd::default();
        loop {
            if let Some(n) = end.find(&buf) {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            if buf.len() > MAX_HEAD {
                return Ok(None);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        }
    };
    tokio::time::timeout(HEADER_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

async fn answer(mut stream: TcpStream, view: &View) -> std::io::Result<()> {
    let head = read_head(&mut stream).await?;
    tokio::time::timeout(WRITE_TIMEOUT, route(&mut stream, head.as_deref(), view))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

async fn route(stream: &mut TcpStream, head: Option<&[u8]>, view: &View) -> std::io::Result<()> {
    let Some(head) = head else {
        return respond(stream, "431 Request Header Fields Too Large", "", "").await;
    };
    let line = head.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => respond(stream, "200 OK", CONTENT_TYPE, &render(view)).await,
        ("HEAD", "/metrics") => respond(stream, "200 OK", CONTENT_TYPE, "").await,
        ("GET", "/") => {
            respond(
                stream,
                "200 OK",
                "text/plain; charset=utf-8",
                "ratelimit-policyd: metrics at /metrics\n",
            )
            .await
        }
        ("GET" | "HEAD", _) => respond(stream, "404 Not Found", "text/plain", "not found\n").await,
        _ => respond(stream, "405 Method Not Allowed", "text/plain", "GET only\n").await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_the_head_is_found_looking_at_each_byte_once() {
        for (head, want) in [
            (&b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nrest"[..], 34),
            (b"GET / HTTP/1.0\n\n", 16),
            (b"\n\n", 2),
        ] {
            // Whole, and one byte at a time.
            assert_eq!(HeadEnd::default().find(head), Some(want), "{head:?}");
            let mut end = HeadEnd::default();
            let found = (1..=head.len()).find_map(|n| {
                let got = end.find(&head[..n]);
                assert_eq!(end.scanned, n);
                got
            });
            assert_eq!(found, Some(want), "{head:?}");
        }
        let mut end = HeadEnd::default();
        assert_eq!(end.find(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
        assert_eq!(
            end.find(b"GET / HTTP/1.1\r\nA: b\r\n"),
            None,
            "no new bytes"
        );
        assert_eq!(end.find(b"GET / HTTP/1.1\r\nA: b\r\n\r\n"), Some(24));
        assert_eq!(HeadEnd::default().find(b"a\rb\r\r\n"), None);
    }
}
