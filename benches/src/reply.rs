//! Reading policy replies: `action=<word> [text]` lines ended by an empty line.

use std::fmt;
use std::ops::Range;

/// Replies longer than this without an empty line are malformed.
pub const MAX_REPLY: usize = 64 * 1024;

/// Outcome of looking for one reply at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// No empty line yet: read more.
    Partial,
    /// A whole reply of `len` bytes; `action` is where its first word (e.g.
    /// `DUNNO`, `DEFER_IF_PERMIT`, `450`) lies in the buffer.
    Complete { len: usize, action: Range<usize> },
}

/// Why a reply is not a valid policy reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyError {
    /// The reply ended without an `action=` attribute.
    NoAction,
    /// The `action=` value is empty.
    EmptyAction,
    /// A line is not `name=value`, or the reply is just an empty line.
    BadLine,
    /// More than [`MAX_REPLY`] bytes without an empty line.
    TooLong,
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplyError::NoAction => "reply has no action attribute",
            ReplyError::EmptyAction => "reply has an empty action",
            ReplyError::BadLine => "reply line is not name=value",
            ReplyError::TooLong => "reply is too long",
        })
    }
}

impl std::error::Error for ReplyError {}

/// Looks for one complete reply at the start of `buf`.
///
/// Accepts `\r\n` line ends and extra attributes (Postfix skips them); the
/// first `action=` wins.
///
/// # Examples
///
/// ```
/// use ratelimit_benches::reply::{parse_reply, Status};
///
/// let buf = b"action=DEFER_IF_PERMIT rate limit exceeded\n\n";
/// let Ok(Status::Complete { len, action }) = parse_reply(buf) else { panic!() };
/// assert_eq!(len, buf.len());
/// assert_eq!(&buf[action], b"DEFER_IF_PERMIT");
/// assert_eq!(parse_reply(b"action=DUN"), Ok(Status::Partial));
/// ```
pub fn parse_reply(buf: &[u8]) -> Result<Status, ReplyError> {
    let mut line_start = 0;
    let mut action = None;
    while let Some(nl) = memchr::memchr(b'\n', &buf[line_start..]) {
        let line_end = line_start + nl;
        let mut line = &buf[line_start..line_end];
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        if line.is_empty() {
            if line_start == 0 {
                return Err(ReplyError::BadLine);
            }
            return match action {
                Some(action) => Ok(Status::Complete {
                    len: line_end + 1,
                    action,
                }),
                None => Err(ReplyError::NoAction),
            };
        }
        if action.is_none() && line.starts_with(b"action=") {
            let value_start = line_start + b"action=".len();
            let value = &buf[value_start..line_start + line.len()];
            let word_len = value
                .iter()
                .position(|&b| b == b' ' || b == b'\t')
                .unwrap_or(value.len());
            if word_len == 0 {
                return Err(ReplyError::EmptyAction);
            }
            action = Some(value_start..value_start + word_len);
        } else if memchr::memchr(b'=', line).is_none() {
            return Err(ReplyError::BadLine);
        }
        line_start = line_end + 1;
    }
    if buf.len() > MAX_REPLY {
        return Err(ReplyError::TooLong);
    }
    Ok(Status::Partial)
}

/// How often each action word was returned; words compare case-insensitively
/// and are stored upper-cased. Allocates only when a new word is first seen.
#[derive(Debug, Clone, Default)]
pub struct ActionCounts {
    entries: Vec<(Box<[u8]>, u64)>,
}

impl ActionCounts {
    /// Counts one reply with this action word.
    pub fn add(&mut self, word: &[u8]) {
        self.add_n(word, 1);
    }

    fn add_n(&mut self, word: &[u8], n: u64) {
        if let Some(entry) = self
            .entries
            .iter_mut()
            .find(|(w, _)| w.eq_ignore_ascii_case(word))
        {
            entry.1 += n;
        } else {
            self.entries.push((word.to_ascii_uppercase().into(), n));
        }
    }

    /// Adds every count of `other` into `self`.
    pub fn merge(&mut self, other: &ActionCounts) {
        for (word, n) in &other.entries {
            self.add_n(word, *n);
        }
    }

    /// The words and their counts, most frequent first.
    pub fn sorted(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .entries
            .iter()
            .map(|(w, n)| (String::from_utf8_lossy(w).into_owned(), *n))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }

    /// Total of all counts.
    pub fn total(&self) -> u64 {
        self.entries.iter().map(|(_, n)| n).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action_of(buf: &[u8]) -> Result<(usize, &[u8]), ReplyError> {
        match parse_reply(buf)? {
            Status::Complete { len, action } => Ok((len, &buf[action])),
            Status::Partial => panic!("partial"),
        }
    }

    #[test]
    fn replies_give_their_first_word_and_length() {
        let cases: [(&[u8], &[u8]); 5] = [
            (b"action=DUNNO\n\n", b"DUNNO"),
            (b"action=dunno\r\n\r\n", b"dunno"),
            (b"action=450 4.7.1 slow down\n\n", b"450"),
            (b"action=HOLD\tsuspicious\n\n", b"HOLD"),
            (b"foo=bar\naction=REJECT\n\n", b"REJECT"),
        ];
        for (buf, word) in cases {
            assert_eq!(action_of(buf), Ok((buf.len(), word)));
        }
    }

    #[test]
    fn every_proper_prefix_is_partial() {
        let buf = b"action=DEFER_IF_PERMIT try later\n\n";
        for n in 0..buf.len() {
            assert_eq!(parse_reply(&buf[..n]), Ok(Status::Partial), "prefix {n}");
        }
    }

    #[test]
    fn bad_replies_are_errors() {
        assert_eq!(parse_reply(b"\n"), Err(ReplyError::BadLine));
        assert_eq!(parse_reply(b"foo=bar\n\n"), Err(ReplyError::NoAction));
        assert_eq!(parse_reply(b"action=\n\n"), Err(ReplyError::EmptyAction));
        assert_eq!(parse_reply(b"garbage\n\n"), Err(ReplyError::BadLine));
        let long = vec![b'x'; MAX_REPLY + 1];
        assert_eq!(parse_reply(&long), Err(ReplyError::TooLong));
    }

    #[test]
    fn action_counts_merge_case_insensitively() {
        let mut a = ActionCounts::default();
        a.add(b"DUNNO");
        a.add(b"dunno");
        a.add(b"HOLD");
        let mut b = ActionCounts::default();
        b.add(b"Dunno");
        b.merge(&a);
        assert_eq!(
            b.sorted(),
            vec![("DUNNO".to_string(), 3), ("HOLD".to_string(), 1)]
        );
        assert_eq!(b.total(), 4);
    }
}
