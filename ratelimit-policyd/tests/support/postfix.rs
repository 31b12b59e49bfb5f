//! A private, real Postfix instance on loopback for integration tests.
//!
//! [`PostfixInstance::start`] writes a self-contained configuration (its own
//! `config_directory`, `queue_directory`, `data_directory` and maillog) into a
//! fresh root-owned directory `/tmp/ratelimit-postfix-*`, starts `postfix -c DIR
//! start` with smtpd on a free 127.0.0.1 port, and starts `smtp-sink` on another
//! free port as the relay host: every message Postfix accepts is relayed to the
//! sink, which writes one file per delivered transaction. Nothing in
//! `/etc/postfix` is used or changed, no DNS is needed, and several instances can
//! run at the same time (distinct directories and ports).
//!
//! [`PostfixInstance::send_as`] speaks SMTP to smtpd and uses `XCLIENT LOGIN=`
//! to act as a SASL-authenticated user from any client address, so the policy
//! server sees `sasl_username` and `client_address` as in production.
//!
//! Needs root and the Debian `postfix` + `libsasl2-modules` packages
//! (`scripts/test` installs them). See `README.md` beside this file.

use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Set to `1` to keep the instance directory (config, queue, maillog, sink
/// files) after the test instead of deleting it.
pub const KEEP_ENV: &str = "RATELIMIT_KEEP_POSTFIX";

/// Text of the error returned when Postfix is missing.
const NOT_INSTALLED: &str = "Postfix is not installed (needs the Debian packages postfix and \
     libsasl2-modules); run scripts/test, which installs them and runs the ignored tests";

/// Prefix of every instance directory: `/tmp/ratelimit-postfix-PID-N-NANOS`.
const ROOT_PREFIX: &str = "ratelimit-postfix-";
/// In an instance directory: smtp-sink's pid (for sweeping after a crash).
const SINK_PID_FILE: &str = "smtp-sink.pid";
/// In an instance directory kept with `RATELIMIT_KEEP_POSTFIX=1`: never swept.
const KEPT_MARKER: &str = "KEPT";

static INSTANCE_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// An SMTP stage at which `check_policy_service` is wired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyStage {
    /// `smtpd_recipient_restrictions` (policy `protocol_state=RCPT`).
    Rcpt,
    /// `smtpd_data_restrictions` (`protocol_state=DATA`).
    Data,
    /// `smtpd_end_of_data_restrictions` (`protocol_state=END-OF-MESSAGE`).
    EndOfData,
}

/// How to configure the instance.
#[derive(Clone, Debug)]
pub struct PostfixOptions {
    /// Where the policy server under test listens (`check_policy_service inet:IP:PORT`).
    pub policy_addr: SocketAddr,
    /// The `check_policy_service` target instead of `inet:policy_addr`, e.g.
    /// `unix:private/ratelimit` (relative to the queue directory, as a chrooted
    /// smtpd names it).
    pub policy_target: Option<String>,
    /// Stages that consult the policy server; empty = no policy service at all.
    pub stages: Vec<PolicyStage>,
    /// `smtpd_policy_service_default_action`: applied when the policy server is
    /// unreachable or does not answer in time.
    pub policy_default_action: String,
    /// `smtpd_policy_service_timeout` (Postfix default 100 s; shorter here so
    /// a hung policy server shows up within a test's timeouts).
    pub policy_timeout: Duration,
    /// `mynetworks`. Clients in it may relay without SASL. The XCLIENT
    /// addresses tests use (192.0.2.0/24 etc.) are outside it by default.
    pub mynetworks: String,
    /// Timeout for each read/write of the SMTP client, and for start-up.
    pub io_timeout: Duration,
    /// Extra `main.cf` lines (`name`, `value`), written last so they override.
    pub extra_main_cf: Vec<(String, String)>,
}

impl PostfixOptions {
    /// Policy service at `policy_addr` wired at RCPT, DATA and END-OF-MESSAGE,
    /// default action `451 4.3.5 policy service unavailable`.
    pub fn new(policy_addr: SocketAddr) -> Self {
        PostfixOptions {
            policy_addr,
            policy_target: None,
            stages: vec![PolicyStage::Rcpt, PolicyStage::Data, PolicyStage::EndOfData],
            policy_default_action: "451 4.3.5 policy service unavailable".to_string(),
            policy_timeout: Duration::from_secs(10),
            mynetworks: "127.0.0.0/8".to_string(),
            io_timeout: Duration::from_secs(30),
            extra_main_cf: Vec::new(),
        }
    }

    /// Policy service at a Unix socket: `check_policy_service unix:PATH`, `path`
    /// relative to the queue directory (`private/ratelimit`). Bind the server at
    /// [`PostfixInstance::queue_dir`]`/PATH` once the instance is up (Postfix creates
    /// `private/` when it starts).
    pub fn unix(path: &str) -> Self {
        let mut o = PostfixOptions::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        o.policy_target = Some(format!("unix:{path}"));
        o
    }

    pub fn stages(mut self, stages: &[PolicyStage]) -> Self {
        self.stages = stages.to_vec();
        self
    }

    pub fn default_action(mut self, action: &str) -> Self {
        self.policy_default_action = action.to_string();
        self
    }

    /// Add a `main.cf` setting (overrides the harness's own).
    pub fn main_cf(mut self, name: &str, value: &str) -> Self {
        self.extra_main_cf
            .push((name.to_string(), value.to_string()));
        self
    }
}

/// Paths of the Postfix programs the harness runs.
#[derive(Clone, Debug)]
struct Binaries {
    postfix: PathBuf,
    postqueue: PathBuf,
    postsuper: PathBuf,
    smtp_sink: PathBuf,
}

impl Binaries {
    fn find() -> io::Result<Binaries> {
        Ok(Binaries {
            postfix: find_binary("postfix")?,
            postqueue: find_binary("postqueue")?,
            postsuper: find_binary("postsuper")?,
            smtp_sink: find_binary("smtp-sink")?,
        })
    }
}

fn find_binary(name: &str) -> io::Result<PathBuf> {
    let mut dirs = vec![PathBuf::from("/usr/sbin")];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{NOT_INSTALLED}: no `{name}`"),
            )
        })
}

/// One entry of `postqueue -j`.
#[derive(Clone, Debug)]
pub struct QueueEntry {
    /// `incoming`, `active`, `deferred`, `hold`, `maildrop`.
    pub queue_name: String,
    pub queue_id: String,
    pub sender: String,
    /// Recipient address and, if delivery was deferred, the reason.
    pub recipients: Vec<(String, Option<String>)>,
}

/// A message as written by smtp-sink (one file per delivered transaction).
#[derive(Clone, Debug)]
pub struct DeliveredMessage {
    pub path: PathBuf,
    /// Envelope sender (from the sink's `X-Mail-Args:` header, without `<>`).
    pub mail_from: String,
    /// Envelope recipients (from `X-Rcpt-Args:`).
    pub rcpts: Vec<String>,
    /// The whole file: the sink's `X-*` lines, then the message as received.
    pub content: String,
}

/// A running private Postfix + smtp-sink. Dropping it stops both and removes
/// the directory (unless `RATELIMIT_KEEP_POSTFIX=1`).
pub struct PostfixInstance {
    root: PathBuf,
    config_dir: PathBuf,
    queue_dir: PathBuf,
    sink_dir: PathBuf,
    maillog: PathBuf,
    smtpd_addr: SocketAddr,
    sink_addr: SocketAddr,
    myhostname: String,
    sink: Option<Child>,
    bins: Binaries,
    opts: PostfixOptions,
    stopped: bool,
}

impl PostfixInstance {
    /// Configure and start a private instance. Fails with a message naming
    /// `scripts/test` if Postfix is not installed, and with the maillog if
    /// Postfix does not come up.
    pub fn start(opts: PostfixOptions) -> io::Result<PostfixInstance> {
        let bins = Binaries::find()?;
        if !is_root() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "a private Postfix instance needs root (postfix start, smtp-sink -u nobody)",
            ));
        }
        sweep_stale(&bins);
        // A port picked by bind-and-release can be taken by someone else before
        // Postfix or the sink binds it: retry the whole start a few times.
        let mut last_err = None;
        for _ in 0..3 {
            match Self::try_start(&opts, &bins) {
                Ok(pf) => return Ok(pf),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    fn try_start(opts: &PostfixOptions, bins: &Binaries) -> io::Result<PostfixInstance> {
        let (root, n) = make_root_dir()?;
        let myhostname = format!("pf{}-{}.ratelimit.test", std::process::id(), n);
        let config_dir = root.join("etc");
        let queue_dir = root.join("queue");
        let sink_dir = root.join("sink");
        let log_dir = root.join("log");
        for d in [&config_dir, &queue_dir, &log_dir, &sink_dir] {
            fs::DirBuilder::new().mode(0o755).create(d)?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
        }
        // data_directory is created by `postfix start` (it must be owned by postfix).
        let (nobody_uid, nobody_gid) = nobody_ids();
        std::os::unix::fs::chown(&sink_dir, Some(nobody_uid), Some(nobody_gid))?;

        let [smtpd_addr, sink_addr] = free_loopback_ports()?;
        let mut pf = PostfixInstance {
            maillog: log_dir.join("maillog"),
            smtpd_addr,
            sink_addr,
            root,
            config_dir,
            queue_dir,
            sink_dir,
            myhostname,
            sink: None,
            bins: bins.clone(),
            opts: opts.clone(),
            // Nothing to stop yet, but Drop still removes the directory.
            stopped: true,
        };
        pf.write_config()?;
        pf.start_sink()?;
        pf.start_postfix()?;
        Ok(pf)
    }

    fn write_config(&self) -> io::Result<()> {
        let o = &self.opts;
        let policy = match &o.policy_target {
            Some(target) => format!("check_policy_service {target}"),
            None => format!("check_policy_service inet:{}", o.policy_addr),
        };
        let wired = |s| o.stages.contains(&s);
        let mut main: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: String| main.push((k.to_string(), v));
        let path = |p: &Path| p.display().to_string();
        set("compatibility_level", "3.6".into());
        set("queue_directory", path(&self.queue_dir));
        set("data_directory", path(&self.root.join("data")));
        set("maillog_file", path(&self.maillog));
        set(
            "maillog_file_prefixes",
            format!("/var, /dev/stdout, {}", path(&self.root)),
        );
        set("myhostname", self.myhostname.clone());
        set("mydestination", String::new());
        set("mynetworks", o.mynetworks.clone());
        set("inet_interfaces", "127.0.0.1".into());
        set("inet_protocols", "ipv4".into());
        set(
            "relayhost",
            format!("[127.0.0.1]:{}", self.sink_addr.port()),
        );
        set("smtpd_peername_lookup", "no".into());
        set("smtp_dns_support_level", "disabled".into());
        set("smtp_host_lookup", "native".into());
        set("alias_maps", String::new());
        set("alias_database", String::new());
        set("biff", "no".into());
        set("smtpd_authorized_xclient_hosts", "127.0.0.1".into());
        set("smtpd_sasl_auth_enable", "yes".into());
        // No open relay: unauthenticated clients outside mynetworks cannot
        // relay; that is decided here, before the recipient restrictions, so
        // the policy server never sees relay attempts.
        set(
            "smtpd_relay_restrictions",
            "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination".into(),
        );
        // The policy check must come BEFORE permit_sasl_authenticated (a permit
        // ends the list), and reject_unauth_destination must come after the
        // permits (with mydestination empty it would refuse every recipient).
        let mut rcpt = Vec::new();
        if wired(PolicyStage::Rcpt) {
            rcpt.push(policy.clone());
        }
        rcpt.extend(
            [
                "permit_sasl_authenticated",
                "permit_mynetworks",
                "reject_unauth_destination",
            ]
            .map(String::from),
        );
        set("smtpd_recipient_restrictions", rcpt.join(", "));
        set(
            "smtpd_data_restrictions",
            if wired(PolicyStage::Data) {
                policy.clone()
            } else {
                String::new()
            },
        );
        set(
            "smtpd_end_of_data_restrictions",
            if wired(PolicyStage::EndOfData) {
                policy.clone()
            } else {
                String::new()
            },
        );
        set(
            "smtpd_policy_service_default_action",
            o.policy_default_action.clone(),
        );
        set(
            "smtpd_policy_service_timeout",
            format!("{}s", o.policy_timeout.as_secs().max(1)),
        );
        // Fast queue handling: new mail is delivered at once anyway; these
        // only matter if something gets deferred.
        set("queue_run_delay", "1s".into());
        set("minimal_backoff_time", "1s".into());
        set("maximal_backoff_time", "2s".into());
        set("in_flow_delay", "0s".into());
        set("smtpd_error_sleep_time", "0s".into());
        for (k, v) in &o.extra_main_cf {
            set(k, v.clone());
        }
        let mut text = String::from("# written by ratelimit-policyd/tests/support/postfix.rs\n");
        for (k, v) in &main {
            text.push_str(&format!("{k} = {v}\n"));
        }
        fs::write(self.config_dir.join("main.cf"), text)?;

        // chroot column `n` everywhere: the private queue has no chroot jail.
        let master = format!(
            "# written by ratelimit-policyd/tests/support/postfix.rs
{port}      inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
",
            port = self.smtpd_addr.port()
        );
        fs::write(self.config_dir.join("master.cf"), master)?;
        // Postfix commands wait (0.3 s steps, ~2 s in all) while main.cf looks
        // freshly modified; backdate both files so `postfix start` is fast.
        let past = SystemTime::now() - Duration::from_secs(60);
        for f in ["main.cf", "master.cf"] {
            fs::File::options()
                .write(true)
                .open(self.config_dir.join(f))?
                .set_modified(past)?;
        }
        Ok(())
    }

    fn start_sink(&mut self) -> io::Result<()> {
        let sink_log = fs::File::create(self.root.join("log/smtp-sink.log"))?;
        // -d: one file per transaction, name = strftime(template) + a random
        // hex suffix, so several messages in one second get distinct files.
        // The file appears at MAIL FROM and is removed again on RSET/abort.
        let child = Command::new(&self.bins.smtp_sink)
            .arg("-u")
            .arg("nobody")
            .arg("-c")
            .arg("-d")
            .arg(format!("{}/msg.%Y%m%d%H%M%S.", self.sink_dir.display()))
            .arg(self.sink_addr.to_string())
            .arg("256")
            .stdin(Stdio::null())
            .stdout(sink_log.try_clone()?)
            .stderr(sink_log)
            .spawn()?;
        fs::write(self.root.join(SINK_PID_FILE), child.id().to_string())?;
        self.sink = Some(child);
        let deadline = Instant::now() + self.opts.io_timeout;
        loop {
            if TcpStream::connect_timeout(&self.sink_addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.sink.as_mut().and_then(|c| c.try_wait().transpose()) {
                let log =
                    fs::read_to_string(self.root.join("log/smtp-sink.log")).unwrap_or_default();
                return Err(io::Error::other(format!(
                    "smtp-sink exited ({:?}): {log}",
                    status?
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "smtp-sink did not start listening",
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_postfix(&mut self) -> io::Result<()> {
        let out = self.postfix_cmd("start")?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "postfix -c {} start failed: {}{}\n{}",
                self.config_dir.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.maillog_tail(40)
            )));
        }
        self.stopped = false;
        // Wait for a real greeting: catches smtpd dying at start-up (bad
        // config, no SASL mechanisms) here rather than in the first test step.
        let deadline = Instant::now() + self.opts.io_timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match Smtp::connect(self.smtpd_addr, self.opts.io_timeout).and_then(|mut s| {
                let r = s.reply()?;
                let _ = s.command("QUIT");
                Ok(r)
            }) {
                Ok(r) if r.code == 220 => return Ok(()),
                Ok(r) => last = format!("greeting {r}"),
                Err(e) => last = e.to_string(),
            }
            thread::sleep(Duration::from_millis(50));
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "smtpd on {} never greeted ({last})\n{}",
                self.smtpd_addr,
                self.maillog_tail(40)
            ),
        ))
    }

    fn postfix_cmd(&self, verb: &str) -> io::Result<std::process::Output> {
        Command::new(&self.bins.postfix)
            .arg("-c")
            .arg(&self.config_dir)
            .arg(verb)
            .stdin(Stdio::null())
            .output()
    }

    /// Address of the instance's smtpd.
    pub fn smtpd_addr(&self) -> SocketAddr {
        self.smtpd_addr
    }

    /// Address of the smtp-sink relay host.
    pub fn sink_addr(&self) -> SocketAddr {
        self.sink_addr
    }

    /// The instance's directory (`etc/`, `queue/`, `data/`, `log/`, `sink/`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The instance's `queue_directory` (smtpd's working directory: relative
    /// `unix:` policy targets are relative to it).
    pub fn queue_dir(&self) -> &Path {
        &self.queue_dir
    }

    /// The instance's `config_directory` (for `postconf -c`, `postqueue -c`, ...).
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    pub fn myhostname(&self) -> &str {
        &self.myhostname
    }

    // ---- what happened to the mail -------------------------------------

    fn sink_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.sink_dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with("msg."))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }

    /// Number of transactions the sink has received (including one in progress;
    /// use [`wait_settled`](Self::wait_settled) to know all are complete).
    pub fn delivered(&self) -> usize {
        self.sink_files().len()
    }

    /// The messages in the sink, oldest first (by file name, one-second resolution).
    pub fn delivered_messages(&self) -> Vec<DeliveredMessage> {
        self.sink_files()
            .into_iter()
            .map(|path| {
                let content = fs::read_to_string(&path).unwrap_or_default();
                let arg = |line: &str| {
                    line.split_whitespace()
                        .next()
                        .unwrap_or("")
                        .trim_matches(['<', '>'])
                        .to_string()
                };
                let mail_from = content
                    .lines()
                    .find_map(|l| l.strip_prefix("X-Mail-Args: "))
                    .map(arg);
                let rcpts = content
                    .lines()
                    .filter_map(|l| l.strip_prefix("X-Rcpt-Args: "))
                    .map(arg)
                    .collect();
                DeliveredMessage {
                    path,
                    mail_from: mail_from.unwrap_or_default(),
                    rcpts,
                    content,
                }
            })
            .collect()
    }

    /// Poll until at least `n` messages reached the sink; false on timeout.
    pub fn wait_delivered(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.delivered() >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `postqueue -j`: every message in the queue (all queues).
    pub fn queue(&self) -> io::Result<Vec<QueueEntry>> {
        let out = Command::new(&self.bins.postqueue)
            .arg("-c")
            .arg(&self.config_dir)
            .arg("-j")
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "postqueue -j failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let mut entries = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
            let recipients = v["recipients"]
                .as_array()
                .map(|rs| {
                    rs.iter()
                        .map(|r| {
                            (
                                r["address"].as_str().unwrap_or("").to_string(),
                                r["delay_reason"].as_str().map(str::to_string),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            entries.push(QueueEntry {
                queue_name: s("queue_name"),
                queue_id: s("queue_id"),
                sender: s("sender"),
                recipients,
            });
        }
        Ok(entries)
    }

    /// Queue ids of the messages in the hold queue. Panics if `postqueue` fails.
    pub fn hold_queue(&self) -> Vec<String> {
        let q = self
            .queue()
            .unwrap_or_else(|e| panic!("postqueue: {e}\n{}", self.debug_dump()));
        q.into_iter()
            .filter(|e| e.queue_name == "hold")
            .map(|e| e.queue_id)
            .collect()
    }

    /// Wait until every accepted message has been processed: the queue holds
    /// nothing but `hold` entries (no incoming/active/maildrop/deferred).
    /// After this, [`delivered`](Self::delivered) no longer changes. The error
    /// on timeout lists what is still queued and why.
    pub fn wait_settled(&self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let pending: Vec<QueueEntry> = self
                .queue()?
                .into_iter()
                .filter(|e| e.queue_name != "hold")
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("queue not settled: {pending:#?}"),
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for `n` deliveries and a settled queue, then assert exactly `n`
    /// arrived. Panics with [`debug_dump`](Self::debug_dump) otherwise.
    pub fn assert_delivered_exactly(&self, n: usize, timeout: Duration) {
        let reached = self.wait_delivered(n, timeout);
        if let Err(e) = self.wait_settled(timeout) {
            panic!("{e}\n{}", self.debug_dump());
        }
        let got = self.delivered();
        assert!(
            reached && got == n,
            "expected exactly {n} deliveries, got {got}\n{}",
            self.debug_dump()
        );
    }

    /// Release a held message (`postsuper -H`); it is then delivered.
    pub fn release_held(&self, queue_id: &str) -> io::Result<()> {
        let out = Command::new(&self.bins.postsuper)
            .arg("-c")
            .arg(&self.config_dir)
            .arg("-H")
            .arg(queue_id)
            .stdin(Stdio::null())
            .output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "postsuper -H failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }

    // ---- debugging -----------------------------------------------------

    /// The whole maillog.
    pub fn maillog(&self) -> String {
        fs::read_to_string(&self.maillog)
            .unwrap_or_else(|e| format!("(no maillog at {}: {e})", self.maillog.display()))
    }

    /// The last `n` lines of the maillog.
    pub fn maillog_tail(&self, n: usize) -> String {
        let log = self.maillog();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Everything useful in a failure message: paths, queue, sink, maillog.
    pub fn debug_dump(&self) -> String {
        let queue = match self.queue() {
            Ok(q) => format!("{q:#?}"),
            Err(e) => format!("(postqueue failed: {e})"),
        };
        format!(
            "---- postfix instance {} (smtpd {}, sink {}; set {KEEP_ENV}=1 to keep it)\n\
             ---- queue: {queue}\n---- sink files: {}\n---- maillog (last 80 lines):\n{}\n----",
            self.root.display(),
            self.smtpd_addr,
            self.sink_addr,
            self.delivered(),
            self.maillog_tail(80),
        )
    }

    // ---- SMTP ------------------------------------------------------------

    /// Send one message as SASL user `user` (empty = unauthenticated) from
    /// `client_addr` (via XCLIENT; IPv6 as `IPV6:...`). Panics with the
    /// maillog on an I/O error or timeout; SMTP refusals are in the outcome.
    pub fn send_as(
        &self,
        user: &str,
        client_addr: &str,
        from: &str,
        rcpts: &[&str],
        body: &str,
    ) -> SendOutcome {
        self.try_send_as(user, client_addr, from, rcpts, body)
            .unwrap_or_else(|e| {
                panic!(
                    "SMTP session with {} failed: {e}\n{}",
                    self.smtpd_addr,
                    self.debug_dump()
                )
            })
    }

    /// Like [`send_as`](Self::send_as) but returns I/O errors. One fresh
    /// connection per message (Postfix tarpits sessions with many errors).
    pub fn try_send_as(
        &self,
        user: &str,
        client_addr: &str,
        from: &str,
        rcpts: &[&str],
        body: &str,
    ) -> io::Result<SendOutcome> {
        let mut out = SendOutcome::default();
        let mut s = Smtp::connect(self.smtpd_addr, self.opts.io_timeout)?;
        let greeting = s.reply()?;
        if !out.record(SmtpStep::Greeting, greeting, 220) {
            return Ok(out);
        }
        macro_rules! step {
            ($step:expr, $cmd:expr, $want:expr) => {{
                let reply = s.command($cmd)?;
                if !out.record($step, reply, $want) {
                    let _ = s.command("QUIT");
                    return Ok(out);
                }
            }};
        }
        step!(SmtpStep::Ehlo, "EHLO client.example", 250);
        let mut xclient = String::from("XCLIENT");
        if !user.is_empty() {
            xclient.push_str(&format!(" LOGIN={}", xtext(user)));
        }
        xclient.push_str(&format!(" ADDR={} NAME=client.example", xtext(client_addr)));
        step!(SmtpStep::Xclient, &xclient, 220);
        // XCLIENT resets the session and sends a new greeting: EHLO again.
        step!(SmtpStep::EhloAfterXclient, "EHLO client.example", 250);
        step!(SmtpStep::MailFrom, &format!("MAIL FROM:<{from}>"), 250);
        let mut accepted_rcpts = 0;
        for rcpt in rcpts {
            let reply = s.command(&format!("RCPT TO:<{rcpt}>"))?;
            if out.record(SmtpStep::RcptTo(rcpt.to_string()), reply, 250) {
                accepted_rcpts += 1;
            }
        }
        if accepted_rcpts == 0 {
            let _ = s.command("QUIT");
            return Ok(out);
        }
        step!(SmtpStep::Data, "DATA", 354);
        s.send_raw(&message_data(from, rcpts, body))?;
        let reply = s.reply()?;
        if out.record(SmtpStep::EndOfData, reply.clone(), 250) {
            out.accepted = true;
            out.queue_id = reply
                .text()
                .split("queued as ")
                .nth(1)
                .map(|q| q.trim().to_string());
        }
        if let Ok(r) = s.command("QUIT") {
            out.record(SmtpStep::Quit, r, 221);
        }
        Ok(out)
    }
}

impl Drop for PostfixInstance {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        if panicking {
            eprintln!("{}", self.debug_dump());
        }
        if !self.stopped {
            self.stop_postfix();
        }
        if let Some(mut sink) = self.sink.take() {
            let _ = sink.kill();
            let _ = sink.wait();
        }
        if std::env::var(KEEP_ENV).is_ok_and(|v| v == "1") {
            let _ = fs::write(self.root.join(KEPT_MARKER), "");
            eprintln!("{KEEP_ENV}=1: keeping {}", self.root.display());
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

impl PostfixInstance {
    /// The master's pid, if it is running in this instance: its pid file, and
    /// a process whose working directory is our queue directory (so a stale
    /// pid file can never make us signal an unrelated process).
    fn master_pid(&self) -> Option<u32> {
        let pid: u32 = fs::read_to_string(self.queue_dir.join("pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cwd = fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
        (cwd == self.queue_dir).then_some(pid)
    }

    /// Stop the master and its children, so no instance outlives its test.
    /// SIGTERM to the master is what `postfix stop` does, but `postfix stop`
    /// then polls in 1 s sleeps; we poll faster. Falls back to `postfix abort`
    /// and finally SIGKILL to the master's process group.
    fn stop_postfix(&mut self) {
        let wait_gone = |pid: u32, t: Duration| {
            let deadline = Instant::now() + t;
            while pid_alive(pid) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            !pid_alive(pid)
        };
        let kill = |sig: &str, target: String| {
            let _ = Command::new("kill").arg(sig).arg("--").arg(target).status();
        };
        match self.master_pid() {
            Some(pid) => {
                kill("-TERM", pid.to_string());
                if !wait_gone(pid, Duration::from_secs(5)) {
                    let _ = self.postfix_cmd("abort");
                    if !wait_gone(pid, Duration::from_secs(5)) {
                        kill("-KILL", format!("-{pid}"));
                    }
                }
            }
            // No pid file or not ours: let Postfix sort it out.
            None => {
                let _ = self.postfix_cmd("stop");
            }
        }
        self.stopped = true;
    }
}

// ---- SMTP client -------------------------------------------------------

/// A step of the SMTP session [`PostfixInstance::send_as`] runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SmtpStep {
    Greeting,
    Ehlo,
    Xclient,
    EhloAfterXclient,
    MailFrom,
    RcptTo(String),
    Data,
    /// The reply after the final `.`.
    EndOfData,
    Quit,
}

/// One (possibly multi-line) SMTP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Text of each line, without the code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    /// All lines joined with `\n`.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" / "))
    }
}

/// What happened to one message.
#[derive(Clone, Debug, Default)]
pub struct SendOutcome {
    /// Every reply, in order, with its step.
    pub transcript: Vec<(SmtpStep, Reply)>,
    /// 250 after end-of-data: Postfix queued the message.
    pub accepted: bool,
    /// From `250 2.0.0 Ok: queued as ID`.
    pub queue_id: Option<String>,
    /// The first unexpected reply (4xx/5xx) and the step it answered.
    pub first_error: Option<(SmtpStep, Reply)>,
}

impl SendOutcome {
    fn record(&mut self, step: SmtpStep, reply: Reply, want: u16) -> bool {
        let ok = reply.code == want;
        if !ok && self.first_error.is_none() {
            self.first_error = Some((step.clone(), reply.clone()));
        }
        self.transcript.push((step, reply));
        ok
    }

    /// Code of the first error, if any.
    pub fn error_code(&self) -> Option<u16> {
        self.first_error.as_ref().map(|(_, r)| r.code)
    }

    /// True if the first error is a temporary (4xx) refusal.
    pub fn is_temp_fail(&self) -> bool {
        self.error_code().is_some_and(|c| (400..500).contains(&c))
    }
}

struct Smtp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    deadline_each: Duration,
}

impl Smtp {
    fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Smtp> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Smtp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            deadline_each: timeout,
        })
    }

    fn send_raw(&mut self, data: &str) -> io::Result<()> {
        self.writer.write_all(data.as_bytes())?;
        self.writer.flush()
    }

    fn command(&mut self, cmd: &str) -> io::Result<Reply> {
        self.send_raw(&format!("{cmd}\r\n"))?;
        self.reply()
    }

    /// Read one reply. Each read has the socket timeout, and the whole reply
    /// must arrive within that time too (no endless slow drip).
    fn reply(&mut self) -> io::Result<Reply> {
        let deadline = Instant::now() + self.deadline_each;
        let mut lines = Vec::new();
        loop {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "SMTP reply took too long",
                ));
            }
            let mut buf = Vec::new();
            let n = (&mut self.reader).take(4096).read_until(b'\n', &mut buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("server closed the connection after {lines:?}"),
                ));
            }
            let line = String::from_utf8_lossy(&buf);
            let line = line.trim_end_matches(['\r', '\n']);
            let code = line
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("not an SMTP reply: {line:?}"),
                    )
                })?;
            lines.push(line.get(4..).unwrap_or("").to_string());
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(Reply { code, lines });
            }
        }
    }
}

/// Headers + body, CRLF line ends, dot-stuffed, ending with `.`.
fn message_data(from: &str, rcpts: &[&str], body: &str) -> String {
    let mut data = format!(
        "From: <{from}>\r\nTo: {}\r\nSubject: ratelimit postfix harness\r\n\r\n",
        rcpts
            .iter()
            .map(|r| format!("<{r}>"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for line in body.lines() {
        if line.starts_with('.') {
            data.push('.');
        }
        data.push_str(line);
        data.push_str("\r\n");
    }
    data.push_str(".\r\n");
    data
}

/// RFC 3461 xtext, as XCLIENT attribute values need.
fn xtext(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

// ---- small OS helpers ----------------------------------------------------

fn is_root() -> bool {
    // Effective uid is the second field of `Uid:` in /proc/self/status.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Uid:")
                    .map(|r| r.split_whitespace().nth(1) == Some("0"))
            })
        })
        .unwrap_or(false)
}

fn nobody_ids() -> (u32, u32) {
    fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 3 && f[0] == "nobody")
                    .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
            })
        })
        .unwrap_or((65534, 65534))
}

/// Two distinct free ports: bind 127.0.0.1:0 twice (both held at once, so
/// they differ), note the ports, release them.
fn free_loopback_ports() -> io::Result<[SocketAddr; 2]> {
    let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let b = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok([a.local_addr()?, b.local_addr()?])
}

/// A fresh `/tmp/ratelimit-postfix-PID-N-NANOS`, mode 0755, owned by us (root).
/// Postfix refuses queue/config paths with group- or world-writable parents
/// (other than sticky /tmp itself).
fn make_root_dir() -> io::Result<(PathBuf, usize)> {
    loop {
        let n = INSTANCE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = PathBuf::from(format!(
            "/tmp/ratelimit-postfix-{}-{n}-{nanos:08x}",
            std::process::id()
        ));
        match fs::DirBuilder::new().mode(0o755).create(&dir) {
            Ok(()) => {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
                return Ok((dir, n));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Clean up after test processes that died without running `Drop` (killed,
/// aborted): their Postfix master and smtp-sink daemons would otherwise run
/// forever. Only directories whose creating test process is gone are touched,
/// so instances of concurrent test runs are safe; kept ones are left alone.
fn sweep_stale(bins: &Binaries) {
    let Ok(entries) = fs::read_dir("/tmp") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix(ROOT_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        if pid_alive(owner) || dir.join(KEPT_MARKER).exists() {
            continue;
        }
        if dir.join("etc/main.cf").exists() {
            let _ = Command::new(&bins.postfix)
                .arg("-c")
                .arg(dir.join("etc"))
                .arg("abort")
                .stdin(Stdio::null())
                .output();
        }
        let sink_pid = fs::read_to_string(dir.join(SINK_PID_FILE))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        if let Some(pid) = sink_pid {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("smtp-sink") && cmdline.contains(&name) {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
