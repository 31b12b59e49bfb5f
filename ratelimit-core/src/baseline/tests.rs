use proptest::prelude::*;

use super::*;

const HOUR: u64 = 3_600_000;
/// Noon on day 20000 (2024-10-04).
const T0: u64 = 20_000 * DAY_MS + DAY_MS / 2;

fn at(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms)
}

fn cfg(learn_days: u64, factor: f64, min: u32) -> BaselineConfig {
    BaselineConfig::new(Duration::from_secs(learn_days * 86_400), factor, min, 7).unwrap()
}

#[test]
fn configurations_are_checked_when_built() {
    let week = Duration::from_secs(7 * 86_400);
    assert_eq!(
        BaselineConfig::new(week, 0.5, 10, 7),
        Err(BaselineConfigError::Factor)
    );
    assert_eq!(
        BaselineConfig::new(week, f64::NAN, 10, 7),
        Err(BaselineConfigError::Factor)
    );
    assert_eq!(
        BaselineConfig::new(week, 256.0, 10, 7),
        Err(BaselineConfigError::Factor)
    );
    assert_eq!(
        BaselineConfig::new(week, 5.0, 0, 7),
        Err(BaselineConfigError::Min)
    );
    assert_eq!(
        BaselineConfig::new(week, 5.0, 10, 0),
        Err(BaselineConfigError::HalfLife)
    );
    assert_eq!(
        BaselineConfig::new(Duration::from_secs(3651 * 86_400), 5.0, 10, 7),
        Err(BaselineConfigError::Learn)
    );
    let c = BaselineConfig::new(week, 2.5, 10, 1).unwrap();
    assert_eq!((c.factor_256(), c.factor(), c.decay()), (640, 2.5, 32_768));
    // 2^(-1/7) = 0.905724...
    assert_eq!(cfg(7, 5.0, 10).decay(), 59_358);
    assert_eq!(c.with_factor(3.0).unwrap().factor_256(), 768);
}

#[test]
fn one_day_moves_usual_a_bounded_step() {
    let d = cfg(7, 5.0, 10).decay();
    // From nothing, a day of 100 teaches 2 (the growth step), not 100.
    assert_eq!(step(0, 100, d), 2 * 256);
    // A quiet day only decays.
    assert_eq!(step(1000, 0, d), 1000 * 59_358 / 65_536);
    // A day at the usual level keeps it; one below it decays it.
    assert_eq!(step(4 * 256, 4, d), 4 * 256);
    assert_eq!(step(4 * 256, 1, d), 4 * 256 * 59_358 / 65_536);
    // An outlier day at most doubles the decayed value, plus two messages.
    let decayed = 4 * 256 * 59_358 / 65_536;
    assert_eq!(step(4 * 256, 500, d), 2 * decayed + 512);
}

#[test]
fn a_light_user_is_flagged_at_min_and_a_heavy_one_at_factor_times_usual() {
    let c = cfg(7, 5.0, 10);
    let mut light = BaselineState::new();
    let mut heavy = BaselineState::new();
    for day in 0..30 {
        let noon = T0 + day * DAY_MS;
        light.record(at(noon), 2, &c);
        heavy.record(at(noon), 40, &c);
    }
    let now = at(T0 + 30 * DAY_MS);
    let j = light.judge(now, &c);
    assert_eq!((j.usual, j.threshold, j.flagged), (512, Some(10), false));
    assert_eq!(j.learned_days(), 30);
    assert_eq!(heavy.judge(now, &c).usual, 40 * 256);
    assert_eq!(heavy.judge(now, &c).threshold, Some(200));
    for (state, expect) in [(&mut light, 10), (&mut heavy, 200)] {
        let mut accepted = 0;
        while !state.judge(now, &c).flagged {
            state.record(now, 1, &c);
            accepted += 1;
        }
        assert_eq!(accepted, expect);
        let j = state.judge(now, &c);
        assert_eq!(j.hour, expect);
        // Everything was accepted in the current slot: the flag clears when it leaves
        // the hour, 70 minutes after the slot began.
        let slot_start = now.as_millis() / SLOT_MS * SLOT_MS;
        assert_eq!(j.clears_at, Some(slot_start + 7 * SLOT_MS));
        assert!(!state.judge(at(slot_start + 7 * SLOT_MS), &c).flagged);
        assert!(state.judge(at(slot_start + 7 * SLOT_MS - 1), &c).flagged);
    }
}

#[test]
fn nobody_is_judged_before_learning_enough() {
    let c = cfg(7, 5.0, 10);
    let mut s = BaselineState::new();
    s.record(at(T0), 1, &c);
    for _ in 0..50 {
        s.record(at(T0 + 7 * DAY_MS - 1), 1, &c);
    }
    let j = s.judge(at(T0 + 7 * DAY_MS - 1), &c);
    assert_eq!((j.threshold, j.flagged, j.hour), (None, false, 50));
    let j = s.judge(at(T0 + 7 * DAY_MS), &c);
    assert!(j.flagged, "{j:?}");
}

#[test]
fn clearing_the_hour_drops_the_flag_and_keeps_the_history() {
    let c = cfg(1, 5.0, 3);
    let mut s = BaselineState::new();
    s.record(at(T0), 1, &c);
    let now = at(T0 + 3 * DAY_MS);
    // usual: 1 decayed over two quiet days (209/256), so the threshold is
    // max(3, 5 × 0.82) = 4.
    s.record(now, 3, &c);
    assert_eq!(s.judge(now, &c).threshold, Some(4));
    assert!(!s.judge(now, &c).flagged);
    s.record(now, 1, &c);
    assert!(s.judge(now, &c).flagged);
    let usual = s.judge(now, &c).usual;
    assert!(s.clear_hour());
    let j = s.judge(now, &c);
    assert_eq!((j.flagged, j.hour, j.usual), (false, 0, usual));
    assert!(!s.clear_hour());
}

#[test]
fn months_without_mail_forget_the_user() {
    let c = cfg(7, 5.0, 10);
    let mut s = BaselineState::new();
    for day in 0..10 {
        s.record(at(T0 + day * DAY_MS), 20, &c);
    }
    let mut day = 10;
    loop {
        let j = s.judge(at(T0 + day * DAY_MS), &c);
        if j.threshold.is_none() {
            break;
        }
        assert!(j.usual > 0);
        day += 1;
    }
    // About ten half-lives from 20 messages (5120/256) down to nothing.
    assert!((60..120).contains(&day), "{day}");
    s.roll(at(T0 + day * DAY_MS), &c);
    assert!(s.is_empty());
}

#[test]
fn a_clock_stepping_back_moves_nothing_back() {
    let c = cfg(7, 5.0, 10);
    let mut s = BaselineState::new();
    s.record(at(T0 + DAY_MS), 1, &c);
    let before = s;
    s.record(at(T0), 2, &c);
    assert_eq!((s.slot, s.day), (before.slot, before.day));
    assert_eq!(s.hour(), 3);
}

#[test]
fn the_state_stays_small() {
    assert_eq!(std::mem::size_of::<BaselineState>(), 36);
}

/// An event log: (ms offset from `T0`, messages), times non-decreasing.
fn history() -> impl Strategy<Value = Vec<(u64, u32)>> {
    prop::collection::vec((0..3 * HOUR, 0u32..6), 1..120).prop_map(|steps| {
        let mut t = 0;
        steps
            .into_iter()
            .map(|(dt, n)| {
                t += dt;
                (t, n)
            })
            .collect()
    })
}

/// The model: the hour's volume and the day's busiest hour computed from the whole
/// log, `usual` by closing each day in turn.
fn model(log: &[(u64, u32)], now: u64, c: &BaselineConfig) -> (u32, u32, u64) {
    let slot = |t: u64| t / SLOT_MS;
    let hour_at = |t: u64| -> u32 {
        log.iter()
            .filter(|(e, _)| T0 + e <= t && slot(T0 + e) + 6 >= slot(t))
            .map(|(_, n)| n)
            .sum()
    };
    let day = |t: u64| t / DAY_MS;
    let first_day = day(T0 + log[0].0);
    let (mut usual, mut since) = (0u32, 0u64);
    for d in first_day..=day(now) {
        let events: Vec<u64> = log
            .iter()
            .filter(|&&(e, n)| n > 0 && day(T0 + e) == d && T0 + e <= now)
            .map(|(e, _)| T0 + e)
            .collect();
        if since == 0
            && let Some(&t) = events.first()
        {
            since = t / 1000 * 1000;
        }
        if d == day(now) {
            break;
        }
        let m = events.iter().map(|&t| hour_at(t)).max().unwrap_or(0);
        usual = step(usual, m, c.decay());
        if usual == 0 {
            since = 0;
        }
    }
    (hour_at(now), usual, since)
}

proptest! {
    #[test]
    fn the_state_judges_as_the_model(log in history(), extra in 0..2 * HOUR, factor in 1.0f64..8.0, min in 1u32..12, learn in 0u64..4) {
        let c = BaselineConfig::new(Duration::from_secs(learn * 86_400), factor, min, 2).unwrap();
        let mut s = BaselineState::new();
        for &(t, n) in &log {
            s.record(at(T0 + t), n, &c);
        }
        let now = T0 + log.last().map_or(0, |e| e.0) + extra;
        let (hour, usual, since) = model(&log, now, &c);
        let j = s.judge(at(now), &c);
        prop_assert_eq!(j.hour, hour);
        prop_assert_eq!(j.usual, usual);
        let learned = since > 0 && now - since >= learn * DAY_MS;
        let threshold = (u64::from(c.factor_256()) * u64::from(usual) / 65_536).max(u64::from(min));
        prop_assert_eq!(j.threshold.map(u64::from), learned.then_some(threshold));
        // Exact: flagged iff the hour with one more message exceeds the threshold.
        prop_assert_eq!(j.flagged, learned && u64::from(hour) + 1 > threshold);
    }

    #[test]
    fn usual_never_exceeds_the_busiest_hour_ever_seen(log in history()) {
        let c = cfg(0, 5.0, 10);
        let mut s = BaselineState::new();
        let mut busiest = 0;
        for &(t, n) in &log {
            s.record(at(T0 + t), n, &c);
            busiest = busiest.max(s.hour());
            prop_assert!(u64::from(s.usual) <= u64::from(busiest) * SCALE);
        }
    }

    #[test]
    fn usual_is_monotone_in_the_evidence(log in history(), more in prop::collection::vec(0u32..4, 120), extra in 0..3 * DAY_MS) {
        let c = cfg(0, 5.0, 10);
        let (mut a, mut b) = (BaselineState::new(), BaselineState::new());
        for (i, &(t, n)) in log.iter().enumerate() {
            a.record(at(T0 + t), n, &c);
            b.record(at(T0 + t), n + more[i], &c);
            let now = at(T0 + t + extra);
            prop_assert!(b.judge(now, &c).usual >= a.judge(now, &c).usual);
        }
    }

    #[test]
    fn one_outlier_day_at_most_doubles_usual(days in prop::collection::vec(0u32..30, 1..40), outlier in 0u32..60_000) {
        let c = cfg(0, 5.0, 10);
        let mut s = BaselineState::new();
        for (d, &n) in days.iter().enumerate() {
            s.record(at(T0 + d as u64 * DAY_MS), n, &c);
        }
        let day = days.len() as u64;
        let before = s.judge(at(T0 + day * DAY_MS), &c).usual;
        s.record(at(T0 + day * DAY_MS), outlier, &c);
        let after = s.judge(at(T0 + (day + 1) * DAY_MS), &c).usual;
        prop_assert!(u64::from(after) <= 2 * u64::from(before) + GROWTH_ADD, "{before} -> {after}");
    }

    #[test]
    fn rolling_composes(log in history(), t1 in 0..5 * DAY_MS, t2 in 0..5 * DAY_MS) {
        let c = cfg(7, 5.0, 10);
        let mut s = BaselineState::new();
        for &(t, n) in &log {
            s.record(at(T0 + t), n, &c);
        }
        let base = T0 + log.last().map_or(0, |e| e.0);
        let (t1, t2) = (base + t1.min(t2), base + t1.max(t2));
        let mut twice = s;
        twice.roll(at(t1), &c);
        twice.roll(at(t2), &c);
        let mut once = s;
        once.roll(at(t2), &c);
        prop_assert_eq!(twice, once);
    }
}
