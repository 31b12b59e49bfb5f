//! Snapshots of a [`MemoryStore`]: written atomically, versioned, checksummed.
//!
//! # Format (version 1)
//!
//! All integers little-endian.
//!
//! ```text
//! magic    8 bytes  "RLSNAP\r\n"
//! version  u32      1
//! written  u64      wall-clock ms when the snapshot was taken
//! entries  repeated:
//!   tag      u8     1 = entry, 0 = end
//!   key      u16 length + UTF-8 bytes
//!   idle_at  u64    ms
//!   counters u8 count, each:
//!     id     u64    CounterId (algorithm, unit, window, precision)
//!     window: u16 slot count, then (u32 sub-window, u32 count) per slot
//!     bucket: u64 level, u64 last
//! end      u64      number of entries
//! crc32    u32      over every byte before it
//! ```
//!
//! Timestamps are wall-clock, so a snapshot restored after a restart is read at the
//! current time: what has decayed meanwhile is gone, the rest still counts.
//!
//! # Examples
//!
//! Save a store before stopping, restore it into the next one:
//!
//! ```
//! use ratelimit_core::{Cost, Limit, MemoryStore, Mode, Store, Timestamp};
//! use std::time::Duration;
//!
//! let path = std::env::temp_dir().join(format!("ratelimit-doc-{}.snap", std::process::id()));
//! let limits = ["2/1h".parse::<Limit>().unwrap()];
//! let now = Timestamp::from_millis(1_700_000_000_000);
//!
//! let before = MemoryStore::new();
//! let _ = before.check("alice", &limits, Cost::units(2), now, Mode::Acquire).unwrap();
//! let saved = before.save_snapshot(&path, now).unwrap();
//! assert_eq!(saved.keys, 1);
//!
//! // A minute later, in a new process: alice has still used her two.
//! let later = now.saturating_add(Duration::from_secs(60));
//! let after = MemoryStore::new();
//! let restored = after.load_snapshot(&path, later).unwrap();
//! assert_eq!(restored.restored, 1);
//! let d = after.check("alice", &limits, Cost::units(1), later, Mode::Peek).unwrap();
//! assert!(!d.is_allowed());
//! # std::fs::remove_file(&path).unwrap();
//! ```

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use smallvec::SmallVec;

use super::{MemoryStore, StoreError};
use crate::algorithm::{Counter, CounterData, KeyState, Slot};
use crate::clock::Timestamp;
use crate::quota::{CounterId, MAX_PRECISION, MAX_WINDOW_MS};

const MAGIC: &[u8; 8] = b"RLSNAP\r\n";
/// The snapshot format version this code writes and reads.
pub const VERSION: u32 = 1;

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Reading or writing the file failed.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The file does not start with the snapshot magic.
    #[error("snapshot {0}: not a ratelimit snapshot (bad magic bytes)")]
    NotASnapshot(PathBuf),
    /// The file was written by another format version.
    #[error("snapshot {path}: format version {found}, this build reads version {VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
    },
    /// The file ends early.
    #[error("snapshot {path}: truncated at byte {offset} (the file is incomplete)")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Where the data ran out.
        offset: usize,
    },
    /// The checksum does not match: the file was damaged.
    #[error("snapshot {0}: checksum mismatch (the file is corrupt or was cut short)")]
    Checksum(PathBuf),
    /// The content is inconsistent.
    #[error("snapshot {path}: corrupt at byte {offset}: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: usize,
        /// What is wrong.
        what: String,
    },
    /// The store refused an entry while restoring.
    #[error("snapshot {path}: cannot restore: {source}")]
    Store {
        /// The file.
        path: PathBuf,
        /// The store's error.
        source: StoreError,
    },
}

/// Counters for a written or restored snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotStats {
    /// Keys written, or read from the file.
    pub keys: usize,
    /// Keys restored (read minus those that had decayed).
    pub restored: usize,
    /// File size in bytes.
    pub bytes: u64,
}

pub(super) struct CrcWriter<W: Write> {
    pub(super) inner: W,
    pub(super) crc: crc32fast::Hasher,
    pub(super) written: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn encode_entry(out: &mut Vec<u8>, key: &str, state: &KeyState) {
    // Keys longer than u16::MAX cannot be stored; such keys are not produced by the
    // policy server (its lines are limited), and are skipped here rather than truncated.
    let Ok(klen) = u16::try_from(key.len()) else {
        return;
    };
    out.push(1);
    out.extend_from_slice(&klen.to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&state.idle_at.to_le_bytes());
    let n = state.counters.len().min(usize::from(u8::MAX));
    out.push(n as u8);
    for c in state.counters.iter().take(n) {
        out.extend_from_slice(&c.id.as_u64().to_le_bytes());
        match &c.data {
            CounterData::Window(slots) => {
                let m = slots.len().min(usize::from(u16::MAX));
                out.extend_from_slice(&(m as u16).to_le_bytes());
                for s in slots.iter().take(m) {
                    out.extend_from_slice(&s.idx.to_le_bytes());
                    out.extend_from_slice(&s.count.to_le_bytes());
                }
            }
            CounterData::Bucket { level, last } => {
                out.extend_from_slice(&level.to_le_bytes());
                out.extend_from_slice(&last.to_le_bytes());
            }
        }
    }
}

impl MemoryStore {
    /// Writes every tracked key to `path` atomically: a temporary file in the same
    /// directory is written, synced, and renamed over `path`, so a crash leaves either
    /// the old snapshot or the new one. The file is created mode 0600 (it names
    /// every user). Locks one shard at a time (only while copying
    /// its entries to a buffer), so decisions go on meanwhile.
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
            w.write_all(&VERSION.to_le_bytes())?;
            w.write_all(&now.as_millis().to_le_bytes())?;
            let mut count = 0usize;
            let mut buf = Vec::with_capacity(1 << 16);
            let mut first_err = None;
            self.for_each_state(&mut |key, state| {
                if state.is_idle(now) || first_err.is_some() {
                    return;
                }
                encode_entry(&mut buf, key, state);
                count += 1;
                if buf.len() >= 1 << 16 {
                    if let Err(e) = w.write_all(&buf) {
                        first_err = Some(e);
                    }
                    buf.clear();
                }
            });
            if let Some(e) = first_err {
                return Err(e);
            }
            w.write_all(&buf)?;
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
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename durable; not every filesystem supports syncing a directory.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(SnapshotStats {
            keys: count,
            restored: 0,
            bytes: w.written,
        })
    }

    /// Reads a snapshot written by [`MemoryStore::save_snapshot`] into this store,
    /// reading it at `now`: keys that have decayed meanwhile are skipped, the others
    /// replace what this store holds for them. The whole file is checked (magic,
    /// version, checksum, structure) before anything is restored: a corrupt,
    /// truncated or other-version file changes nothing and gives an error that says
    /// what is wrong and where.
    ///
    /// A snapshot with more live keys than this store has room for (written by a
    /// store with a larger `max_keys`) still restores: keys make room as new keys
    /// do, and they are restored least recently active first (by when they would
    /// have decayed), so the ones kept are the most recently active.
    pub fn load_snapshot(
        &self,
        path: &Path,
        now: Timestamp,
    ) -> Result<SnapshotStats, SnapshotError> {
        let bytes = fs::read(path).map_err(|source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut entries = decode(&bytes, path)?;
        if entries.len().saturating_add(self.key_count()) > self.max_keys() {
            entries.sort_by_key(|(_, state)| state.idle_at);
        }
        let mut stats = SnapshotStats {
            keys: entries.len(),
            restored: 0,
            bytes: bytes.len() as u64,
        };
        for (key, state) in entries {
            if state.is_idle(now) {
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

/// Creates (or truncates) `path` for writing, readable and writable by the owner
/// only (0600): a snapshot names every user. A file left over by a crash keeps its
/// old mode through `open`, so the mode is set on the open file too.
pub(super) fn create_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

pub(super) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

pub(super) struct Reader<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
    pub(super) path: &'a Path,
}

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(SnapshotError::Truncated {
                path: self.path.to_path_buf(),
                offset: self.buf.len(),
            }),
        }
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(super) fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.array::<1>()?[0])
    }
    pub(super) fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(super) fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(super) fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(super) fn corrupt(&self, what: impl Into<String>) -> SnapshotError {
        SnapshotError::Corrupt {
            path: self.path.to_path_buf(),
            offset: self.pos,
            what: what.into(),
        }
    }
}

/// Decodes a whole snapshot image; never panics on any input.
///
/// Not part of the API (hidden from the docs, may change in any release): public
/// only so the `snapshot_decode` fuzz target and `tests/snapshot.rs` can feed it
/// bytes. Embedders read snapshots with [`MemoryStore::load_snapshot`].
#[doc(hidden)]
pub fn decode(bytes: &[u8], path: &Path) -> Result<Vec<(String, KeyState)>, SnapshotError> {
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
    if version != VERSION {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found: version,
        });
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
        // A file cut short fails here too; say "truncated" when the end marker is missing.
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
        let idle_at = r.u64()?;
        let n = r.u8()?;
        let mut counters = SmallVec::new();
        for _ in 0..n {
            let id = CounterId::from_u64(r.u64()?);
            let window = id.window_ms();
            if window == 0 || window > MAX_WINDOW_MS {
                return Err(r.corrupt(format!("counter of key \"{key}\" has window {window} ms")));
            }
            let data = if id.is_bucket() {
                if id.precision() != 0 {
                    return Err(
                        r.corrupt(format!("bucket counter of key \"{key}\" has a precision"))
                    );
                }
                CounterData::Bucket {
                    level: r.u64()?,
                    last: r.u64()?,
                }
            } else {
                let p = id.precision();
                if p == 0 || p > u64::from(MAX_PRECISION) || !window.is_multiple_of(p) {
                    return Err(r.corrupt(format!(
                        "window counter of key \"{key}\" has precision {p} for a {window} ms window"
                    )));
                }
                let m = r.u16()?;
                let mut slots = SmallVec::new();
                for _ in 0..m {
                    slots.push(Slot {
                        idx: r.u32()?,
                        count: r.u32()?,
                    });
                }
                CounterData::Window(slots)
            };
            counters.push(Counter { id, data });
        }
        entries.push((key, KeyState { idle_at, counters }));
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
