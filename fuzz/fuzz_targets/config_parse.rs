//! Any text: `config::parse` returns a config or an error naming the file, never panics.
//!
//! Inputs that set `assign_file` are skipped: it names a file to read, and a fuzzer that
//! writes `assign_file = "/dev/zero"` would only be testing the disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ratelimit_policyd::config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(table) = text.parse::<toml::Table>()
        && table.contains_key("assign_file")
    {
        return;
    }
    match config::parse(text, "fuzz.toml", None) {
        Ok(cfg) => {
            // What check-config prints must be computable for any valid config.
            let _ = config::describe(&cfg);
            assert!(cfg.server.max_connections >= 1);
            assert!(!cfg.server.listen.is_empty());
        }
        Err(e) => {
            assert_eq!(e.file, "fuzz.toml");
            let _ = e.to_string();
        }
    }
});
