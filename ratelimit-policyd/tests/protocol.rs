//! Behaviour of the policy protocol parser and reply encoder.

use std::borrow::Cow;

use proptest::prelude::*;
use ratelimit_policyd::protocol::{
    Action, Attribute, DEFAULT_CODE_TEXT, MAX_TEXT, ParseError, Parsed, PolicyRequest, ReplyCode,
    RequestBounds, ResponseError, Stage, Status, encode_response, frame_request, parse_request,
    parse_response,
};

/// What Postfix 3.7 sent at END-OF-MESSAGE for an XCLIENT-authenticated session on this
/// machine: all 29 attributes, in Postfix's order.
const POSTFIX_37_EOM: &[u8] = b"request=smtpd_access_policy
protocol_state=END-OF-MESSAGE
protocol_name=ESMTP
client_address=192.0.2.10
client_name=client.example
client_port=53114
reverse_client_name=client.example
server_address=127.0.0.1
server_port=10025
helo_name=client.example
sender=alice@example.org
recipient=bob@example.net
recipient_count=1
queue_id=4XYZ1s0Q3Hz1A
instance=48c8.6b08bc48.9874b.0
size=1342
etrn_domain=
stress=
sasl_method=XCLIENT
sasl_username=alice
sasl_sender=
ccert_subject=
ccert_issuer=
ccert_fingerprint=
ccert_pubkey_fingerprint=
encryption_protocol=
encryption_cipher=
encryption_keysize=0
policy_context=submission

";

/// The first RCPT of a message: empty queue_id, recipient_count 0, MAIL FROM SIZE.
const POSTFIX_37_RCPT: &[u8] = b"request=smtpd_access_policy
protocol_state=RCPT
protocol_name=ESMTP
client_address=198.51.100.7
client_name=unknown
client_port=40022
reverse_client_name=unknown
server_address=127.0.0.1
server_port=587
helo_name=[198.51.100.7]
sender=carol@example.org
recipient=dave@example.com
recipient_count=0
queue_id=
instance=48c9.6b08bc49.1a2b.0
size=0
etrn_domain=
stress=
sasl_method=PLAIN
sasl_username=carol@example.org
sasl_sender=
ccert_subject=
ccert_issuer=
ccert_fingerprint=
ccert_pubkey_fingerprint=
encryption_protocol=TLSv1.3
encryption_cipher=TLS_AES_256_GCM_SHA384
encryption_keysize=256
policy_context=

";

fn slots() -> [Attribute<'static>; 64] {
    [Attribute::EMPTY; 64]
}

fn parse(buf: &[u8]) -> Result<Status<Parsed>, ParseError> {
    parse_request(buf, &RequestBounds::default(), &mut slots())
}

fn crlf(lf: &[u8]) -> Vec<u8> {
    lf.iter()
        .flat_map(|&b| {
            if b == b'\n' {
                vec![b'\r', b'\n']
            } else {
                vec![b]
            }
        })
        .collect()
}

fn complete(consumed: usize, attributes: usize) -> Result<Status<Parsed>, ParseError> {
    Ok(Status::Complete(Parsed {
        consumed,
        attributes,
    }))
}

// ---------------------------------------------------------------- framing

#[test]
fn a_real_postfix_request_parses_completely_with_all_29_attributes() {
    let mut slots = slots();
    let parsed = parse_request(POSTFIX_37_EOM, &RequestBounds::default(), &mut slots)
        .unwrap()
        .complete()
        .unwrap();
    assert_eq!(parsed.consumed, POSTFIX_37_EOM.len());
    assert_eq!(parsed.attributes, 29);
    assert_eq!(slots[0].name, b"request");
    assert_eq!(slots[28].name, b"policy_context");
    assert_eq!(slots[28].value, b"submission");
    assert_eq!(slots[16].name, b"etrn_domain");
    assert_eq!(slots[16].value, b"");
}

#[test]
fn every_proper_prefix_of_a_real_request_is_partial() {
    for request in [POSTFIX_37_EOM, POSTFIX_37_RCPT, &crlf(POSTFIX_37_EOM)] {
        for end in 0..request.len() {
            assert_eq!(
                parse(&request[..end]),
                Ok(Status::Partial),
                "prefix of {end} bytes"
            );
        }
        assert_eq!(parse(request), complete(request.len(), 29));
    }
}

#[test]
fn frame_request_agrees_with_parse_request() {
    for end in 0..=POSTFIX_37_EOM.len() {
        let buf = &POSTFIX_37_EOM[..end];
        assert_eq!(frame_request(buf, &RequestBounds::default()), parse(buf));
    }
}

#[test]
fn two_pipelined_requests_are_parsed_one_after_the_other() {
    let mut buf = POSTFIX_37_EOM.to_vec();
    buf.extend_from_slice(POSTFIX_37_RCPT);

    let first = parse(&buf).unwrap().complete().unwrap();
    assert_eq!(first.consumed, POSTFIX_37_EOM.len());

    let mut slots = slots();
    let rest = &buf[first.consumed..];
    let second = parse_request(rest, &RequestBounds::default(), &mut slots)
        .unwrap()
        .complete()
        .unwrap();
    assert_eq!(second.consumed, POSTFIX_37_RCPT.len());
    let request = PolicyRequest::from_attributes(&slots[..second.attributes]).unwrap();
    assert_eq!(request.sasl_username_str(), Some("carol@example.org"));
}

#[test]
fn crlf_and_lf_line_endings_give_the_same_attributes() {
    let crlf_request = crlf(POSTFIX_37_EOM);
    let (mut lf_slots, mut crlf_slots) = (slots(), slots());
    let lf = parse_request(POSTFIX_37_EOM, &RequestBounds::default(), &mut lf_slots);
    let cr = parse_request(&crlf_request, &RequestBounds::default(), &mut crlf_slots);
    assert_eq!(lf, complete(POSTFIX_37_EOM.len(), 29));
    assert_eq!(cr, complete(crlf_request.len(), 29));
    assert_eq!(lf_slots, crlf_slots);
}

#[test]
fn mixed_line_endings_are_accepted() {
    assert_eq!(parse(b"a=1\r\nb=2\n\r\n"), complete(11, 2));
    assert_eq!(parse(b"a=1\nb=2\r\n\n"), complete(10, 2));
}

#[test]
fn only_one_trailing_cr_is_stripped_and_inner_crs_are_kept() {
    let mut slots = slots();
    let parsed = parse_request(b"a=x\ry\r\r\n\n", &RequestBounds::default(), &mut slots);
    assert_eq!(parsed, complete(9, 1));
    assert_eq!(slots[0].value, b"x\ry\r");
}

#[test]
fn a_lone_empty_line_is_a_complete_request_without_attributes() {
    assert_eq!(parse(b"\n"), complete(1, 0));
    assert_eq!(parse(b"\r\n"), complete(2, 0));
    assert_eq!(parse(b""), Ok(Status::Partial));
    assert_eq!(parse(b"\r"), Ok(Status::Partial));
}

#[test]
fn the_value_is_everything_after_the_first_equals_sign() {
    let mut slots = slots();
    let parsed = parse_request(
        b"ccert_subject=CN=a=b\nempty=\n\n",
        &RequestBounds::default(),
        &mut slots,
    );
    assert_eq!(parsed, complete(29, 2));
    assert_eq!(slots[0].name, b"ccert_subject");
    assert_eq!(slots[0].value, b"CN=a=b");
    assert_eq!(slots[1].value, b"");
}

// ---------------------------------------------------------------- errors

#[test]
fn malformed_requests_are_refused_with_where_and_what() {
    let cases: &[(&[u8], ParseError)] = &[
        (b"a=1\nno equals\n\n", ParseError::MissingEquals { line: 2 }),
        (
            b"a=1\r\nnoequals\r\n\r\n",
            ParseError::MissingEquals { line: 2 },
        ),
        (b"=value\n\n", ParseError::EmptyName { line: 1 }),
        (b"a=1\nb=x\0y\n\n", ParseError::Nul { line: 2 }),
        (b"na\0me=1\n\n", ParseError::Nul { line: 1 }),
        // A NUL is refused before the line is even complete.
        (b"a=1\nb=\0", ParseError::Nul { line: 2 }),
    ];
    for (input, expected) in cases {
        assert_eq!(parse(input), Err(*expected), "{}", input.escape_ascii());
    }
}

#[test]
fn error_messages_say_what_and_where() {
    assert_eq!(
        ParseError::MissingEquals { line: 3 }.to_string(),
        "line 3: no '=' between attribute name and value"
    );
    assert_eq!(
        ParseError::LineTooLong {
            line: 1,
            limit: 4096
        }
        .to_string(),
        "line 1: longer than 4096 bytes"
    );
    assert_eq!(
        ParseError::InvalidNumber { name: "size" }.to_string(),
        "attribute size: not a decimal number"
    );
}

#[test]
fn an_oversize_line_is_refused_while_still_partial() {
    let bounds = RequestBounds {
        max_line: 10,
        ..RequestBounds::default()
    };
    let mut slots = slots();
    // 10 bytes of content is fine, complete or not.
    assert_eq!(
        parse_request(b"a=12345678", &bounds, &mut slots),
        Ok(Status::Partial)
    );
    assert_eq!(
        parse_request(b"a=12345678\n\n", &bounds, &mut slots),
        complete(12, 1)
    );
    // The 11th byte without a newline settles it.
    let too_long = Err(ParseError::LineTooLong { line: 1, limit: 10 });
    assert_eq!(parse_request(b"a=123456789", &bounds, &mut slots), too_long);
    assert_eq!(
        parse_request(b"a=123456789\n\n", &bounds, &mut slots),
        too_long
    );
    // A CR counts toward the line.
    assert_eq!(
        parse_request(b"a=12345678\r\n\n", &bounds, &mut slots),
        too_long
    );
}

#[test]
fn a_ten_megabyte_line_is_refused_after_looking_at_one_line_limit() {
    let huge = vec![b'x'; 10 << 20];
    assert_eq!(
        parse(&huge),
        Err(ParseError::LineTooLong {
            line: 1,
            limit: RequestBounds::default().max_line
        })
    );
    // The first byte past the limit is enough.
    let max_line = RequestBounds::default().max_line;
    assert_eq!(parse(&huge[..max_line]), Ok(Status::Partial));
    assert!(parse(&huge[..=max_line]).is_err());
}

#[test]
fn too_many_attributes_are_refused() {
    let bounds = RequestBounds {
        max_attributes: 3,
        ..RequestBounds::default()
    };
    let mut slots = slots();
    assert_eq!(
        parse_request(b"a=1\nb=2\nc=3\n\n", &bounds, &mut slots),
        complete(13, 3)
    );
    let too_many = Err(ParseError::TooManyAttributes { limit: 3 });
    assert_eq!(
        parse_request(b"a=1\nb=2\nc=3\nd=4\n\n", &bounds, &mut slots),
        too_many
    );
    // Known as soon as the fourth line ends.
    assert_eq!(
        parse_request(b"a=1\nb=2\nc=3\nd=4\n", &bounds, &mut slots),
        too_many
    );

    let many: Vec<u8> = (0..65)
        .flat_map(|i| format!("x{i}=1\n").into_bytes())
        .collect();
    assert_eq!(
        parse(&many),
        Err(ParseError::TooManyAttributes { limit: 64 })
    );
}

#[test]
fn running_out_of_slots_is_an_ordinary_error() {
    let mut slots = [Attribute::EMPTY; 28];
    assert_eq!(
        parse_request(POSTFIX_37_EOM, &RequestBounds::default(), &mut slots),
        Err(ParseError::OutOfSlots { slots: 28 })
    );
    assert_eq!(
        parse_request(b"\n", &RequestBounds::default(), &mut []),
        complete(1, 0)
    );
}

#[test]
fn a_too_large_request_is_refused_even_while_partial() {
    let bounds = RequestBounds {
        max_request: 12,
        ..RequestBounds::default()
    };
    let mut slots = slots();
    assert_eq!(
        parse_request(b"a=1\nb=2\nc=3\n\n", &bounds, &mut slots),
        Err(ParseError::RequestTooLarge { limit: 12 })
    );
    assert_eq!(
        parse_request(b"a=1\nb=2\ncc=\n\n", &bounds, &mut slots),
        Err(ParseError::RequestTooLarge { limit: 12 })
    );
    // Exactly at the limit is fine.
    assert_eq!(
        parse_request(b"a=1\nb=2\nc=\n\n", &bounds, &mut slots),
        complete(12, 3)
    );
    // Twelve bytes without the end of the request can only grow past the limit.
    assert_eq!(
        parse_request(b"a=1\nb=2\nc=3\n", &bounds, &mut slots),
        Err(ParseError::RequestTooLarge { limit: 12 })
    );
    assert_eq!(
        parse_request(b"a=1\nb=2\nc=3", &bounds, &mut slots),
        Ok(Status::Partial)
    );

    // With the defaults: many short lines adding up past 16 KiB.
    let big: Vec<u8> = (0..60)
        .flat_map(|i| format!("x{i}={}\n", "v".repeat(300)).into_bytes())
        .collect();
    assert_eq!(
        parse(&big),
        Err(ParseError::RequestTooLarge { limit: 16 * 1024 })
    );
}

#[test]
fn limit_errors_are_told_apart_from_malformed_input() {
    assert!(ParseError::RequestTooLarge { limit: 1 }.is_limit());
    assert!(ParseError::LineTooLong { line: 1, limit: 1 }.is_limit());
    assert!(ParseError::TooManyAttributes { limit: 1 }.is_limit());
    assert!(!ParseError::MissingEquals { line: 1 }.is_limit());
    assert!(!ParseError::OutOfSlots { slots: 1 }.is_limit());
}

// ---------------------------------------------------------------- typed view

fn with_request<R>(buf: &[u8], check: impl FnOnce(PolicyRequest<'_>) -> R) -> R {
    let mut slots = slots();
    let parsed = parse_request(buf, &RequestBounds::default(), &mut slots)
        .unwrap()
        .complete()
        .unwrap();
    check(PolicyRequest::from_attributes(&slots[..parsed.attributes]).unwrap())
}

#[test]
fn the_typed_view_of_a_real_request_has_every_field() {
    with_request(POSTFIX_37_EOM, |r| {
        assert!(r.is_access_policy());
        assert_eq!(r.protocol_state, Stage::EndOfMessage);
        assert_eq!(r.sasl_username_str(), Some("alice"));
        assert_eq!(r.sasl_method_str(), Some("XCLIENT"));
        assert_eq!(r.sender_str(), Some("alice@example.org"));
        assert_eq!(r.recipient_str(), Some("bob@example.net"));
        assert_eq!(r.client_address_str(), Some("192.0.2.10"));
        assert_eq!(r.client_name_str(), Some("client.example"));
        assert_eq!(r.instance_str(), Some("48c8.6b08bc48.9874b.0"));
        assert_eq!(r.queue_id_str(), Some("4XYZ1s0Q3Hz1A"));
        assert_eq!(r.policy_context_str(), Some("submission"));
        assert_eq!(r.recipient_count, Some(1));
        assert_eq!(r.size, Some(1342));
        assert_eq!(r.attributes().len(), 29);
        assert_eq!(r.get(b"encryption_keysize"), Some(&b"0"[..]));
    });
}

#[test]
fn empty_values_read_as_absent() {
    with_request(POSTFIX_37_RCPT, |r| {
        assert_eq!(r.protocol_state, Stage::Rcpt);
        assert_eq!(r.queue_id, None);
        assert_eq!(r.policy_context, None);
        assert_eq!(r.recipient_count, Some(0));
        assert_eq!(r.size, Some(0));
        // The raw attribute is still there.
        assert_eq!(r.get(b"queue_id"), Some(&b""[..]));
    });
    with_request(b"sasl_username=\nsize=\n\n", |r| {
        assert_eq!(r.sasl_username, None);
        assert_eq!(r.size, None);
        assert_eq!(r.protocol_state, Stage::Other);
        assert!(!r.is_access_policy());
    });
}

#[test]
fn invalid_utf8_is_accepted_and_only_the_str_accessor_declines() {
    let buf = b"sasl_username=caf\xe9\nsender=ok@example.org\n\n";
    let mut slots = slots();
    let parsed = parse_request(buf, &RequestBounds::default(), &mut slots)
        .unwrap()
        .complete()
        .unwrap();
    assert_eq!(slots[0].value_str(), None);
    let r = PolicyRequest::from_attributes(&slots[..parsed.attributes]).unwrap();
    assert_eq!(r.sasl_username, Some(&b"caf\xe9"[..]));
    assert_eq!(r.sasl_username_str(), None);
    assert_eq!(r.sender_str(), Some("ok@example.org"));
}

#[test]
fn unknown_attributes_are_ignored_but_kept_in_the_raw_list() {
    with_request(
        b"tls_sni=mx.example\nfuture_thing=42\nsasl_username=u\n\n",
        |r| {
            assert_eq!(r.sasl_username_str(), Some("u"));
            assert_eq!(r.get(b"tls_sni"), Some(&b"mx.example"[..]));
            assert_eq!(r.attributes().len(), 3);
        },
    );
}

#[test]
fn a_repeated_name_keeps_the_last_value() {
    let buf = b"sasl_username=first\nsize=1\nsasl_username=last\nsize=2\nprotocol_state=RCPT\nprotocol_state=DATA\n\n";
    with_request(buf, |r| {
        assert_eq!(r.sasl_username_str(), Some("last"));
        assert_eq!(r.size, Some(2));
        assert_eq!(r.protocol_state, Stage::Data);
        assert_eq!(r.get(b"sasl_username"), Some(&b"last"[..]));
        assert_eq!(r.attributes().len(), 6);
    });
    // Last wins even when the last value is empty.
    with_request(b"sasl_username=x\nsasl_username=\n\n", |r| {
        assert_eq!(r.sasl_username, None);
    });
}

#[test]
fn every_protocol_state_maps_to_its_stage_case_insensitively() {
    let table: &[(&str, Stage)] = &[
        ("CONNECT", Stage::Connect),
        ("EHLO", Stage::Ehlo),
        ("HELO", Stage::Helo),
        ("MAIL", Stage::Mail),
        ("RCPT", Stage::Rcpt),
        ("DATA", Stage::Data),
        ("BDAT", Stage::Data),
        ("END-OF-MESSAGE", Stage::EndOfMessage),
        ("VRFY", Stage::Vrfy),
        ("ETRN", Stage::Etrn),
        ("QUIT", Stage::Other),
        ("END_OF_MESSAGE", Stage::Other),
        ("", Stage::Other),
    ];
    for &(name, stage) in table {
        assert_eq!(Stage::parse(name.as_bytes()), stage, "{name}");
        assert_eq!(
            Stage::parse(name.to_lowercase().as_bytes()),
            stage,
            "{name}"
        );
        if stage != Stage::Other && name != "BDAT" {
            assert_eq!(stage.as_str(), name);
        }
    }
}

#[test]
fn numbers_must_be_plain_decimal() {
    let check = |value: &[u8]| {
        let attributes = [Attribute {
            name: b"size",
            value,
        }];
        PolicyRequest::from_attributes(&attributes).map(|r| r.size)
    };
    assert_eq!(check(b"0"), Ok(Some(0)));
    assert_eq!(check(b"18446744073709551615"), Ok(Some(u64::MAX)));
    assert_eq!(check(b""), Ok(None));
    let invalid = Err(ParseError::InvalidNumber { name: "size" });
    for bad in [
        &b"18446744073709551616"[..],
        b"-1",
        b"+1",
        b" 1",
        b"1 ",
        b"1k",
        b"0x10",
    ] {
        assert_eq!(check(bad), invalid, "{}", bad.escape_ascii());
    }
    let attributes = [Attribute {
        name: b"recipient_count",
        value: b"many",
    }];
    assert_eq!(
        PolicyRequest::from_attributes(&attributes),
        Err(ParseError::InvalidNumber {
            name: "recipient_count"
        })
    );
}

// ---------------------------------------------------------------- responses

fn encoded(action: &Action<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_response(action, &mut out);
    out
}

#[test]
fn each_action_encodes_to_its_exact_bytes() {
    let table: Vec<(Action<'_>, &[u8])> = vec![
        (Action::Dunno, b"action=DUNNO\n\n"),
        (Action::Ok, b"action=OK\n\n"),
        (
            Action::defer_if_permit("4.7.1 Rate limit exceeded, retry in 12 minutes"),
            b"action=DEFER_IF_PERMIT 4.7.1 Rate limit exceeded, retry in 12 minutes\n\n",
        ),
        (Action::defer_if_permit(""), b"action=DEFER_IF_PERMIT\n\n"),
        (Action::defer("Try later"), b"action=DEFER Try later\n\n"),
        (Action::reject("Go away"), b"action=REJECT Go away\n\n"),
        (Action::reject(""), b"action=REJECT\n\n"),
        (
            Action::hold("Suspected compromise"),
            b"action=HOLD Suspected compromise\n\n",
        ),
        (
            Action::code(451, "4.7.1 Too much mail").unwrap(),
            b"action=451 4.7.1 Too much mail\n\n",
        ),
        (
            Action::code(554, "5.7.1 Blocked").unwrap(),
            b"action=554 5.7.1 Blocked\n\n",
        ),
        (
            Action::warn("would defer alice"),
            b"action=WARN would defer alice\n\n",
        ),
        (Action::info("counted"), b"action=INFO counted\n\n"),
        (
            Action::prepend("X-Ratelimit: 12/100"),
            b"action=PREPEND X-Ratelimit: 12/100\n\n",
        ),
    ];
    for (action, bytes) in &table {
        assert_eq!(encoded(action), *bytes, "{action:?}");
        assert_eq!(format!("action={action}\n\n").as_bytes(), *bytes);
    }
}

#[test]
fn reply_text_is_sanitized() {
    assert_eq!(
        encoded(&Action::defer("a\nb\r\nc\0d\te")),
        b"action=DEFER a b  c d e\n\n"
    );
    assert_eq!(encoded(&Action::reject("  \r\n")), b"action=REJECT\n\n");
    assert_eq!(
        encoded(&Action::hold("\n trimmed \n")),
        b"action=HOLD trimmed\n\n"
    );
    // An explicit code never goes out bare: Postfix reads an all-digit action as OK.
    assert_eq!(
        encoded(&Action::code(450, " \n").unwrap()),
        format!("action=450 {DEFAULT_CODE_TEXT}\n\n").as_bytes()
    );
}

#[test]
fn long_reply_text_is_cut_at_a_character_boundary() {
    let text = "é".repeat(MAX_TEXT); // two bytes each
    let out = encoded(&Action::defer(text.as_str()));
    let value = std::str::from_utf8(&out).unwrap();
    let sent = value
        .strip_prefix("action=DEFER ")
        .unwrap()
        .strip_suffix("\n\n")
        .unwrap();
    assert_eq!(sent.len(), MAX_TEXT);
    assert!(sent.chars().all(|c| c == 'é'));

    let odd = format!("x{}", "é".repeat(MAX_TEXT));
    let out = encoded(&Action::defer(odd.as_str()));
    assert_eq!(out.len(), "action=DEFER ".len() + MAX_TEXT - 1 + 2);
}

#[test]
fn reply_codes_must_be_4xx_or_5xx() {
    for code in [400, 421, 450, 451, 499, 500, 550, 554, 599] {
        assert_eq!(ReplyCode::new(code).unwrap().get(), code);
    }
    for code in [0, 250, 399, 600, 999, 4510] {
        assert!(ReplyCode::new(code).is_err(), "{code}");
        assert!(Action::code(code, "x").is_err(), "{code}");
    }
    assert!(ReplyCode::new(451).unwrap().is_temporary());
    assert!(!ReplyCode::new(554).unwrap().is_temporary());
}

#[test]
fn replies_decode_with_their_length() {
    let buf = b"action=DEFER_IF_PERMIT 4.7.1 slow\n\naction=DUNNO\n\n";
    let (action, used) = parse_response(buf).unwrap().complete().unwrap();
    assert_eq!(action, Action::defer_if_permit("4.7.1 slow"));
    assert_eq!(used, 35);
    let (action, used) = parse_response(&buf[used..]).unwrap().complete().unwrap();
    assert_eq!((action, used), (Action::Dunno, 14));
    for end in 0..35 {
        assert_eq!(parse_response(&buf[..end]), Ok(Status::Partial));
    }
}

#[test]
fn reply_decoding_follows_postfix() {
    let decode = |buf: &'static [u8]| parse_response(buf).map(|s| s.complete().unwrap().0);
    assert_eq!(decode(b"action=dunno\n\n"), Ok(Action::Dunno));
    assert_eq!(decode(b"action=RELAY\n\n"), Ok(Action::Ok));
    assert_eq!(decode(b"action=12345\n\n"), Ok(Action::Ok));
    assert_eq!(
        decode(b"action=451\t4.7.1 x \n\n"),
        Ok(Action::code(451, "4.7.1 x").unwrap())
    );
    assert_eq!(
        decode(b"other=1\naction=hold  why\r\n\r\n"),
        Ok(Action::hold("why"))
    );
    assert_eq!(
        decode(b"action=DUNNO\naction=REJECT no\n\n"),
        Ok(Action::reject("no"))
    );
    assert_eq!(decode(b"foo=bar\n\n"), Err(ResponseError::MissingAction));
    assert_eq!(
        decode(b"action=FILTER smtp:x\n\n"),
        Err(ResponseError::UnknownAction)
    );
    assert_eq!(decode(b"action=\n\n"), Err(ResponseError::UnknownAction));
    assert_eq!(
        decode(b"action=250 fine\n\n"),
        Err(ResponseError::InvalidCode(
            ratelimit_policyd::protocol::InvalidReplyCode(250)
        ))
    );
    assert_eq!(
        decode(b"action=REJECT \xff\n\n"),
        Err(ResponseError::InvalidUtf8)
    );
    assert_eq!(
        decode(b"action\n\n"),
        Err(ResponseError::Malformed(ParseError::MissingEquals {
            line: 1
        }))
    );
}

#[test]
fn encoded_actions_decode_to_their_sanitized_form() {
    let actions = [
        Action::Dunno,
        Action::Ok,
        Action::defer_if_permit("4.7.1 x"),
        Action::defer("multi\nline\r\ntext"),
        Action::reject(""),
        Action::hold("  padded  "),
        Action::code(421, "4.7.0 bye").unwrap(),
        Action::code(550, "").unwrap(),
        Action::warn("\0"),
        Action::info("ünïcödé"),
        Action::prepend("X-A: b"),
    ];
    for action in actions {
        let out = encoded(&action);
        let (decoded, used) = parse_response(&out).unwrap().complete().unwrap();
        assert_eq!(decoded, action.sanitized(), "{action:?}");
        assert_eq!(used, out.len());
    }
}

#[test]
fn sanitizing_borrows_when_nothing_changes() {
    let action = Action::defer(String::from("fine text"));
    match action.sanitized() {
        Action::Defer(Cow::Borrowed(text)) => assert_eq!(text, "fine text"),
        other => panic!("{other:?}"),
    }
    assert!(Action::defer("x").is_refusal());
    assert!(!Action::warn("x").is_refusal());
    assert_eq!(Action::Dunno.into_owned(), Action::Dunno);
}

// ---------------------------------------------------------------- properties

/// A valid request as (name, value, CRLF?) lines: names without `=`, NUL, LF or a
/// trailing CR; values without NUL, LF or a trailing CR (which would be stripped).
fn request_lines() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>, bool)>> {
    let name = "[a-z_]{1,24}".prop_map(String::into_bytes);
    let value = proptest::collection::vec(
        any::<u8>().prop_filter("no NUL/LF", |b| *b != 0 && *b != b'\n'),
        0..80,
    )
    .prop_filter("no trailing CR", |v| v.last() != Some(&b'\r'));
    proptest::collection::vec((name, value, any::<bool>()), 0..40)
}

fn render(lines: &[(Vec<u8>, Vec<u8>, bool)], end_crlf: bool) -> Vec<u8> {
    let mut buf = Vec::new();
    for (name, value, crlf) in lines {
        buf.extend_from_slice(name);
        buf.push(b'=');
        buf.extend_from_slice(value);
        buf.extend_from_slice(if *crlf { b"\r\n" } else { b"\n" });
    }
    buf.extend_from_slice(if end_crlf { b"\r\n" } else { b"\n" });
    buf
}

proptest! {
    #[test]
    fn any_valid_request_parses_to_its_lines(lines in request_lines(), end_crlf: bool) {
        let buf = render(&lines, end_crlf);
        let mut slots = slots();
        let parsed = parse_request(&buf, &RequestBounds::default(), &mut slots);
        prop_assert_eq!(parsed, complete(buf.len(), lines.len()));
        for (slot, (name, value, _)) in slots.iter().zip(&lines) {
            prop_assert_eq!(slot.name, &name[..]);
            prop_assert_eq!(slot.value, &value[..]);
        }
    }

    #[test]
    fn feeding_a_request_in_chunks_is_partial_until_the_end_then_matches_one_piece(
        lines in request_lines(),
        end_crlf: bool,
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        trailer in proptest::collection::vec(any::<u8>(), 0..20),
    ) {
        let request = render(&lines, end_crlf);
        let mut buf = request.clone();
        buf.extend_from_slice(&trailer);

        let mut whole_slots = slots();
        let whole = parse_request(&buf, &RequestBounds::default(), &mut whole_slots);
        prop_assert_eq!(whole, complete(request.len(), lines.len()));

        let mut ends: Vec<usize> = cuts.iter().map(|i| i.index(buf.len() + 1)).collect();
        ends.sort_unstable();
        ends.push(buf.len());
        for end in ends {
            let mut chunk_slots = slots();
            let got = parse_request(&buf[..end], &RequestBounds::default(), &mut chunk_slots);
            if end < request.len() {
                prop_assert_eq!(got, Ok(Status::Partial), "prefix of {} bytes", end);
            } else {
                prop_assert_eq!(got, whole);
                prop_assert_eq!(&chunk_slots[..lines.len()], &whole_slots[..lines.len()]);
            }
        }
    }

    #[test]
    fn any_prefix_of_any_input_is_partial_or_the_same_result(
        input in proptest::collection::vec(
            prop_oneof![Just(b'\n'), Just(b'='), Just(b'\r'), Just(0u8), any::<u8>(), Just(b'a')],
            0..200,
        ),
        max_line in 0usize..20,
        max_attributes in 0usize..6,
        max_request in 0usize..120,
        end in any::<prop::sample::Index>(),
    ) {
        let bounds = RequestBounds { max_line, max_attributes, max_request };
        let mut whole_slots = [Attribute::EMPTY; 4];
        let whole = parse_request(&input, &bounds, &mut whole_slots);
        let mut prefix_slots = [Attribute::EMPTY; 4];
        let prefix = parse_request(&input[..end.index(input.len() + 1)], &bounds, &mut prefix_slots);
        prop_assert!(prefix == Ok(Status::Partial) || prefix == whole, "{:?} vs {:?}", prefix, whole);
        if let Ok(Status::Complete(parsed)) = whole {
            prop_assert!(parsed.consumed <= max_request && parsed.attributes <= max_attributes);
        }
    }

    #[test]
    fn any_action_round_trips_through_its_sanitized_form(
        kind in 0usize..10,
        code in 400u16..600,
        text in ".{0,500}",
    ) {
        let text = Cow::Borrowed(text.as_str());
        let action = match kind {
            0 => Action::Dunno,
            1 => Action::Ok,
            2 => Action::DeferIfPermit(text),
            3 => Action::Defer(text),
            4 => Action::Reject(text),
            5 => Action::Hold(text),
            6 => Action::Code { code: ReplyCode::new(code).unwrap(), text },
            7 => Action::Warn(text),
            8 => Action::Info(text),
            _ => Action::Prepend(text),
        };
        let out = encoded(&action);
        prop_assert!(out.len() <= "action=DEFER_IF_PERMIT ".len() + MAX_TEXT + 2);
        let (decoded, used) = parse_response(&out).unwrap().complete().unwrap();
        prop_assert_eq!(used, out.len());
        prop_assert_eq!(decoded, action.sanitized());
    }
}
