//! A do-nothing Postfix policy server: answers `action=DUNNO` to every
//! request, with no parsing beyond finding the empty line that ends each
//! request. It is the protocol ceiling that real servers are compared with.
//!
//! One OS thread per connection, a reused buffer per connection; pipelined
//! requests that arrive in one read are answered with one write.
//!
//! ```text
//! dunno-server [ADDR]      ADDR: 127.0.0.1:10040 (default) or unix:/path
//! ```

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::thread;

use ratelimit_benches::framing::{Scan, scan_request};

const REPLY: &[u8] = b"action=DUNNO\n\n";
/// A request larger than this closes the connection.
const MAX_REQUEST: usize = 1024 * 1024;

fn serve<S: Read + Write>(mut stream: S) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = Vec::with_capacity(REPLY.len() * 8);
    let mut len = 0; // bytes held in buf
    let mut resume = 0; // where the scan of the current request resumes
    loop {
        if len == buf.len() {
            if buf.len() >= MAX_REQUEST {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "request too large",
                ));
            }
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut start = 0;
        // `resume` is relative to `start`, so it survives the compaction below.
        loop {
            match scan_request(&buf[start..len], resume) {
                Scan::Complete(req_len) => {
                    out.extend_from_slice(REPLY);
                    start += req_len;
                    resume = 0;
                }
                Scan::Partial { resume: r } => {
                    resume = r;
                    break;
                }
            }
        }
        if !out.is_empty() {
            stream.write_all(&out)?;
            out.clear();
        }
        if start > 0 {
            buf.copy_within(start..len, 0);
            len -= start;
        }
    }
}

/// Logs an accept error and pauses briefly, so that running out of file
/// descriptors does not spin.
fn accept_failed(e: &io::Error) {
    eprintln!("accept: {e}");
    thread::sleep(std::time::Duration::from_millis(50));
}

fn main() -> io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:10040".to_string());
    if matches!(addr.as_str(), "-h" | "--help") {
        println!(
            "usage: dunno-server [ADDR]   (ADDR: host:port, default 127.0.0.1:10040, or unix:/path)"
        );
        return Ok(());
    }
    if let Some(path) = addr.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        eprintln!("dunno-server listening on unix:{path}");
        for conn in listener.incoming() {
            match conn {
                Ok(s) => {
                    thread::spawn(move || serve(s));
                }
                Err(e) => accept_failed(&e),
            }
        }
    } else {
        let listener = TcpListener::bind(&addr)?;
        eprintln!("dunno-server listening on {}", listener.local_addr()?);
        for conn in listener.incoming() {
            match conn {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    thread::spawn(move || serve(s));
                }
                Err(e) => accept_failed(&e),
            }
        }
    }
    Ok(())
}
