//! The algorithm's unit tests: each rule of the sliding window and the token
//! bucket, on one `KeyState`.

use super::*;
use crate::quota::Unit;

const T0: u64 = 1_700_000_000_000; // a multiple of 60 s

fn at(ms: u64) -> Timestamp {
    Timestamp::from_millis(T0 + ms)
}

fn acquire(s: &mut KeyState, limits: &[Limit], cost: u64, t: u64) -> Decision {
    s.apply(limits, Cost::units(cost), at(t), Mode::Acquire)
}

#[test]
fn window_admits_exactly_the_count_then_refuses() {
    let l = ["3/1m".parse::<Limit>().unwrap()];
    let mut s = KeyState::new();
    for i in 0..3 {
        let d = acquire(&mut s, &l, 1, i * 1000);
        assert!(d.is_allowed(), "event {i}");
        assert_eq!(d.statuses()[0].remaining, 2 - i);
    }
    let d = acquire(&mut s, &l, 1, 3000);
    let denial = d.denial().unwrap();
    assert_eq!(denial.limit, 0);
    // Sub-windows are 1 s; the first event (sub-window 0) leaves the counted span
    // when sub-window 61 begins.
    assert_eq!(
        denial.retry_after,
        Some(Duration::from_millis(61_000 - 3_000))
    );
    assert!(acquire(&mut s, &l, 1, 60_999).denial().is_some());
    assert!(acquire(&mut s, &l, 1, 61_000).is_allowed());
}

#[test]
fn cost_larger_than_the_limit_is_never_admitted() {
    let l = ["3/1m".parse::<Limit>().unwrap()];
    let mut s = KeyState::new();
    let d = acquire(&mut s, &l, 4, 0);
    assert_eq!(d.denial().unwrap().retry_after, None);
    assert!(s.counters.is_empty());
}

#[test]
fn refused_events_record_nothing_and_peek_records_nothing() {
    let l = ["2/1m".parse::<Limit>().unwrap()];
    let mut s = KeyState::new();
    assert!(s.apply(&l, Cost::units(2), at(0), Mode::Peek).is_allowed());
    assert!(s.counters.is_empty());
    let _ = acquire(&mut s, &l, 2, 0);
    let before = s.clone();
    assert!(acquire(&mut s, &l, 1, 10).denial().is_some());
    assert_eq!(s, before);
}

#[test]
fn all_or_nothing_across_limits() {
    let l = [
        "10/1m".parse::<Limit>().unwrap(),
        "2/1h".parse::<Limit>().unwrap(),
    ];
    let mut s = KeyState::new();
    assert!(acquire(&mut s, &l, 1, 0).is_allowed());
    assert!(acquire(&mut s, &l, 1, 0).is_allowed());
    let d = acquire(&mut s, &l, 1, 0);
    assert_eq!(d.denial().unwrap().limit, 1);
    // The refusal by the hourly limit did not charge the per-minute one.
    assert_eq!(s.used(&l[0], at(0)), 2);
}

#[test]
fn limits_sharing_a_counter_are_charged_once() {
    let l = [
        "10/1h".parse::<Limit>().unwrap(),
        "20/1h".parse::<Limit>().unwrap(),
    ];
    let mut s = KeyState::new();
    let _ = acquire(&mut s, &l, 3, 0);
    assert_eq!(s.used(&l[0], at(0)), 3);
    assert_eq!(s.used(&l[1], at(0)), 3);
}

#[test]
fn units_are_counted_separately() {
    let msgs = "5/1h".parse::<Limit>().unwrap();
    let rcpts = msgs.with_unit(Unit::Recipients);
    let l = [msgs, rcpts];
    let mut s = KeyState::new();
    let d = s.apply(&l, Cost::message(4, 100), at(0), Mode::Acquire);
    assert!(d.is_allowed());
    assert_eq!(s.used(&msgs, at(0)), 1);
    assert_eq!(s.used(&rcpts, at(0)), 4);
    let d = s.apply(&l, Cost::message(2, 100), at(0), Mode::Acquire);
    assert_eq!(d.denial().unwrap().limit, 1);
}

#[test]
fn a_clock_stepping_back_loses_nothing() {
    let l = ["2/1m".parse::<Limit>().unwrap()];
    let mut s = KeyState::new();
    let _ = acquire(&mut s, &l, 1, 30_000);
    // The wall clock steps back 20 s: the event is still counted.
    let _ = acquire(&mut s, &l, 1, 10_000);
    assert!(acquire(&mut s, &l, 1, 10_000).denial().is_some());
    assert_eq!(s.used(&l[0], at(10_000)), 2);
}

#[test]
fn state_goes_idle_after_the_window() {
    let l = ["2/1m".parse::<Limit>().unwrap()];
    let mut s = KeyState::new();
    let _ = acquire(&mut s, &l, 1, 0);
    assert!(!s.is_idle(at(60_999)));
    assert!(s.is_idle(at(61_000)));
    assert_eq!(s.used(&l[0], at(61_000)), 0);
}

#[test]
fn bucket_retry_after_is_exact() {
    let l = [Limit::token_bucket(10, Duration::from_secs(60), 3).unwrap()];
    let mut s = KeyState::new();
    for _ in 0..3 {
        assert!(acquire(&mut s, &l, 1, 0).is_allowed());
    }
    let d = acquire(&mut s, &l, 1, 0);
    // One unit drains every 6 s.
    assert_eq!(
        d.denial().unwrap().retry_after,
        Some(Duration::from_secs(6))
    );
    assert!(acquire(&mut s, &l, 1, 5_999).denial().is_some());
    assert!(acquire(&mut s, &l, 1, 6_000).is_allowed());
    assert!(s.is_idle(at(6_000 + 18_000)));
    assert!(!s.is_idle(at(6_000 + 17_999)));
}

#[test]
fn moving_to_a_tier_with_a_higher_count_keeps_usage() {
    let small = ["10/1h".parse::<Limit>().unwrap()];
    let big = ["100/1h".parse::<Limit>().unwrap()];
    let mut s = KeyState::new();
    let _ = acquire(&mut s, &small, 8, 0);
    let d = acquire(&mut s, &big, 1, 1000);
    assert_eq!(d.statuses()[0].used, 8);
    assert_eq!(d.statuses()[0].remaining, 91);
    let back = acquire(&mut s, &small, 2, 2000);
    assert!(back.denial().is_some());
}

#[test]
fn a_slot_list_that_spilled_in_a_busy_spell_returns_its_heap_block_when_quiet() {
    // 1 s sub-windows: forty busy seconds spill the list (4 slots inline).
    let l = ["1000/1m".parse::<Limit>().unwrap()];
    let mut s = KeyState::new();
    for i in 0..40 {
        assert!(acquire(&mut s, &l, 1, i * 1000).is_allowed());
    }
    let spilled = |s: &KeyState| match s.counters.first().map(|c| &c.data) {
        Some(CounterData::Window(slots)) => (slots.len(), slots.spilled()),
        _ => panic!("no window counter"),
    };
    assert_eq!(spilled(&s), (40, true));
    // At 99 s all but the last busy second have left the window (the key is still
    // live until 100 s): two slots, inline again.
    assert!(acquire(&mut s, &l, 1, 99_000).is_allowed());
    assert_eq!(spilled(&s), (2, false));
}
