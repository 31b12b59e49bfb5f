//! A policy server on 127.0.0.1:0 for integration tests, and a raw-bytes client.
#![allow(dead_code)]

pub mod proc;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ratelimit_core::{ManualClock, Timestamp};
use ratelimit_policyd::config;
use ratelimit_policyd::daemon;
use ratelimit_policyd::policy::Engine;
use ratelimit_policyd::server::{self, Listener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// 2023-11-14 22:13:20 UTC, a whole hour.
pub const T0: u64 = 1_699_999_200_000;

pub struct TestServer {
    pub addr: SocketAddr,
    pub engine: Arc<Engine>,
    pub clock: ManualClock,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Starts a server with this configuration text (listen address replaced).
    pub async fn start(config_text: &str) -> TestServer {
        let mut cfg =
            config::parse(config_text, "test.toml", None).unwrap_or_else(|e| panic!("{e}"));
        cfg.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
        // Tests run in parallel: no shared admin socket at the default path.
        cfg.ops.admin.socket = None;
        let clock = ManualClock::new(Timestamp::from_millis(T0));
        let engine = daemon::build_engine(cfg, Arc::new(clock.clone())).unwrap();
        let listeners = daemon::bind(&engine.config()).await.unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(server::run(listeners, Arc::clone(&engine), async move {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            engine,
            clock,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    pub fn listeners_for(_: Vec<Listener>) {}
}

pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// One policy request: stage, user, instance, recipient count, size, client address.
#[derive(Clone, Debug)]
pub struct Req<'a> {
    pub stage: &'a str,
    pub user: &'a str,
    pub instance: &'a str,
    pub rcpts: u64,
    pub size: u64,
    pub client: &'a str,
    pub sender: &'a str,
}

impl<'a> Req<'a> {
    pub fn new(stage: &'a str, user: &'a str, instance: &'a str) -> Self {
        Req {
            stage,
            user,
            instance,
            rcpts: 1,
            size: 1000,
            client: "192.0.2.10",
            sender: "someone@example.com",
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let rcpt_count = if self.stage == "RCPT" { 0 } else { self.rcpts };
        format!(
            "request=smtpd_access_policy\nprotocol_state={}\nprotocol_name=ESMTP\n\
             client_address={}\nclient_name=client.example\nhelo_name=client.example\n\
             sender={}\nrecipient=rcpt@example.net\nrecipient_count={rcpt_count}\n\
             queue_id=\ninstance={}\nsize={}\nsasl_method=PLAIN\nsasl_username={}\n\n",
            self.stage, self.client, self.sender, self.instance, self.size, self.user
        )
        .into_bytes()
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Client {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// Sends raw bytes and reads one reply (`action=...`), without the blank line.
    pub async fn raw(&mut self, bytes: &[u8]) -> Option<String> {
        self.stream.write_all(bytes).await.ok()?;
        self.reply().await
    }

    /// Reads one reply; `None` if the server closed the connection first.
    pub async fn reply(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let line = String::from_utf8_lossy(&self.buf[..pos]).to_string();
                self.buf.drain(..pos + 2);
                return Some(line);
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
                .await
                .expect("no reply within 10 s")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub async fn ask(&mut self, req: &Req<'_>) -> String {
        self.raw(&req.bytes()).await.expect("connection closed")
    }

    /// Sends one message as Postfix does: RCPT per recipient, DATA, END-OF-MESSAGE.
    /// Returns the first non-DUNNO answer, or "action=DUNNO".
    pub async fn message(&mut self, user: &str, instance: &str, rcpts: u64) -> String {
        let mut req = Req::new("RCPT", user, instance);
        req.rcpts = rcpts;
        for _ in 0..rcpts {
            let a = self.ask(&req).await;
            if a != "action=DUNNO" {
                return a;
            }
        }
        req.stage = "DATA";
        let a = self.ask(&req).await;
        if a != "action=DUNNO" {
            return a;
        }
        req.stage = "END-OF-MESSAGE";
        self.ask(&req).await
    }

    /// True when the server has closed the connection (EOF within 5 s).
    pub async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}
