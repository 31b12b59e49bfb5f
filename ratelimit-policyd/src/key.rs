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
//!
//! A key is at most [`MAX_KEY_BYTES`] (320) bytes, so that what a user costs in each
//! table that holds keys (counters, client networks, clients seen, open incidents)
//! is bounded in bytes, not only in number. A longer key is replaced by its first
//! 286 bytes (cut before a character or an escape it would split), `~h`, and 32 hex
//! digits of a 128-bit keyed hash of the whole key: each long name still has a key of
//! its own, and is limited like any other. The hash is SipHash-1-3 with 128-bit
//! output under fixed keys, so a long name has the same key on every host of a fleet
//! sharing Redis and after a restart (its counters survive in a snapshot). The keys
//! are public, but finding two names with one 128-bit hash still takes about 2^64
//! tries, so a client cannot aim a name at another's quota. A printed long key typed
//! back is already a key, and finds the same user.

use std::borrow::Cow;
use std::fmt::Write;
use std::hash::Hasher;

use siphasher::sip128::{Hasher128, SipHasher13};

/// The longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 320;
/// Between a long key's prefix and its hash.
const LONG_MARK: &str = "~h";
/// Hex digits of a long key's hash (128 bits).
const DIGEST_HEX: usize = 32;
/// The long-key hash's keys: fixed, so every host and every restart agree.
const LONG_KEY_K0: u64 = 0x7261_7465_6c69_6d69;
const LONG_KEY_K1: u64 = 0x742d_6b65_792d_7631;

/// The key of a user name as it arrives in a request (raw bytes).
pub fn normalize(raw: &[u8]) -> Cow<'_, str> {
    bound(match std::str::from_utf8(raw) {
        Ok(s) => normalize_str(s),
        Err(_) => Cow::Owned(normalize_invalid(raw)),
    })
}

/// The key of a name typed by an operator: `\XHH` escapes (as keys of names that are
/// not UTF-8 print) are read as the bytes they stand for, then [`normalize`]d.
pub fn from_text(text: &str) -> String {
    if !text.contains("\\X") {
        return bound(normalize_str(text)).into_owned();
    }
    normalize(&unescape(text)).into_owned()
}

/// `key` (normalized, or built from normalized parts such as `sender:ADDRESS`) cut
/// to at most [`MAX_KEY_BYTES`]: a longer one becomes a prefix, `~h` and a
/// keyed hash of the whole (see the module docs).
pub fn bound(key: Cow<'_, str>) -> Cow<'_, str> {
    if key.len() <= MAX_KEY_BYTES {
        return key;
    }
    let whole: &str = &key;
    let mut hasher = SipHasher13::new_with_keys(LONG_KEY_K0, LONG_KEY_K1);
    hasher.write(whole.as_bytes());
    let (h1, h2) = hasher.finish128().as_u64();
    let mut cut = MAX_KEY_BYTES - LONG_MARK.len() - DIGEST_HEX;
    while cut > 0 && !whole.is_char_boundary(cut) {
        cut -= 1;
    }
    // Never split a `\XHH` escape: typed back, half of one would read differently.
    if let Some(i) = whole.get(..cut).and_then(|p| p.rfind('\\'))
        && cut - i < 4
    {
        cut = i;
    }
    let mut out = String::with_capacity(MAX_KEY_BYTES);
    out.push_str(whole.get(..cut).unwrap_or_default());
    out.push_str(LONG_MARK);
    let _ = write!(out, "{h1:016x}{h2:016x}");
    Cow::Owned(out)
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

    #[test]
    fn long_names_are_cut_to_a_prefix_and_a_keyed_hash_each_its_own() {
        let a = format!("{}a@example.com", "x".repeat(400));
        let b = format!("{}b@example.com", "x".repeat(400));
        let (ka, kb) = (normalize(a.as_bytes()), normalize(b.as_bytes()));
        assert_eq!(ka.len(), MAX_KEY_BYTES);
        assert!(ka.starts_with(&"x".repeat(286)), "{ka}");
        assert_eq!(ka.get(286..288), Some(LONG_MARK));
        assert_ne!(ka, kb);
        // The same name in other case, or typed by an operator, is the same key.
        assert_eq!(normalize(a.to_uppercase().as_bytes()), ka);
        assert_eq!(from_text(&a), ka);
        assert_eq!(from_text(&ka), ka);
        // Names of up to the limit are kept whole.
        let max = "y".repeat(MAX_KEY_BYTES);
        assert_eq!(normalize(max.as_bytes()), max.as_str());
        // The cut never splits a character or an escape.
        let mut raw = vec![b'z'; 284];
        raw.extend_from_slice(b"\xff\xfe");
        raw.extend_from_slice(&[b'z'; 100]);
        let k = normalize(&raw);
        assert!(
            k.starts_with(&"z".repeat(284)) && k.get(284..286) == Some(LONG_MARK),
            "{k}"
        );
        assert_eq!(from_text(&k), k);
    }

    proptest::proptest! {
        #[test]
        fn long_keys_typed_back_are_themselves_and_within_the_bound(
            raw in proptest::collection::vec(
                proptest::prop_oneof![
                    4 => proptest::num::u8::ANY,
                    4 => proptest::sample::select(b"abcXYZ \\".to_vec()),
                ],
                250..700,
            ),
            utf8 in "[a-zA-Z\u{e9}\u{c9}\u{1c5}\u{4e2d}\\\\ ]{100,400}",
        ) {
            for raw in [&raw[..], utf8.as_bytes()] {
                let key = normalize(raw);
                proptest::prop_assert!(key.len() <= MAX_KEY_BYTES);
                proptest::prop_assert_eq!(from_text(&key), key.as_ref());
            }
            let key = normalize(utf8.as_bytes()).into_owned();
            let again = normalize(key.as_bytes()).into_owned();
            proptest::prop_assert_eq!(again, key);
        }

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

#[cfg(test)]
mod stable_tests {
    use super::*;

    #[test]
    fn a_long_name_has_the_same_key_on_every_host_and_after_a_restart() {
        let name = "a".repeat(400);
        let key = normalize(name.as_bytes()).into_owned();
        assert_eq!(key.len(), MAX_KEY_BYTES);
        assert_eq!(key.get(..286), Some("a".repeat(286).as_str()));
        // Pinned: a change of the hash or its keys would split every long name's
        // counters (in snapshots and between the hosts sharing Redis).
        assert_eq!(key.get(286..), Some("~hc46008269c736491a6de60ef4da81562"));
    }
}
