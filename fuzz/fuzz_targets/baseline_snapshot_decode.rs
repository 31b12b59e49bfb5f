//! Any bytes: `decode_baselines` gives entries or an error, never panics; and every
//! state it accepts can be rolled forward, recorded into and judged at any time
//! without panicking, whatever its fields say.
//!
//! As for the counters' snapshot, the input is decoded twice: as is, and with a
//! correct CRC-32 appended, so the fuzzer reaches the entries behind the checksum.
#![no_main]

use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ratelimit_core::Timestamp;
use ratelimit_core::baseline::BaselineConfig;
use ratelimit_core::store::decode_baselines;

/// The epoch, now, and the year 2500.
const TIMES: [u64; 3] = [0, 1_700_000_000_000, 16_725_225_600_000];

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.baseline");
    let _ = decode_baselines(data, path);

    let mut sealed = data.to_vec();
    sealed.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    let Ok(entries) = decode_baselines(&sealed, path) else {
        return;
    };
    let configs = [
        BaselineConfig::new(Duration::from_secs(7 * 86_400), 5.0, 10, 7),
        BaselineConfig::new(Duration::ZERO, 1.0, 1, 1),
        BaselineConfig::new(Duration::from_secs(365 * 86_400), 255.0, 1_000_000, 365),
    ];
    for (key, state) in entries {
        assert!(key.len() <= usize::from(u16::MAX));
        for cfg in configs.iter().flatten() {
            let mut s = state;
            for &t in &TIMES {
                let now = Timestamp::from_millis(t);
                let _ = s.judge(now, cfg);
                s.roll(now, cfg);
                s.record(now, u32::MAX, cfg);
                let j = s.judge(now, cfg);
                let _ = (s.hour(), j.usual_messages(), j.learned_days());
                let _ = s.clear_hour();
            }
        }
    }
});
