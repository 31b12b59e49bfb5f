//! Any input: the parser never panics, and a complete request is well-formed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ratelimit_policyd::protocol::{Attribute, PolicyRequest, RequestBounds, Status, parse_request};

fuzz_target!(|data: &[u8]| {
    let bounds = RequestBounds::default();
    let mut slots = [Attribute::EMPTY; 64];
    if let Ok(Status::Complete(parsed)) = parse_request(data, &bounds, &mut slots) {
        assert!(parsed.consumed <= data.len() && parsed.consumed <= bounds.max_request);
        assert_eq!(data[parsed.consumed - 1], b'\n');
        for attribute in &slots[..parsed.attributes] {
            assert!(!attribute.name.is_empty() && !attribute.name.contains(&b'='));
            for part in [attribute.name, attribute.value] {
                assert!(!part.contains(&b'\n') && !part.contains(&0));
                assert!(part.len() <= bounds.max_line);
            }
        }
        let _ = PolicyRequest::from_attributes(&slots[..parsed.attributes]);
    }
});
