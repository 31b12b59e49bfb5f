//! User keys: the one normalizer, used by the request path, the configuration and
//! the admin commands alike, so a name written in any of them finds the same counters.
//!
//! A key is the name trimmed of whitespace and lowercased (Unicode rules: every
//! character whose lowercase form differs is replaced by it, titlecase letters
//! included). A name that is not UTF-8 (a Latin-1 user database, a broken client)
//! still gets a key of its own, never a lossy one: `U+FFFD` replacement would make
//! `jos\xe9` and `jos\xe8` (and the valid `jos\u{fffd}`) one user sharing one quota.
//! Its ASCII whitespace is trimmed, valid UTF-8 runs are normalized as usual, and
//! every invalid byte is written `\XHH` (capital X, upper-case hex). Normalized UTF-8
//! never contains a capital `X`, so such keys cannot collide with valid names, and
//! the escaping is reversible, so they cannot collide with each other.
//!
//! Names typed by an operator (configuration, `admin show`) are text: [`from_text`]
//! reads a `\XHH` escape as the byte it stands for, so the key printed in a log line
//! can be pasted into an admin command and finds the same user.

use std::borrow::Cow;
use std::fmt::Write;

/// The key of a user name as it arrives in a request (raw bytes).
pub fn normalize(raw: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(raw) {
        Ok(s) => normalize_str(s),
        Err(_) => Cow::Owned(normalize_invalid(raw)),
    }
}

/// The key of a name typed by an operator: `\XHH` escapes (as keys of names that are
/// not UTF-8 print) are read as the bytes they stand for, then [`normalize`]d.
pub fn from_text(text: &str) -> String {
    if !text.contains("\\X") {
        return normalize_str(text).into_owned();
    }
    normalize(&unescape(text)).into_owned()
}

/// Trimmed and lowercased, borrowing when it already is.
fn normalize_str(s: &str) -> Cow<'_, str> {
    let trimmed = s.trim();
    let needs_lower = if trimmed.is_ascii() {
        trimmed.bytes().any(|b| b.is_ascii_uppercase())
    } else {
        trimmed.chars().any(changes_when_lowercased)
    };
    match (needs_lower, trimmed.len() == s.len()) {
        (false, true) => Cow::Borrowed(s),
        (false, false) => Cow::Borrowed(trimmed),
        (true, _) => Cow::Owned(trimmed.to_lowercase()),
    }
}

fn changes_when_lowercased(c: char) -> bool {
    c.is_uppercase() || c.to_lowercase().ne(std::iter::once(c))
}

fn normalize_invalid(raw: &[u8]) -> String {
    let raw = raw.trim_ascii();
    let mut key = String::with_capacity(raw.len() + 8);
    for chunk in raw.utf8_chunks() {
        key.push_str(&chunk.valid().to_lowercase());
        for byte in chunk.invalid() {
            let _ = write!(key, "\\X{byte:02X}");
        }
    }
    key
}

/// `\XHH` (upper-case hex) as the byte it stands for; everything else as it is.
fn unescape(text: &str) -> Vec<u8> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if let Some(&[b'\\', b'X', h, l]) = b.get(i..i + 4)
            && let (Some(h), Some(l)) = (upper_hex(h), upper_hex(l))
        {
            out.push(h << 4 | l);
            i += 4;
            continue;
        }
        if let Some(&c) = b.get(i) {
            out.push(c);
        }
        i += 1;
    }
    out
}

fn upper_hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_names_are_borrowed_and_others_trimmed_and_lowercased() {
        assert!(matches!(
            normalize(b"alice@example.com"),
            Cow::Borrowed("alice@example.com")
        ));
        assert!(matches!(normalize(b" bob "), Cow::Borrowed("bob")));
        assert_eq!(normalize(b" Alice@Example.COM "), "alice@example.com");
        assert_eq!(normalize("ÉLODIE".as_bytes()), "élodie");
    }

    #[test]
    fn titlecase_letters_are_lowercased_like_capitals() {
        // U+01C5 (Dž) is titlecase, not uppercase; its lowercase is U+01C6.
        assert_eq!(normalize("\u{1c5}ana".as_bytes()), "\u{1c6}ana");
        assert_eq!(from_text("\u{1c5}ana"), "\u{1c6}ana");
    }

    #[test]
    fn names_that_are_not_utf8_get_keys_of_their_own() {
        assert_eq!(normalize(b" Jos\xe9@Example.com "), "jos\\XE9@example.com");
        let keys = [
            normalize(b"jos\xe9"),
            normalize(b"jos\xe8"),
            normalize("jos\u{fffd}".as_bytes()),
            normalize(b"jos\\XE9"),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(normalize(b"JOS\xe9"), normalize(b"jos\xe9"));
        // A valid name spelling the escape is lowercased like any other.
        assert_eq!(normalize(b"jos\\XE9"), "jos\\xe9");
        assert_eq!(normalize(b"\xc3\x89\xff"), "\u{e9}\\XFF");
    }

    #[test]
    fn a_printed_key_typed_back_finds_the_same_user() {
        for raw in [
            &b"jos\xe9@example.com"[..],
            b" JOS\xe9 ",
            b"\xff\xfe",
            "Élodie".as_bytes(),
            b"alice",
        ] {
            let key = normalize(raw);
            assert_eq!(from_text(&key), key, "{raw:?}");
        }
        assert_eq!(from_text(" Jos\\XE9@Example.com"), "jos\\XE9@example.com");
        // Lower-case hex is not an escape.
        assert_eq!(from_text("a\\Xe9"), "a\\xe9");
    }

    proptest::proptest! {
        #[test]
        fn every_key_typed_back_is_itself(raw in proptest::collection::vec(proptest::num::u8::ANY, 0..24)) {
            let key = normalize(&raw);
            proptest::prop_assert_eq!(from_text(&key), key.as_ref());
        }

        #[test]
        fn text_and_request_paths_agree_on_utf8_names(name in "\\PC{0,16}") {
            proptest::prop_assume!(!name.contains("\\X"));
            let expected = normalize(name.as_bytes()).into_owned();
            proptest::prop_assert_eq!(from_text(&name), expected);
        }

        #[test]
        fn normalizing_a_utf8_name_twice_changes_nothing(name in "\\PC{0,16}") {
            let key = normalize(name.as_bytes()).into_owned();
            let again = normalize(key.as_bytes()).into_owned();
            proptest::prop_assert_eq!(again, key);
        }
    }
}
