//! Finding where a policy request ends: at the first empty line.
//!
//! Postfix ends each request with an empty line (`\n\n`); a lenient server
//! also accepts `\r\n` line ends. The scan works line by line so that it can
//! resume at the start of the last incomplete line after more bytes arrive,
//! and never re-reads the complete lines before it.

/// Outcome of scanning a buffer for the end of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// A whole request is present; it is this many bytes long, including the
    /// empty line that ends it.
    Complete(usize),
    /// No empty line yet. Resume the scan at `resume` (the start of the last,
    /// incomplete line) once more bytes have arrived.
    Partial { resume: usize },
}

/// Scans `buf` for the end of the request that starts at `buf[0]`, beginning
/// at `from`, which must be the start of a line (0, or a value returned in
/// [`Scan::Partial`]).
///
/// # Examples
///
/// ```
/// use ratelimit_benches::framing::{scan_request, Scan};
///
/// let buf = b"request=smtpd_access_policy\nsasl_username=alice\n\nrequest=";
/// assert_eq!(scan_request(buf, 0), Scan::Complete(49));
/// assert_eq!(scan_request(&buf[49..], 0), Scan::Partial { resume: 0 });
/// ```
pub fn scan_request(buf: &[u8], from: usize) -> Scan {
    let mut line_start = from;
    while let Some(nl) = memchr::memchr(b'\n', &buf[line_start..]) {
        let line_end = line_start + nl;
        let line = &buf[line_start..line_end];
        if line.is_empty() || line == b"\r" {
            return Scan::Complete(line_end + 1);
        }
        line_start = line_end + 1;
    }
    Scan::Partial { resume: line_start }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &[u8] = b"request=smtpd_access_policy\nprotocol_state=RCPT\n\n";

    #[test]
    fn every_proper_prefix_is_partial_and_resumes_at_a_line_start() {
        for n in 0..REQ.len() {
            let prefix = &REQ[..n];
            match scan_request(prefix, 0) {
                Scan::Partial { resume } => {
                    assert!(resume == 0 || prefix[resume - 1] == b'\n', "prefix {n}");
                    // Resuming with the whole request gives the same answer.
                    assert_eq!(scan_request(REQ, resume), Scan::Complete(REQ.len()));
                }
                other => panic!("prefix {n}: {other:?}"),
            }
        }
    }

    #[test]
    fn crlf_line_ends_are_accepted() {
        let req = b"request=smtpd_access_policy\r\nprotocol_state=RCPT\r\n\r\nnext";
        assert_eq!(scan_request(req, 0), Scan::Complete(req.len() - 4));
    }

    #[test]
    fn pipelined_requests_are_split_one_at_a_time() {
        let mut buf = REQ.to_vec();
        buf.extend_from_slice(REQ);
        assert_eq!(scan_request(&buf, 0), Scan::Complete(REQ.len()));
        assert_eq!(
            scan_request(&buf[REQ.len()..], 0),
            Scan::Complete(REQ.len())
        );
    }

    #[test]
    fn a_lone_empty_line_is_an_empty_request() {
        assert_eq!(scan_request(b"\n", 0), Scan::Complete(1));
    }
}
