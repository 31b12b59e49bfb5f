//! Snapshots of a [`BaselineMemoryStore`]: the users' learned baselines, in a file of
//! their own beside the counters' snapshot (so a counters snapshot written before
//! baselines existed still loads, and one store's format never changes with the
//! other's).
//!
//! # Format (version 1)
//!
//! All integers little-endian; framing as in [`super::snapshot`].
//!
//! ```text
//! magic    8 bytes  "RLBASE\r\n"
//! version  u32      1
//! written  u64      wall-clock ms when the snapshot was taken
//! entries  repeated:
//!   tag      u8     1 = entry, 0 = end
//!   key      u16 length + UTF-8 bytes
//!   state    34 bytes: slot u32, 7 × count u16, day u32, day_max u32, usual u32, since u32
//! end      u64      number of entries
//! crc32    u32      over every byte before it
//! ```
//!
//! A state is restored as it was saved and rolled at its next observation: slots and
//! days that have passed meanwhile count as they would have, so a baseline learned from a month of recorded
//! traffic (`ratelimit-policyd replay --write-snapshot`) starts a server with every
//! user already judged.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use super::BaselineMemoryStore;
use super::snapshot::{CrcWriter, Reader, SnapshotError, SnapshotStats, create_private, tmp_path};
use crate::baseline::{BaselineState, SLOTS};
use crate::clock::Timestamp;

const MAGIC: &[u8; 8] = b"RLBASE\r\n";
/// The baseline snapshot format version this code writes and reads.
pub const BASELINE_VERSION: u32 = 1;

fn encode(out: &mut Vec<u8>, key: &str, s: &BaselineState) {
    let Ok(klen) = u16::try_from(key.len()) else {
        return;
    };
    out.push(1);
    out.extend_from_slice(&klen.to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&s.slot.to_le_bytes());
    for c in s.counts {
        out.extend_from_slice(&c.to_le_bytes());
    }
    for v in [s.day, s.day_max, s.usual, s.since] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

impl BaselineMemoryStore {
    /// Writes every key that is not empty at `now` to `path` atomically (a temporary
    /// file in the same directory, synced and renamed; mode 0600). Locks one shard
    /// at a time, only while copying its states.
    pub fn save_snapshot(
        &self,
        path: &Path,
        now: Timestamp,
    ) -> Result<SnapshotStats, SnapshotError> {
        let io_err = |source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        };
        let tmp = tmp_path(path);
        let file = create_private(&tmp).map_err(io_err)?;
        let mut w = CrcWriter {
            inner: BufWriter::with_capacity(1 << 16, file),
            crc: crc32fast::Hasher::new(),
            written: 0,
        };
        let result = (|| -> io::Result<usize> {
            w.write_all(MAGIC)?;
            w.write_all(&BASELINE_VERSION.to_le_bytes())?;
            w.write_all(&now.as_millis().to_le_bytes())?;
            let mut count = 0usize;
            let mut buf = Vec::with_capacity(1 << 16);
            for shard in self.shards.iter() {
                {
                    let shard = shard.lock();
                    for e in &shard.entries {
                        if !e.state.is_empty() && e.key.len() <= usize::from(u16::MAX) {
                            encode(&mut buf, &e.key, &e.state);
                            count += 1;
                        }
                    }
                }
                w.write_all(&buf)?;
                buf.clear();
            }
            w.write_all(&[0])?;
            w.write_all(&(count as u64).to_le_bytes())?;
            let crc = w.crc.clone().finalize();
            w.write_all(&crc.to_le_bytes())?;
            w.flush()?;
            w.inner.get_ref().sync_all()?;
            Ok(count)
        })();
        let count = match result {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(io_err(e));
            }
        };
        fs::rename(&tmp, path).map_err(io_err)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(SnapshotStats {
            keys: count,
            restored: 0,
            bytes: w.written,
        })
    }

    /// Reads a snapshot written by [`BaselineMemoryStore::save_snapshot`] into this
    /// store: each state replaces what the store holds for its key, as it was saved
    /// (the next observation rolls it to its time; `now` only serves eviction if the
    /// store is full). The whole file is checked first; a bad file changes nothing
    /// and says what is wrong and where.
    pub fn load_snapshot(
        &self,
        path: &Path,
        now: Timestamp,
    ) -> Result<SnapshotStats, SnapshotError> {
        let bytes = fs::read(path).map_err(|source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let entries = decode_baselines(&bytes, path)?;
        let mut stats = SnapshotStats {
            keys: entries.len(),
            restored: 0,
            bytes: bytes.len() as u64,
        };
        for (key, state) in entries {
            if state.is_empty() {
                continue;
            }
            self.insert_state(&key, state, now)
                .map_err(|source| SnapshotError::Store {
                    path: path.to_path_buf(),
                    source,
                })?;
            stats.restored += 1;
        }
        Ok(stats)
    }
}

/// Decodes a whole baseline snapshot image; never panics on any input.
#[doc(hidden)]
pub fn decode_baselines(
    bytes: &[u8],
    path: &Path,
) -> Result<Vec<(String, BaselineState)>, SnapshotError> {
    let mut r = Reader {
        buf: bytes,
        pos: 0,
        path,
    };
    if r.take(MAGIC.len())
        .map_err(|_| SnapshotError::NotASnapshot(path.to_path_buf()))?
        != MAGIC
    {
        return Err(SnapshotError::NotASnapshot(path.to_path_buf()));
    }
    let version = r.u32()?;
    if version != BASELINE_VERSION {
        return Err(r.corrupt(format!(
            "baseline snapshot format version {version}, this build reads version {BASELINE_VERSION}"
        )));
    }
    if bytes.len() < MAGIC.len() + 4 + 8 + 1 + 8 + 4 {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            offset: bytes.len(),
        });
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != stored {
        return Err(SnapshotError::Checksum(path.to_path_buf()));
    }
    r.buf = body;
    let _written = r.u64()?;
    let mut entries = Vec::new();
    loop {
        match r.u8()? {
            0 => break,
            1 => {}
            tag => return Err(r.corrupt(format!("unknown record tag {tag}"))),
        }
        let klen = usize::from(r.u16()?);
        let key = std::str::from_utf8(r.take(klen)?)
            .map_err(|_| r.corrupt("a key is not valid UTF-8"))?
            .to_string();
        let slot = r.u32()?;
        let mut counts = [0u16; SLOTS];
        for c in counts.iter_mut() {
            *c = r.u16()?;
        }
        let state = BaselineState {
            slot,
            counts,
            day: r.u32()?,
            day_max: r.u32()?,
            usual: r.u32()?,
            since: r.u32()?,
        };
        entries.push((key, state));
    }
    let count = r.u64()?;
    if count != entries.len() as u64 {
        return Err(r.corrupt(format!(
            "the end record says {count} keys but {} were read",
            entries.len()
        )));
    }
    if r.pos != r.buf.len() {
        return Err(r.corrupt("bytes after the end record"));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baseline::{BaselineConfig, BaselineStore};
    use std::time::Duration;

    #[test]
    fn baselines_survive_a_snapshot_and_bad_files_change_nothing() {
        let cfg = BaselineConfig::new(Duration::ZERO, 5.0, 10, 7).unwrap();
        let day = 86_400_000;
        let store = BaselineMemoryStore::new(100);
        for d in 0..10u64 {
            let t = Timestamp::from_millis((20_000 + d) * day);
            let _ = store.observe("alice", 3, &cfg, t).unwrap();
            let _ = store.observe("bob", 40, &cfg, t).unwrap();
        }
        let now = Timestamp::from_millis(20_010 * day);
        let path = std::env::temp_dir().join(format!("rl-baseline-{}.snap", std::process::id()));
        let saved = store.save_snapshot(&path, now).unwrap();
        assert_eq!(saved.keys, 2);
        let restored = BaselineMemoryStore::new(100);
        let stats = restored.load_snapshot(&path, now).unwrap();
        assert_eq!((stats.keys, stats.restored), (2, 2));
        for k in ["alice", "bob"] {
            assert_eq!(
                restored.observe(k, 0, &cfg, now).unwrap(),
                store.observe(k, 0, &cfg, now).unwrap()
            );
        }
        let bytes = fs::read(&path).unwrap();
        for cut in [0, 5, 12, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode_baselines(&bytes[..cut], &path).is_err(), "{cut}");
        }
        let mut flipped = bytes.clone();
        flipped[30] ^= 1;
        assert!(matches!(
            decode_baselines(&flipped, &path),
            Err(SnapshotError::Checksum(_))
        ));
        // A counters snapshot is not a baseline snapshot.
        assert!(matches!(
            decode_baselines(b"RLSNAP\r\n\x01\0\0\0", &path),
            Err(SnapshotError::NotASnapshot(_))
        ));
        fs::remove_file(&path).unwrap();
    }
}
