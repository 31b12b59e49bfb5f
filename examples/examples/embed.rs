//! Embedding the limiter in other mail tooling: a few lines.
//!
//! Run with `cargo run -p ratelimit-examples --example embed`.

use ratelimit_core::{Cost, Limiter, MemoryStore, SystemClock, Tier, TierMap};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Everyone may send 5 messages per hour; the "bulk" tier 1000 per hour and
    // 20,000 recipients per day.
    let mut tiers = TierMap::new(Tier::new("default", ["5/1h".parse()?])?);
    tiers.add_tier(Tier::new(
        "bulk",
        [
            "1000/1h".parse()?,
            "20000/1d"
                .parse::<ratelimit_core::Limit>()?
                .with_unit(ratelimit_core::Unit::Recipients),
        ],
    )?)?;
    tiers.assign("newsletter@example.com", "bulk")?;

    let limiter = Limiter::new(MemoryStore::new(), tiers, SystemClock);

    for user in ["alice@example.com", "newsletter@example.com"] {
        for n in 1..=7 {
            let d = limiter.acquire(user, Cost::message(3, 2_000))?;
            match d.denial() {
                None => println!("{user}: message {n} accepted, {} left", d.remaining()),
                Some(denial) => println!(
                    "{user}: message {n} refused by limit #{} of tier {}; retry in {:?}",
                    denial.limit,
                    limiter.tier_of(user).name(),
                    denial.retry_after.unwrap_or_default()
                ),
            }
        }
    }
    Ok(())
}
