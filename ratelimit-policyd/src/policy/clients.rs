//! The last few distinct client addresses of each user, so an incident line can say
//! where the mail came from (one address for a customer's own mail server, dozens
//! for a phished password used by a botnet).
//!
//! Bounded twice: at most [`PER_USER`] addresses per user, and at most
//! [`MAX_USERS`] users; a shard that fills up is cleared (the next incidents then
//! show fewer addresses, nothing else is affected). Updating an already-known user
//! takes one shard lock and allocates nothing; when the address is the one it was
//! last seen from, spelled the same, it is not even parsed.

use std::net::IpAddr;

use ahash::{AHashMap, RandomState};
use parking_lot::Mutex;

use crate::striped::Padded;

/// Addresses kept per user (most recent first).
pub const PER_USER: usize = 4;
/// Users tracked in all.
pub const MAX_USERS: usize = 65_536;
const SHARDS: usize = 16;

/// Longest `client_address` kept as sent (an IPv6 address in full is 39 bytes).
const RAW_MAX: usize = 39;

/// The addresses of one user, most recent first.
struct Recent {
    addrs: [Option<IpAddr>; PER_USER],
    /// `client_address` as sent when `addrs[0]` was last noted, if at most
    /// [`RAW_MAX`] bytes (`raw_len` 0: not kept).
    raw: [u8; RAW_MAX],
    raw_len: u8,
}

impl Recent {
    /// Whether `client` is spelled as the address last noted.
    fn last_is(&self, client: &[u8]) -> bool {
        self.raw_len != 0 && self.raw.get(..usize::from(self.raw_len)) == Some(client)
    }

    /// Keeps `client` as the spelling of `addrs[0]`, when it fits.
    fn keep_raw(&mut self, client: &[u8]) {
        match self.raw.get_mut(..client.len()) {
            Some(raw) if !client.is_empty() => {
                raw.copy_from_slice(client);
                self.raw_len = client.len() as u8;
            }
            _ => self.raw_len = 0,
        }
    }
}

/// One shard: users and their recent addresses.
type Shard = Mutex<AHashMap<Box<str>, Recent>>;

/// Last client addresses per user.
pub struct ClientsSeen {
    hasher: RandomState,
    /// Padded: unpadded (72 bytes each), neighbouring shards shared cache lines, so
    /// threads noting users of different shards still took each other's lines.
    shards: [Padded<Shard>; SHARDS],
}

impl Default for ClientsSeen {
    fn default() -> Self {
        ClientsSeen {
            hasher: RandomState::new(),
            shards: std::array::from_fn(|_| Padded(Mutex::new(AHashMap::new()))),
        }
    }
}

impl ClientsSeen {
    fn shard(&self, user: &str) -> &Shard {
        let i = (self.hasher.hash_one(user) as usize) % SHARDS;
        &self.shards[i].0
    }

    /// Notes that `user` sent from `client` (the raw `client_address`; ignored when
    /// absent or not an IP address).
    pub fn note(&self, user: &str, client: Option<&[u8]>) {
        let Some(client) = client else {
            return;
        };
        let parse = || {
            std::str::from_utf8(client)
                .ok()
                .and_then(|c| c.parse::<IpAddr>().ok())
        };
        let mut map = self.shard(user).lock();
        if let Some(recent) = map.get_mut(user) {
            // The same spelling parses to the same address, already the most recent.
            if recent.last_is(client) {
                return;
            }
            let Some(ip) = parse() else {
                return;
            };
            push(&mut recent.addrs, ip);
            recent.keep_raw(client);
            return;
        }
        let Some(ip) = parse() else {
            return;
        };
        if map.len() >= MAX_USERS / SHARDS {
            map.clear();
        }
        let mut recent = Recent {
            addrs: [None; PER_USER],
            raw: [0; RAW_MAX],
            raw_len: 0,
        };
        recent.addrs[0] = Some(ip);
        recent.keep_raw(client);
        map.insert(user.into(), recent);
    }

    /// How many users' addresses are kept (at most [`MAX_USERS`]).
    pub fn users(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().len()).sum()
    }

    /// The addresses `user` was last seen from, most recent first.
    pub fn get(&self, user: &str) -> Vec<IpAddr> {
        self.shard(user)
            .lock()
            .get(user)
            .map(|r| r.addrs.iter().flatten().copied().collect())
            .unwrap_or_default()
    }
}

/// Moves `ip` to the front, keeping the others in order and dropping the oldest.
fn push(recent: &mut [Option<IpAddr>; PER_USER], ip: IpAddr) {
    if recent[0] == Some(ip) {
        return;
    }
    let at = recent
        .iter()
        .position(|r| *r == Some(ip))
        .unwrap_or(PER_USER - 1);
    recent[..=at].rotate_right(1);
    recent[0] = Some(ip);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_distinct_addresses_most_recent_first() {
        let c = ClientsSeen::default();
        for a in [
            "192.0.2.1",
            "192.0.2.2",
            "192.0.2.1",
            "192.0.2.3",
            "192.0.2.4",
        ] {
            c.note("alice", Some(a.as_bytes()));
        }
        let got: Vec<String> = c.get("alice").iter().map(|i| i.to_string()).collect();
        assert_eq!(got, ["192.0.2.4", "192.0.2.3", "192.0.2.1", "192.0.2.2"]);
        c.note("alice", Some(b"192.0.2.5"));
        let got: Vec<String> = c.get("alice").iter().map(|i| i.to_string()).collect();
        assert_eq!(got, ["192.0.2.5", "192.0.2.4", "192.0.2.3", "192.0.2.1"]);
        c.note("alice", Some(b"not-an-ip"));
        c.note("alice", None);
        assert_eq!(c.get("alice").len(), PER_USER);
        assert!(c.get("bob").is_empty());
    }

    #[test]
    fn spellings_of_one_address_count_once() {
        let c = ClientsSeen::default();
        let long = "0000:0000:0000:0000:0000:ffff:192.0.2.123"; // over RAW_MAX
        for a in [
            "2001:db8::1",
            "192.0.2.123",
            "2001:0db8::1",
            long,
            "192.0.2.123",
        ] {
            c.note("alice", Some(a.as_bytes()));
        }
        let got: Vec<String> = c.get("alice").iter().map(|i| i.to_string()).collect();
        assert_eq!(got, ["192.0.2.123", "::ffff:192.0.2.123", "2001:db8::1"]);
        // A bad address after a good one changes nothing, and the good one is still
        // recognised when it comes again.
        c.note("alice", Some(b"192.0.2.123x"));
        c.note("alice", Some(b"192.0.2.123"));
        c.note("alice", Some(b""));
        assert_eq!(c.get("alice").len(), 3);
    }

    #[test]
    fn the_number_of_users_is_bounded() {
        let c = ClientsSeen::default();
        for i in 0..MAX_USERS * 2 {
            c.note(&format!("u{i}"), Some(b"192.0.2.123"));
        }
        let total: usize = c.shards.iter().map(|s| s.0.lock().len()).sum();
        assert!(total <= MAX_USERS, "{total}");
    }
}
