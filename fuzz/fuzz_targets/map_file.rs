//! Any text as a tier map file (`assign_file`): `config::apply_map_file` never
//! panics, and either applies at most one assignment per line or fails naming the
//! file and a line of it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ratelimit_core::{Tier, TierMap};
use ratelimit_policyd::config::apply_map_file;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let tier = |name: &str| Tier::new(name, []).expect("an unlimited tier is valid");
    let mut map = TierMap::new(tier("default"));
    for name in ["bulk", "trial"] {
        map.add_tier(tier(name)).expect("distinct names");
    }
    let lines = text.lines().count();
    match apply_map_file(&mut map, text, "fuzz-map") {
        Ok(n) => assert!(n <= lines, "{n} assignments from {lines} lines"),
        Err(e) => {
            assert_eq!(e.file, "fuzz-map");
            assert!(e.line.is_some_and(|l| l >= 1 && l <= lines), "{e}");
            let _ = e.to_string();
        }
    }
    for (key, _) in map.assignments() {
        assert!(!key.is_empty());
    }
});
