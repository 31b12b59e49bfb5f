//! Feeding input in chunks gives `Partial` until the whole request is there, then the
//! same result as parsing it in one piece.
//!
//! Input layout: byte 0 picks tiny bounds (bit 7) and the number of cuts (low 3 bits);
//! the next bytes are the chunk lengths; the rest is the request stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ratelimit_policyd::protocol::{Attribute, RequestBounds, Status, parse_request};

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let cuts = usize::from(control & 7).min(rest.len());
    let (chunks, input) = rest.split_at(cuts);
    let bounds = if control & 0x80 != 0 {
        RequestBounds {
            max_line: 32,
            max_attributes: 4,
            max_request: 128,
        }
    } else {
        RequestBounds::default()
    };

    let mut whole_slots = [Attribute::EMPTY; 64];
    let whole = parse_request(input, &bounds, &mut whole_slots);

    let mut end = 0;
    let ends = chunks.iter().map(|&len| {
        end = (end + usize::from(len)).min(input.len());
        end
    });
    for end in ends.chain([input.len()]) {
        let mut slots = [Attribute::EMPTY; 64];
        let got = parse_request(&input[..end], &bounds, &mut slots);
        match whole {
            Ok(Status::Complete(parsed)) if end >= parsed.consumed => {
                assert_eq!(got, whole);
                assert_eq!(slots[..parsed.attributes], whole_slots[..parsed.attributes]);
            }
            Ok(Status::Complete(_)) | Ok(Status::Partial) => assert_eq!(got, Ok(Status::Partial)),
            Err(_) => assert!(
                got == Ok(Status::Partial) || got == whole,
                "{got:?} vs {whole:?}"
            ),
        }
    }
});
