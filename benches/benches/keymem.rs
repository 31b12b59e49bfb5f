//! Bytes per tracked key: the memory store (sliding window, token bucket) and
//! governor's keyed limiter, each holding 1M keys whose user has sent three
//! messages spread over the last hour.
//!
//! `cargo bench -p ratelimit-benches --bench keymem [-- --keys N]` prints a
//! Markdown table. Each case runs in a child process of its own (this binary
//! with `--case NAME`), so that memory freed by one case and kept by the
//! allocator does not hide the growth of the next.
//!
//! Two measures per case, both as the increase over building the structure and
//! touching every key:
//! - heap: bytes requested from the allocator and not yet freed, counted by a
//!   global allocator that wraps the system one (what the data structures ask
//!   for, table slack included, malloc's own overhead excluded), plus the bytes
//!   of the memory store's tables that it maps directly from the kernel so they
//!   can sit on huge pages ([`MemoryStore::mapped_bytes`]);
//! - RSS: `VmRSS` from `/proc/self/status` (what the process really holds,
//!   malloc overhead included; page-granular, so only meaningful for many keys).
//!
//! It is a bench target rather than a `src/bin` binary so that governor stays a
//! dev-dependency of the bench crate.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::{Clock, FakeRelativeClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use ratelimit_benches::keyspace::{Cursor, MESSAGES_PER_HOUR, T0_MS, render_key, step_nanos};
use ratelimit_core::{Cost, KeyState, Limit, MemoryStore, Mode, Store, Timestamp};

/// Bytes the structures hold: what the counting allocator has handed out and
/// not taken back, plus the memory store's tables of 2 MiB and more, which it
/// maps directly from the kernel (for huge pages) and the allocator never sees.
fn heap_bytes() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed) + MemoryStore::mapped_bytes()
}

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees hold; the counter is only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `alloc_zeroed`'s contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `realloc`'s contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const CASES: [(&str, &str); 3] = [
    ("sliding", "ratelimit MemoryStore, sliding window 100/1h"),
    (
        "bucket",
        "ratelimit MemoryStore, token bucket 100/1h burst 100",
    ),
    (
        "governor",
        "governor keyed (DashMap<String>), 100/h burst 100",
    ),
];

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

/// Sends every key's messages for the last hour through `check`, on the
/// benches' schedule; returns the (heap, RSS) increase, measured while the
/// structure `build` made is still alive.
fn measure<T>(
    keys: u32,
    build: impl FnOnce() -> T,
    check: impl Fn(&T, &String, u64) -> bool,
) -> (usize, usize) {
    let step = step_nanos(u64::from(keys));
    let mut cursor = Cursor::all(keys, 1);
    let mut key = String::with_capacity(32);
    let (heap0, rss0) = (heap_bytes(), rss_bytes());
    let target = build();
    for j in 0..MESSAGES_PER_HOUR * u64::from(keys) {
        render_key(cursor.next_index(), &mut key);
        assert!(check(&target, &key, j * step), "a check was refused");
    }
    let grown = (heap_bytes() - heap0, rss_bytes().saturating_sub(rss0));
    black_box(&target);
    grown
}

fn run_case(case: &str, keys: u32) -> (usize, usize) {
    let hour = Duration::from_secs(3600);
    let at = |nanos: u64| Timestamp::from_millis(T0_MS + nanos / 1_000_000);
    match case {
        "sliding" | "bucket" => {
            let limit = if case == "sliding" {
                "100/1h".parse::<Limit>().unwrap()
            } else {
                Limit::token_bucket(100, hour, 100).unwrap()
            };
            measure(keys, MemoryStore::new, |store, key, nanos| {
                store
                    .check(key, &[limit], Cost::message(1, 0), at(nanos), Mode::Acquire)
                    .expect("below the key cap")
                    .is_allowed()
            })
        }
        "governor" => {
            let clock = FakeRelativeClock::default();
            let n = NonZeroU32::new(100).unwrap();
            let quota = Quota::per_hour(n).allow_burst(n);
            let limiter = || {
                let limiter: RateLimiter<
                    String,
                    DefaultKeyedStateStore<String>,
                    _,
                    NoOpMiddleware<_>,
                > = RateLimiter::new(quota, DefaultKeyedStateStore::default(), clock.clone());
                (limiter, clock.clone())
            };
            measure(keys, limiter, |(limiter, clock), key, nanos| {
                let behind = nanos.saturating_sub(clock.now().as_u64());
                clock.advance(Duration::from_nanos(behind));
                limiter.check_key(key).is_ok()
            })
        }
        other => panic!("unknown case {other}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let keys: u32 = value("--keys").map_or(1_000_000, |k| k.parse().expect("--keys N"));
    if let Some(case) = value("--case") {
        let (heap, rss) = run_case(&case, keys);
        println!("{heap} {rss}");
        return;
    }
    println!(
        "Bytes per tracked key, {keys} keys, {MESSAGES_PER_HOUR} messages each over the last hour"
    );
    println!(
        "(size_of::<KeyState>() = {} bytes)\n",
        size_of::<KeyState>()
    );
    println!("| store | heap bytes/key | RSS bytes/key |");
    println!("|---|---:|---:|");
    let exe = std::env::current_exe().expect("own path");
    for (case, label) in CASES {
        let out = Command::new(&exe)
            .args(["--case", case, "--keys", &keys.to_string()])
            .output()
            .expect("run a keymem case");
        assert!(
            out.status.success(),
            "case {case} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout).expect("utf-8");
        let mut fields = line
            .split_whitespace()
            .map(|f| f.parse::<f64>().expect("a number"));
        let (heap, rss) = (fields.next().unwrap(), fields.next().unwrap());
        let per = |b: f64| b / f64::from(keys);
        println!("| {label} | {:.1} | {:.1} |", per(heap), per(rss));
    }
}
