//! Listing the store's keys: [`Scan`] for [`RedisStore`] and
//! [`RedisStore::try_key_count`], by `SCAN` over the key prefix (never `KEYS`),
//! and the inverse of the key naming and of the hash layout (see "Data layout"
//! in the [module docs](super)).

use super::RedisStore;
#[cfg(doc)]
use super::TimeSource;
use crate::algorithm::{Counter, CounterData, KeyState, Slot};
use crate::quota::CounterId;
use crate::store::{Scan, StoreError};

impl RedisStore {
    /// The number of keys this store holds, counted with `SCAN` (it walks the whole
    /// keyspace: for occasional statistics, not the hot path).
    pub fn try_key_count(&self) -> Result<usize, StoreError> {
        let mut count = 0;
        self.scan_names(&mut |_, names| {
            count += names.len();
            Ok(())
        })?;
        Ok(count)
    }

    fn scan_names(&self, batch: &mut NameBatch<'_>) -> Result<(), StoreError> {
        let mut pattern = String::new();
        for c in self.config.key_prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push_str("{*");
        // One server: one walk. A cluster: one walk per master, each on that node.
        let masters = self.run(|con| con.masters())?;
        for master in &masters {
            let mut cursor = 0u64;
            loop {
                let (next, names) =
                    self.run(|con| con.scan_page(master.as_ref(), cursor, &pattern))?;
                if !names.is_empty() {
                    batch(self, &names)?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }

    /// The key whose hash is `name` (the inverse of [`RedisStore::key_name`]).
    pub(super) fn key_from_name(&self, name: &str) -> Option<String> {
        let inner = name
            .strip_prefix(self.config.key_prefix.as_str())?
            .strip_prefix('{')?
            .strip_suffix('}')?;
        let mut out = Vec::with_capacity(inner.len());
        let mut bytes = inner.bytes();
        while let Some(b) = bytes.next() {
            if b == b'%' {
                let hex = [bytes.next()?, bytes.next()?];
                let hex = std::str::from_utf8(&hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
            } else {
                out.push(b);
            }
        }
        String::from_utf8(out).ok()
    }
}

/// Called with each batch of hash names that `SCAN` returns.
type NameBatch<'a> = dyn FnMut(&RedisStore, &[String]) -> Result<(), StoreError> + 'a;

/// Rebuilds a [`KeyState`] from a hash's fields (the layout in the module docs).
fn state_from_fields(fields: &[(String, String)]) -> Option<KeyState> {
    let mut state = KeyState::new();
    for (field, value) in fields {
        if field == "i" {
            let v: u128 = value.parse().ok()?;
            state.idle_at = u64::try_from(v).unwrap_or(u64::MAX);
            continue;
        }
        let id = CounterId::from_u64(field.parse().ok()?);
        let data = if id.is_bucket() {
            let (level, last) = value.split_once(':')?;
            CounterData::Bucket {
                level: level.parse().ok()?,
                last: last.parse().ok()?,
            }
        } else {
            let mut slots = smallvec::SmallVec::new();
            for slot in value.split(',').filter(|s| !s.is_empty()) {
                let (idx, count) = slot.split_once(':')?;
                slots.push(Slot {
                    idx: idx.parse().ok()?,
                    count: count.parse().ok()?,
                });
            }
            CounterData::Window(slots)
        };
        state.counters.push(Counter { id, data });
    }
    Some(state)
}

impl Scan for RedisStore {
    /// Calls `f` for every key this store holds (every hash under its prefix) with its
    /// state. Walks the keyspace with `SCAN` (never `KEYS`, so the server is not
    /// blocked) and reads each batch's hashes in one pipelined round trip. Hashes past
    /// their `idle_at` but still within the TTL grace are included: check
    /// [`KeyState::is_idle`] (with the Redis server's time under
    /// [`TimeSource::Server`]). Keys written meanwhile may or may not be seen. A Redis
    /// failure ends the scan with its error, after `f` has seen the keys read so far.
    fn scan(&self, f: &mut dyn FnMut(&str, &KeyState)) -> Result<(), StoreError> {
        self.scan_names(&mut |store, names| {
            let hashes = store.run(|con| con.hgetall_all(names))?;
            for (name, fields) in names.iter().zip(hashes) {
                // Expired between SCAN and HGETALL, or not one of ours.
                let Some(key) = store.key_from_name(name) else {
                    continue;
                };
                if fields.is_empty() {
                    continue;
                }
                let state = state_from_fields(&fields).ok_or_else(|| {
                    StoreError::Protocol(format!("unreadable rate-limit state in {name}"))
                })?;
                f(&key, &state);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedisStoreConfig;

    #[test]
    fn key_names_are_escaped_and_distinct() {
        let store = RedisStore::new(RedisStoreConfig::new("redis://127.0.0.1/")).unwrap();
        let keys = ["a}b", "a%7Db", "a b", "a\nb", "ümlaut@例え.jp", "", "{x}"];
        let names: Vec<String> = keys.iter().map(|k| store.key_name(k)).collect();
        for (k, n) in keys.iter().zip(&names) {
            let inner = &n["rl:{".len()..n.len() - 1];
            assert!(!inner.contains(['{', '}', ' ', '\n']), "{k:?} -> {n}");
        }
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert_eq!(names[4], "rl:{ümlaut@例え.jp}");
        for (k, n) in keys.iter().zip(&names) {
            assert_eq!(store.key_from_name(n).as_deref(), Some(*k));
        }
        assert_eq!(store.key_from_name("rl:{a%2}"), None);
        assert_eq!(store.key_from_name("other:{a}"), None);
    }
}
