//! A naive Redis-backed Postfix policy server: the cheapest honest limiter that
//! shares its counters through Redis, for `scripts/bench-server` to compare the
//! Redis store with.
//!
//! A fixed window per user: the counter `naive:{USER}:<window number>` in Redis.
//! An END-OF-MESSAGE request sends `INCR` and `EXPIRE` in one pipelined write
//! (one round trip) and answers `DEFER_IF_PERMIT` once the count passes the
//! limit; any other request (RCPT, DATA, ...) sends one `GET` and answers
//! `DEFER_IF_PERMIT` when the limit is already reached, so every request costs
//! one round trip, as in `ratelimit-policyd` (which peeks at RCPT and DATA and
//! charges at END-OF-MESSAGE). The user is `sasl_username`, else `sender`.
//!
//! One OS thread per client connection, each with its own Redis connection
//! (opened with the client connection), RESP written and read by hand with
//! reused buffers: no client library, no pool, no runtime. No timeouts and no
//! failure policy either: a Redis error closes the client connection.
//!
//! ```text
//! naive-redis-server [--listen 127.0.0.1:10050] [--redis 127.0.0.1:6379]
//!                    [--limit 100] [--window 3600]
//! ```

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use ratelimit_benches::framing::{Scan, scan_request};

const DUNNO: &[u8] = b"action=DUNNO\n\n";
const DEFER: &[u8] = b"action=DEFER_IF_PERMIT 4.7.1 Rate limit exceeded, try again later\n\n";
/// A request larger than this closes the connection.
const MAX_REQUEST: usize = 1024 * 1024;

#[derive(Debug, Clone)]
struct Options {
    listen: String,
    redis: String,
    limit: u64,
    window_secs: u64,
}

fn usage() -> &'static str {
    "usage: naive-redis-server [--listen ADDR] [--redis HOST:PORT] [--limit N] [--window SECONDS]\n\
     defaults: --listen 127.0.0.1:10050 --redis 127.0.0.1:6379 --limit 100 --window 3600"
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        listen: "127.0.0.1:10050".into(),
        redis: "127.0.0.1:6379".into(),
        limit: 100,
        window_secs: 3600,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if matches!(flag.as_str(), "-h" | "--help") {
            println!("{}", usage());
            std::process::exit(0);
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{}", usage()))?;
        let number = |v: &str| {
            v.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{flag}: {v:?} is not a positive integer"))
        };
        match flag.as_str() {
            "--listen" => o.listen = value,
            "--redis" => o.redis = value,
            "--limit" => o.limit = number(&value)?,
            "--window" => o.window_secs = number(&value)?,
            _ => return Err(format!("unknown option {flag}\n{}", usage())),
        }
    }
    Ok(o)
}

/// The value of attribute `name` in one request (`name=value` lines).
fn attr<'a>(req: &'a [u8], name: &[u8]) -> &'a [u8] {
    for line in req.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(name)
            && let Some(value) = rest.strip_prefix(b"=")
        {
            return value;
        }
    }
    b""
}

/// One client connection's link to Redis: a socket and reused buffers.
struct Redis {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    out: Vec<u8>,
    line: Vec<u8>,
}

impl Redis {
    fn connect(addr: &str) -> io::Result<Redis> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Redis {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            out: Vec::with_capacity(256),
            line: Vec::with_capacity(64),
        })
    }

    fn bulk(&mut self, arg: &[u8]) {
        self.out.extend_from_slice(b"$");
        self.out.extend_from_slice(arg.len().to_string().as_bytes());
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(arg);
        self.out.extend_from_slice(b"\r\n");
    }

    fn command(&mut self, args: &[&[u8]]) {
        self.out.extend_from_slice(b"*");
        self.out
            .extend_from_slice(args.len().to_string().as_bytes());
        self.out.extend_from_slice(b"\r\n");
        for a in args {
            self.bulk(a);
        }
    }

    /// Writes the commands queued so far in one write.
    fn flush(&mut self) -> io::Result<()> {
        let r = self.writer.write_all(&self.out);
        self.out.clear();
        r
    }

    /// Reads one reply: an integer, a bulk string holding an integer, or a nil
    /// (0). An error reply or anything else is an error.
    fn read_number(&mut self) -> io::Result<u64> {
        let bad = |what: &[u8]| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected Redis reply {:?}", String::from_utf8_lossy(what)),
            )
        };
        self.line.clear();
        if self.reader.read_until(b'\n', &mut self.line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = self.line.strip_suffix(b"\r\n").unwrap_or(&self.line);
        let parse =
            |digits: &[u8]| -> Option<i64> { std::str::from_utf8(digits).ok()?.parse().ok() };
        match line.split_first() {
            Some((b':', digits)) => parse(digits)
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(|| bad(line)),
            Some((b'$', len)) => match parse(len) {
                Some(-1) => Ok(0),
                Some(len) if (0..=20).contains(&len) => {
                    let mut value = [0u8; 22];
                    let value = &mut value[..len as usize + 2];
                    self.reader.read_exact(value)?;
                    parse(&value[..len as usize])
                        .and_then(|n| u64::try_from(n).ok())
                        .ok_or_else(|| bad(value))
                }
                _ => Err(bad(line)),
            },
            _ => Err(bad(line)),
        }
    }
}

fn serve(mut client: TcpStream, o: &Options) -> io::Result<()> {
    let mut redis = Redis::connect(&o.redis)?;
    let window_arg = o.window_secs.to_string();
    let mut key = Vec::with_capacity(128);
    let mut buf = vec![0u8; 16 * 1024];
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
        let n = client.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut start = 0;
        // Postfix sends one request and waits for its reply, so each request is
        // answered before the next is looked at.
        loop {
            let req_len = match scan_request(&buf[start..len], resume) {
                Scan::Complete(req_len) => req_len,
                Scan::Partial { resume: r } => {
                    resume = r;
                    break;
                }
            };
            resume = 0;
            let req = &buf[start..start + req_len];
            start += req_len;
            let mut user = attr(req, b"sasl_username");
            if user.is_empty() {
                user = attr(req, b"sender");
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            key.clear();
            key.extend_from_slice(b"naive:{");
            key.extend_from_slice(user);
            key.extend_from_slice(b"}:");
            key.extend_from_slice((now / o.window_secs).to_string().as_bytes());
            let over = if attr(req, b"protocol_state") == b"END-OF-MESSAGE" {
                redis.command(&[b"INCR", &key]);
                redis.command(&[b"EXPIRE", &key, window_arg.as_bytes()]);
                redis.flush()?;
                let count = redis.read_number()?;
                redis.read_number()?;
                count > o.limit
            } else {
                redis.command(&[b"GET", &key]);
                redis.flush()?;
                redis.read_number()? >= o.limit
            };
            client.write_all(if over { DEFER } else { DUNNO })?;
        }
        if start > 0 {
            buf.copy_within(start..len, 0);
            len -= start;
        }
    }
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("naive-redis-server: {e}");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(&o.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("naive-redis-server: cannot listen on {}: {e}", o.listen);
            std::process::exit(1);
        }
    };
    // Fail at start, not at the first request, when Redis is not there.
    if let Err(e) = Redis::connect(&o.redis) {
        eprintln!(
            "naive-redis-server: cannot connect to Redis at {}: {e}",
            o.redis
        );
        std::process::exit(1);
    }
    eprintln!(
        "naive-redis-server listening on {} (Redis {}, {} per {} s)",
        o.listen, o.redis, o.limit, o.window_secs
    );
    let o = std::sync::Arc::new(o);
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                let o = o.clone();
                thread::spawn(move || {
                    if let Err(e) = serve(s, &o) {
                        eprintln!("naive-redis-server: connection closed: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("accept: {e}");
                thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}
