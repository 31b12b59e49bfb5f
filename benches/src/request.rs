//! Policy requests rendered once and patched in place.
//!
//! A [`MessageStream`] holds, for one connection, the requests that one
//! message produces: for [`Mix::Postfix`] one `RCPT` request per recipient,
//! then `DATA`, then `END-OF-MESSAGE`, all with the same `instance`; for
//! [`Mix::Eom`] a single `END-OF-MESSAGE` request. Every request carries the
//! 29 attributes Postfix 3.7 sends, in Postfix's order, with
//! `recipient_count`, `recipient`, `queue_id` and `size` set the way Postfix
//! sets them at each stage. The user number, `instance` and `queue_id` are
//! fixed-width fields that are overwritten in place before each send, so
//! producing a request costs a few digit writes and no allocation.

use std::ops::Range;

/// The attributes Postfix 3.7 sends in every policy request, in its order.
pub const POSTFIX_ATTRIBUTES: [&str; 29] = [
    "request",
    "protocol_state",
    "protocol_name",
    "client_address",
    "client_name",
    "client_port",
    "reverse_client_name",
    "server_address",
    "server_port",
    "helo_name",
    "sender",
    "recipient",
    "recipient_count",
    "queue_id",
    "instance",
    "size",
    "etrn_domain",
    "stress",
    "sasl_method",
    "sasl_username",
    "sasl_sender",
    "ccert_subject",
    "ccert_issuer",
    "ccert_fingerprint",
    "ccert_pubkey_fingerprint",
    "encryption_protocol",
    "encryption_cipher",
    "encryption_keysize",
    "policy_context",
];

/// `size` before END-OF-MESSAGE: the client's `MAIL FROM ... SIZE=` estimate.
pub const DECLARED_SIZE: u64 = 12_000;
/// `size` at END-OF-MESSAGE: the size Postfix actually received.
pub const ACTUAL_SIZE: u64 = 12_345;

/// Which requests make up one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mix {
    /// One END-OF-MESSAGE request per message (the charging request only).
    Eom,
    /// What Postfix sends with the policy in recipient, data and
    /// end-of-data restrictions: RCPT per recipient, DATA, END-OF-MESSAGE.
    Postfix,
}

/// What the requests of one connection look like.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Which requests make up one message.
    pub mix: Mix,
    /// Recipients per message (at least 1).
    pub recipients: u32,
    /// Number of distinct users; fixes the width of the user number.
    pub users: u64,
    /// Connection number: varies client address, port and `instance` prefix.
    pub connection: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Rcpt { index: u32 },
    Data,
    EndOfMessage,
}

/// One rendered request and the places to patch in it.
#[derive(Debug, Clone)]
struct Template {
    bytes: Vec<u8>,
    /// Decimal user number, in `sender` and `sasl_username`.
    user_slots: Vec<Range<usize>>,
    /// Hex message number inside `instance`.
    instance_slot: Range<usize>,
    /// Hex message number inside `queue_id` (absent at the first RCPT).
    queue_id_slot: Option<Range<usize>>,
}

/// The requests of one message on one connection, patched per message.
#[derive(Debug, Clone)]
pub struct MessageStream {
    templates: Vec<Template>,
    user: u64,
    message: u64,
}

/// Digits needed to write every user number below `users` in decimal.
fn user_width(users: u64) -> usize {
    let mut max = users.saturating_sub(1);
    let mut width = 1;
    while max >= 10 {
        max /= 10;
        width += 1;
    }
    width
}

/// Writes `value` in decimal, zero-padded to fill `dst` (high digits are
/// dropped if it does not fit).
pub fn write_decimal(dst: &mut [u8], mut value: u64) {
    for b in dst.iter_mut().rev() {
        *b = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Writes `value` in hex (lowercase or uppercase), zero-padded to fill `dst`.
pub fn write_hex(dst: &mut [u8], mut value: u64, upper: bool) {
    let digits: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    for b in dst.iter_mut().rev() {
        *b = digits[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// Width of the hex message number in `instance` and `queue_id`.
const MESSAGE_HEX_WIDTH: usize = 8;

struct Renderer<'a> {
    cfg: &'a StreamConfig,
    out: Vec<u8>,
    user_slots: Vec<Range<usize>>,
    instance_slot: Range<usize>,
    queue_id_slot: Option<Range<usize>>,
}

impl Renderer<'_> {
    fn attr(&mut self, name: &str, value: &str) {
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'=');
        self.out.extend_from_slice(value.as_bytes());
        self.out.push(b'\n');
    }

    /// `name=<prefix><placeholder><suffix>`; returns the placeholder's range.
    fn slot(&mut self, name: &str, prefix: &str, width: usize, suffix: &str) -> Range<usize> {
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'=');
        self.out.extend_from_slice(prefix.as_bytes());
        let start = self.out.len();
        self.out.resize(start + width, b'0');
        self.out.extend_from_slice(suffix.as_bytes());
        self.out.push(b'\n');
        start..start + width
    }

    fn user_address(&mut self, name: &str) {
        let width = user_width(self.cfg.users);
        let r = self.slot(name, "u", width, "@example.com");
        self.user_slots.push(r);
    }

    fn render(mut self, stage: Stage) -> Template {
        let cfg = self.cfg;
        let conn = cfg.connection;
        let client_ip = format!("198.51.{}.{}", 100 + (conn / 250) % 100, conn % 250 + 1);
        let client_name = format!("client{conn}.isp.example");
        let state = match stage {
            Stage::Rcpt { .. } => "RCPT",
            Stage::Data => "DATA",
            Stage::EndOfMessage => "END-OF-MESSAGE",
        };
        let (recipient, recipient_count, size) = match stage {
            // At RCPT: the recipient being checked; count not yet known.
            Stage::Rcpt { index } => (Some(index), 0, DECLARED_SIZE),
            // After RCPT: the recipient only if exactly one was accepted.
            Stage::Data => (
                (cfg.recipients == 1).then_some(0),
                cfg.recipients,
                DECLARED_SIZE,
            ),
            Stage::EndOfMessage => (
                (cfg.recipients == 1).then_some(0),
                cfg.recipients,
                ACTUAL_SIZE,
            ),
        };
        for name in POSTFIX_ATTRIBUTES {
            match name {
                "request" => self.attr(name, "smtpd_access_policy"),
                "protocol_state" => self.attr(name, state),
                "protocol_name" => self.attr(name, "ESMTP"),
                "client_address" => self.attr(name, &client_ip),
                "client_name" | "reverse_client_name" => self.attr(name, &client_name),
                "client_port" => self.attr(name, &(40_000 + conn % 20_000).to_string()),
                "server_address" => self.attr(name, "203.0.113.25"),
                "server_port" => self.attr(name, "587"),
                "helo_name" => self.attr(name, &client_name),
                "sender" | "sasl_username" => self.user_address(name),
                "recipient" => match recipient {
                    Some(i) => self.attr(name, &format!("rcpt{i}@dest{}.example", i % 7)),
                    None => self.attr(name, ""),
                },
                "recipient_count" => self.attr(name, &recipient_count.to_string()),
                "queue_id" => {
                    // Postfix creates the queue file when it accepts the
                    // first recipient: the first RCPT request has no id.
                    if stage == (Stage::Rcpt { index: 0 }) {
                        self.attr(name, "");
                    } else {
                        let prefix = format!("{:02X}", conn & 0xff);
                        let r = self.slot(name, &prefix, MESSAGE_HEX_WIDTH, "");
                        self.queue_id_slot = Some(r);
                    }
                }
                "instance" => {
                    let prefix = format!("{:x}.6b08bc48.", conn + 0x1000);
                    self.instance_slot = self.slot(name, &prefix, MESSAGE_HEX_WIDTH, ".0");
                }
                "size" => self.attr(name, &size.to_string()),
                "sasl_method" => self.attr(name, "PLAIN"),
                "encryption_protocol" => self.attr(name, "TLSv1.3"),
                "encryption_cipher" => self.attr(name, "TLS_AES_256_GCM_SHA384"),
                "encryption_keysize" => self.attr(name, "256"),
                // etrn_domain, stress, sasl_sender, ccert_*, policy_context:
                // empty for an authenticated submission without client certs.
                _ => self.attr(name, ""),
            }
        }
        self.out.push(b'\n');
        Template {
            bytes: self.out,
            user_slots: self.user_slots,
            instance_slot: self.instance_slot,
            queue_id_slot: self.queue_id_slot,
        }
    }
}

impl MessageStream {
    /// Renders the requests of one message for the given connection.
    pub fn new(cfg: &StreamConfig) -> MessageStream {
        let recipients = cfg.recipients.max(1);
        let cfg = StreamConfig {
            recipients,
            ..cfg.clone()
        };
        let stages: Vec<Stage> = match cfg.mix {
            Mix::Eom => vec![Stage::EndOfMessage],
            Mix::Postfix => (0..recipients)
                .map(|index| Stage::Rcpt { index })
                .chain([Stage::Data, Stage::EndOfMessage])
                .collect(),
        };
        let templates = stages
            .into_iter()
            .map(|stage| {
                Renderer {
                    cfg: &cfg,
                    out: Vec::with_capacity(1024),
                    user_slots: Vec::new(),
                    instance_slot: 0..0,
                    queue_id_slot: None,
                }
                .render(stage)
            })
            .collect();
        MessageStream {
            templates,
            user: 0,
            message: 0,
        }
    }

    /// How many requests one message produces.
    pub fn requests_per_message(&self) -> usize {
        self.templates.len()
    }

    /// Starts a new message from `user`; `message` is this connection's
    /// message number, which makes `instance` and `queue_id`.
    pub fn begin_message(&mut self, user: u64, message: u64) {
        self.user = user;
        self.message = message;
    }

    /// The bytes of request `index` (0-based, below
    /// [`requests_per_message`](Self::requests_per_message)) of the current
    /// message, ending with the empty line.
    pub fn request(&mut self, index: usize) -> &[u8] {
        let t = &mut self.templates[index];
        for r in &t.user_slots {
            write_decimal(&mut t.bytes[r.clone()], self.user);
        }
        write_hex(&mut t.bytes[t.instance_slot.clone()], self.message, false);
        if let Some(r) = &t.queue_id_slot {
            write_hex(&mut t.bytes[r.clone()], self.message, true);
        }
        &t.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(bytes: &[u8]) -> Vec<(String, String)> {
        let text = std::str::from_utf8(bytes).unwrap();
        let body = text.strip_suffix("\n\n").expect("ends with an empty line");
        body.split('\n')
            .map(|line| {
                let (k, v) = line.split_once('=').expect("name=value");
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    fn stream(mix: Mix, recipients: u32) -> MessageStream {
        MessageStream::new(&StreamConfig {
            mix,
            recipients,
            users: 10_000,
            connection: 3,
        })
    }

    #[test]
    fn every_request_has_the_29_attributes_in_postfix_order() {
        let mut s = stream(Mix::Postfix, 3);
        s.begin_message(17, 1);
        for i in 0..s.requests_per_message() {
            let names: Vec<String> = parse(s.request(i)).into_iter().map(|(k, _)| k).collect();
            assert_eq!(names, POSTFIX_ATTRIBUTES, "request {i}");
        }
    }

    #[test]
    fn stages_carry_what_postfix_sets_at_each_stage() {
        let mut s = stream(Mix::Postfix, 2);
        s.begin_message(42, 0xabc);
        let reqs: Vec<HashMap<String, String>> = (0..4)
            .map(|i| parse(s.request(i)).into_iter().collect())
            .collect();
        let states: Vec<&str> = reqs.iter().map(|r| r["protocol_state"].as_str()).collect();
        assert_eq!(states, ["RCPT", "RCPT", "DATA", "END-OF-MESSAGE"]);
        // Same message: same instance everywhere.
        assert!(
            reqs.iter()
                .all(|r| r["instance"] == "1003.6b08bc48.00000abc.0")
        );
        // queue_id: empty at the first RCPT only.
        assert_eq!(reqs[0]["queue_id"], "");
        assert!(reqs[1..].iter().all(|r| r["queue_id"] == "0300000ABC"));
        // recipient_count: 0 at RCPT, accepted count afterwards.
        let counts: Vec<&str> = reqs.iter().map(|r| r["recipient_count"].as_str()).collect();
        assert_eq!(counts, ["0", "0", "2", "2"]);
        // recipient: at RCPT; afterwards only with exactly one recipient.
        assert_eq!(reqs[0]["recipient"], "rcpt0@dest0.example");
        assert_eq!(reqs[1]["recipient"], "rcpt1@dest1.example");
        assert_eq!(reqs[2]["recipient"], "");
        // size: declared until END-OF-MESSAGE, actual there.
        let sizes: Vec<&str> = reqs.iter().map(|r| r["size"].as_str()).collect();
        assert_eq!(sizes, ["12000", "12000", "12000", "12345"]);
        assert!(
            reqs.iter()
                .all(|r| r["sasl_username"] == "u0042@example.com")
        );
        assert!(reqs.iter().all(|r| r["sender"] == "u0042@example.com"));
    }

    #[test]
    fn a_single_recipient_is_repeated_after_rcpt() {
        let mut s = stream(Mix::Postfix, 1);
        s.begin_message(1, 1);
        let data: HashMap<String, String> = parse(s.request(1)).into_iter().collect();
        assert_eq!(data["protocol_state"], "DATA");
        assert_eq!(data["recipient"], "rcpt0@dest0.example");
        assert_eq!(data["recipient_count"], "1");
    }

    #[test]
    fn eom_mix_is_one_end_of_message_request_per_message() {
        let mut s = stream(Mix::Eom, 1);
        assert_eq!(s.requests_per_message(), 1);
        s.begin_message(9999, 5);
        let r: HashMap<String, String> = parse(s.request(0)).into_iter().collect();
        assert_eq!(r["protocol_state"], "END-OF-MESSAGE");
        assert_eq!(r["sasl_username"], "u9999@example.com");
        assert_eq!(r["size"], "12345");
        assert_eq!(r["recipient_count"], "1");
    }

    #[test]
    fn patching_changes_only_the_slots() {
        let mut s = stream(Mix::Eom, 1);
        s.begin_message(1, 1);
        let a = s.request(0).to_vec();
        s.begin_message(2, 2);
        let b = s.request(0).to_vec();
        assert_eq!(a.len(), b.len());
        let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert_eq!(differing, 4); // two user digits, instance and queue_id digits
    }

    #[test]
    fn user_width_fits_the_largest_user() {
        assert_eq!(user_width(1), 1);
        assert_eq!(user_width(10), 1);
        assert_eq!(user_width(11), 2);
        assert_eq!(user_width(1_000_000), 6);
    }
}
