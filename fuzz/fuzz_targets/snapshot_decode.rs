//! Any bytes: `snapshot::decode` gives entries or an error, never panics; and whatever it
//! accepts can be decided on with the limits its counters name without panicking.
//!
//! The input is decoded twice: as is (magic, version and checksum checks), and with a
//! correct CRC-32 appended, so the fuzzer reaches the record structure behind the checksum.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ratelimit_core::store::snapshot::decode;
use ratelimit_core::{Cost, Limit, Mode, Timestamp, Unit};

/// A stopped clock (the epoch), now, and the year 2500: a restored state is decided on
/// at each. (Times near `u64::MAX` are not tried: no clock shows them, and sub-window
/// arithmetic is only defined below them.)
const TIMES: [u64; 3] = [0, 1_700_000_000_000, 16_725_225_600_000];

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.snap");
    let _ = decode(data, path);

    let mut sealed = data.to_vec();
    sealed.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    let Ok(entries) = decode(&sealed, path) else {
        return;
    };
    for (key, mut state) in entries {
        assert!(key.len() <= usize::from(u16::MAX));
        let limits: &[Limit] = &MENU;
        for &t in &TIMES {
            let now = Timestamp::from_millis(t);
            let _ = state.is_idle(now);
            for limit in limits {
                let _ = state.used(limit, now);
            }
            for chunk in limits.chunks(ratelimit_core::MAX_LIMITS) {
                for cost in [0, 1, 7, u64::from(u32::MAX), u64::MAX] {
                    let _ = state
                        .clone()
                        .apply(chunk, Cost::units(cost), now, Mode::Peek);
                    let _ = state.apply(chunk, Cost::units(cost), now, Mode::Acquire);
                }
            }
        }
    }
});

/// A menu of limit shapes: short and longest windows, precision 1 and more, every unit,
/// both algorithms. A restored counter is read by a limit only when the ids match, and
/// libFuzzer's comparison tracing finds these 64-bit ids quickly.
static MENU: LazyLock<Vec<Limit>> = LazyLock::new(menu);

fn menu() -> Vec<Limit> {
    let mut out = Vec::new();
    for window in [1, 1_000, 60_000, 3_600_000, 86_400_000, (1u64 << 48) - 1] {
        let w = Duration::from_millis(window);
        for unit in [Unit::Messages, Unit::Recipients, Unit::Bytes] {
            for count in [1, 3, u64::from(u32::MAX)] {
                for precision in [1, 60, 8191] {
                    if let Ok(l) =
                        Limit::sliding(count, w).and_then(|l| l.with_precision(precision))
                    {
                        out.push(l.with_unit(unit));
                    }
                }
                if let Ok(l) = Limit::token_bucket(count, w, count) {
                    out.push(l.with_unit(unit));
                }
            }
        }
    }
    out
}
