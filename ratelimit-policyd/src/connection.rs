//! Request framing over an async byte stream: one [`Connection`] per policy client.
//!
//! The connection owns a read buffer and a write buffer, both reused for every request.
//! It parses from what is already buffered first and reads from the socket only when the
//! buffer holds an incomplete request, so requests a client pipelines are served in order
//! without extra reads.
//!
//! # Examples
//!
//! ```
//! use ratelimit_policyd::connection::Connection;
//! use ratelimit_policyd::protocol::{Action, Attribute, Limits};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (mut postfix, server) = tokio::io::duplex(4096);
//! postfix.write_all(b"request=smtpd_access_policy\nsasl_username=alice\n\n").await?;
//! drop(postfix.shutdown().await);
//!
//! let mut conn = Connection::new(server, Limits::default());
//! while conn.read_request().await?.is_some() {
//!     let mut slots = [Attribute::EMPTY; 64];
//!     let request = conn.request(&mut slots)?;
//!     assert_eq!(request.sasl_username_str(), Some("alice"));
//!     let action = Action::Dunno; // the policy decides here
//!     conn.write_response(&action).await?;
//! }
//! drop(conn); // closes the server side, so the client sees EOF
//!
//! let mut reply = Vec::new();
//! postfix.read_to_end(&mut reply).await?;
//! assert_eq!(reply, b"action=DUNNO\n\n");
//! # Ok(())
//! # }
//! ```

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{
    Action, Attribute, Limits, ParseError, PolicyRequest, Status, encode_response, frame_request,
    parse_request,
};

/// Bytes asked of the socket per read. A real request is about 700 bytes.
const READ_CHUNK: usize = 4096;

/// Why a connection cannot go on. Each one ends the connection: the protocol says to log
/// and disconnect without replying, and Postfix retries elsewhere or later.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Reading or writing the stream failed.
    #[error("connection i/o: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the stream in the middle of a request.
    #[error("connection closed in the middle of a request ({buffered} bytes buffered)")]
    UnexpectedEof {
        /// Bytes of the unfinished request.
        buffered: usize,
    },
    /// The request is malformed or exceeds a limit ([`ParseError::is_limit`]).
    #[error("bad request: {0}")]
    Request(#[from] ParseError),
}

/// A policy client connection: framing, buffering and replies.
///
/// Use it as a loop: [`read_request`](Self::read_request) until it returns `Ok(None)`
/// (the client closed cleanly between requests); for each request, look at it with
/// [`request`](Self::request) or [`raw_request`](Self::raw_request), then answer with
/// [`write_response`](Self::write_response). Nothing is allocated per request once the
/// buffers have grown to the size of the largest request.
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    /// Unprocessed input. `BytesMut` makes dropping a served request O(1) and reclaims
    /// the front of the allocation when it reserves room for the next read, so the buffer
    /// compacts itself instead of growing.
    read_buf: BytesMut,
    /// Length of the current request at the front of `read_buf`; 0 when there is none.
    current: usize,
    /// Reply bytes, cleared and reused for every reply.
    write_buf: Vec<u8>,
    limits: Limits,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps `stream`; requests must respect `limits`.
    pub fn new(stream: S, limits: Limits) -> Self {
        Connection {
            stream,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            current: 0,
            write_buf: Vec::with_capacity(128),
            limits,
        }
    }

    /// Waits for the next complete request and returns its length in bytes, or `Ok(None)`
    /// when the client closed the stream cleanly between requests.
    ///
    /// Drops the previous request from the buffer first, then parses what is buffered,
    /// reading from the stream only while that is incomplete. The buffer never holds more
    /// than [`Limits::max_request`] bytes plus one read, since a request that cannot fit
    /// is refused as soon as that is certain.
    ///
    /// # Errors
    ///
    /// [`ConnError::UnexpectedEof`] when the stream ends inside a request,
    /// [`ConnError::Request`] when the request is malformed or too large, and
    /// [`ConnError::Io`]. After an error the connection should be dropped.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped (a timeout, shutdown), no input is lost and
    /// the next call carries on.
    pub async fn read_request(&mut self) -> Result<Option<usize>, ConnError> {
        self.read_buf.advance(self.current);
        self.current = 0;
        loop {
            if let Status::Complete(parsed) = frame_request(&self.read_buf, &self.limits)? {
                self.current = parsed.consumed;
                return Ok(Some(parsed.consumed));
            }
            self.read_buf.reserve(READ_CHUNK);
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return if self.read_buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnError::UnexpectedEof {
                        buffered: self.read_buf.len(),
                    })
                };
            }
        }
    }

    /// Parses the current request (the one [`read_request`](Self::read_request) last
    /// returned) into `slots`, and builds its typed view.
    ///
    /// The attributes borrow the connection's buffer, so `slots` is per request: a fresh
    /// stack array (`[Attribute::EMPTY; 64]`, no heap) each time, dropped together with
    /// the returned view before [`write_response`](Self::write_response).
    ///
    /// The only errors are [`ParseError::OutOfSlots`] when `slots` is shorter than the
    /// request, and [`ParseError::InvalidNumber`] from [`PolicyRequest::from_attributes`].
    ///
    /// # Panics
    ///
    /// When there is no current request: `read_request` has not returned `Some` yet, or
    /// returned `None` or an error since.
    pub fn request<'a>(
        &'a self,
        slots: &'a mut [Attribute<'a>],
    ) -> Result<PolicyRequest<'a>, ParseError> {
        let raw = self.raw_request();
        assert!(
            !raw.is_empty(),
            "Connection::request without a current request"
        );
        match parse_request(raw, &self.limits, slots)? {
            Status::Complete(parsed) => PolicyRequest::from_attributes(&slots[..parsed.attributes]),
            Status::Partial => unreachable!("read_request framed a complete request"),
        }
    }

    /// The bytes of the current request, terminating empty line included (for recording);
    /// empty when there is none.
    pub fn raw_request(&self) -> &[u8] {
        &self.read_buf[..self.current]
    }

    /// Sends the reply for `action` and flushes it.
    ///
    /// Not cancel safe: if the future is dropped, part of the reply may have been sent,
    /// so the connection must be dropped too.
    pub async fn write_response(&mut self, action: &Action<'_>) -> io::Result<()> {
        self.write_buf.clear();
        encode_response(action, &mut self.write_buf);
        self.stream.write_all(&self.write_buf).await?;
        self.stream.flush().await
    }

    /// The limits requests must respect.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The underlying stream (e.g. for its peer address).
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The underlying stream; buffered input stays in the connection.
    pub fn into_inner(self) -> S {
        self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    const REQUEST: &[u8] = b"request=smtpd_access_policy\nprotocol_state=RCPT\nsasl_username=alice\ninstance=1.2.3\n\n";

    fn pair() -> (DuplexStream, Connection<DuplexStream>) {
        let (client, server) = duplex(64 * 1024);
        (client, Connection::new(server, Limits::default()))
    }

    fn username(conn: &Connection<DuplexStream>) -> String {
        let mut slots = [Attribute::EMPTY; 64];
        let request = conn.request(&mut slots).unwrap();
        request.sasl_username_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn serves_a_request_then_sees_clean_eof() {
        let (mut client, mut conn) = pair();
        client.write_all(REQUEST).await.unwrap();
        client.shutdown().await.unwrap();

        assert_eq!(conn.read_request().await.unwrap(), Some(REQUEST.len()));
        assert_eq!(conn.raw_request(), REQUEST);
        assert_eq!(username(&conn), "alice");
        conn.write_response(&Action::defer_if_permit("4.7.1 slow down"))
            .await
            .unwrap();
        assert!(conn.read_request().await.unwrap().is_none());

        drop(conn);
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"action=DEFER_IF_PERMIT 4.7.1 slow down\n\n");
    }

    #[tokio::test]
    async fn serves_pipelined_requests_in_order() {
        let (mut client, mut conn) = pair();
        let mut input = Vec::new();
        for user in ["a", "b", "c"] {
            input.extend_from_slice(format!("sasl_username={user}\n\n").as_bytes());
        }
        client.write_all(&input).await.unwrap();
        client.shutdown().await.unwrap();

        let mut seen = Vec::new();
        while conn.read_request().await.unwrap().is_some() {
            seen.push(username(&conn));
            conn.write_response(&Action::Dunno).await.unwrap();
        }
        assert_eq!(seen, ["a", "b", "c"]);

        drop(conn);
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"action=DUNNO\n\n".repeat(3));
    }

    #[tokio::test]
    async fn assembles_a_request_sent_one_byte_at_a_time() {
        let (mut client, mut conn) = pair();
        let writer = tokio::spawn(async move {
            for byte in REQUEST.iter().chain(REQUEST) {
                client.write_all(&[*byte]).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        for _ in 0..2 {
            assert_eq!(conn.read_request().await.unwrap(), Some(REQUEST.len()));
            assert_eq!(username(&conn), "alice");
        }
        drop(writer.await.unwrap());
        assert!(conn.read_request().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn eof_in_the_middle_of_a_request_is_an_error() {
        let (mut client, mut conn) = pair();
        client.write_all(&REQUEST[..10]).await.unwrap();
        client.shutdown().await.unwrap();
        let err = conn.read_request().await.unwrap_err();
        assert!(
            matches!(err, ConnError::UnexpectedEof { buffered: 10 }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn eof_after_a_served_request_and_a_partial_one_is_an_error() {
        let (mut client, mut conn) = pair();
        client.write_all(REQUEST).await.unwrap();
        client.write_all(b"sasl_user").await.unwrap();
        client.shutdown().await.unwrap();
        assert!(conn.read_request().await.unwrap().is_some());
        let err = conn.read_request().await.unwrap_err();
        assert!(
            matches!(err, ConnError::UnexpectedEof { buffered: 9 }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_malformed_request_is_an_error() {
        let (mut client, mut conn) = pair();
        client
            .write_all(b"request=x\nno equals here\n\n")
            .await
            .unwrap();
        let err = conn.read_request().await.unwrap_err();
        assert!(
            matches!(
                err,
                ConnError::Request(ParseError::MissingEquals { line: 2 })
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_endless_line_is_refused_without_buffering_it() {
        let (client, server) = duplex(64 * 1024);
        let mut conn = Connection::new(server, Limits::default());
        // The writer keeps sending; the connection must give up after about one line limit.
        let writer = tokio::spawn(async move {
            let mut client = client;
            let chunk = [b'x'; 1024];
            let mut sent = 0usize;
            while client.write_all(&chunk).await.is_ok() && sent < 10 << 20 {
                sent += chunk.len();
            }
            sent
        });
        let err = conn.read_request().await.unwrap_err();
        assert!(
            matches!(
                err,
                ConnError::Request(ParseError::LineTooLong { line: 1, .. })
            ),
            "{err}"
        );
        assert!(conn.read_buf.len() <= Limits::default().max_line + READ_CHUNK + 1);
        drop(conn);
        assert!(writer.await.unwrap() < 1 << 20);
    }

    #[tokio::test]
    async fn too_many_slots_needed_is_reported_by_request() {
        let (mut client, mut conn) = pair();
        client.write_all(REQUEST).await.unwrap();
        conn.read_request().await.unwrap();
        let mut slots = [Attribute::EMPTY; 2];
        assert_eq!(
            conn.request(&mut slots).unwrap_err(),
            ParseError::OutOfSlots { slots: 2 }
        );
    }
}
