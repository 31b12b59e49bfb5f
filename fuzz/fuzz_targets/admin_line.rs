//! Any admin request line: `admin::handle_line` answers with a reply that encodes,
//! never panics; a line that is not a command is an error reply. A command that
//! parses survives a JSON round trip, and the CLI renders any reply value to a
//! command without panicking and without a raw control character.
//!
//! The server runs the built-in configuration on a manual clock, with the tier
//! overrides file under `/dev/null/` so that `tier` is checked but never written.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use ratelimit_core::{ManualClock, Timestamp};
use ratelimit_policyd::admin::{self, Command, Context};
use ratelimit_policyd::daemon::Daemon;
use ratelimit_policyd::ops::View;

struct World {
    rt: tokio::runtime::Runtime,
    ctx: Context,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let mut cfg = ratelimit_policyd::config::builtin();
        cfg.ops.admin.tier_overrides = "/dev/null/tier-overrides".into();
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_700_000_000_000)));
        let daemon = Daemon::new(cfg, clock).expect("the built-in configuration starts");
        let view = View {
            policy: daemon.policy.clone(),
            server: daemon.server.clone(),
            ops: daemon.ops.clone(),
        };
        World {
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a runtime"),
            ctx: Context { view, reload: None },
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let reply = w.rt.block_on(admin::handle_line(data, &w.ctx));
    serde_json::to_vec(&reply).expect("every reply encodes");
    assert_eq!(reply.ok, reply.error.is_none());

    match serde_json::from_slice::<Command>(data.trim_ascii()) {
        Ok(cmd) => {
            let line = serde_json::to_vec(&cmd).expect("a command encodes");
            let again: Command = serde_json::from_slice(&line).expect("and decodes");
            assert_eq!(again, cmd);
            // The CLI renders what a server answers: any JSON value.
            if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
                if let Ok(text) = admin::render(&cmd, value) {
                    assert!(
                        !text.chars().any(|c| c.is_control() && c != '\n'),
                        "raw control character in {text:?}"
                    );
                }
            }
        }
        Err(_) => assert!(!reply.ok, "not a command, yet ok: {reply:?}"),
    }
});
