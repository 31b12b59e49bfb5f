//! Any bytes as a tier overrides file: `admin::overrides::parse` never panics, keeps
//! only lines `admin tier` could have written (valid user and tier names), reports
//! every other non-blank line as skipped with the file and its line, and what it
//! keeps, written back as the server writes it, reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ratelimit_policyd::admin::overrides;
use ratelimit_policyd::config::check_tier_name;

fuzz_target!(|data: &[u8]| {
    let o = overrides::parse(data, "fuzz-overrides");
    let lines = data.split(|b| *b == b'\n').count();
    for e in &o.skipped {
        assert_eq!(e.file, "fuzz-overrides");
        assert!(e.line.is_some_and(|l| l >= 1 && l <= lines), "{e}");
        let _ = e.to_string();
    }
    let mut text = String::new();
    for (user, tier) in &o.tiers {
        overrides::check_user(user).unwrap_or_else(|e| panic!("kept {user:?}: {e}"));
        check_tier_name(tier).unwrap_or_else(|e| panic!("kept {tier:?}: {e}"));
        text.push_str(&format!("{user} {tier}\n"));
    }
    let again = overrides::parse(text.as_bytes(), "fuzz-overrides");
    assert!(again.skipped.is_empty(), "{:?}", again.skipped);
    assert_eq!(again.tiers, o.tiers);
});
