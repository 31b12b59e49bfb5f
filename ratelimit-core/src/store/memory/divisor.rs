//! Exact division by a sub-window length with a multiply and a shift: the
//! packed form needs sub-window numbers on every decision (see [`super::packed`]).

/// Exact `n / d` by a multiplication for the `n` a packed entry holds (below
/// 2^56: `idle_at`, and the times decided at): sub-window numbers are needed
/// on every decision, and a 64-bit division costs several times a multiply.
///
/// With `l = ceil(log2 d)` and `m = ceil(2^(56 + l) / d)` (at most 2^57),
/// `floor(n / d) = floor(m * n / 2^(56 + l))` for every `n < 2^56`: the error
/// `m / 2^(56 + l) - 1 / d` is below `1 / (d * 2^56)`, too little to carry a
/// quotient over the next integer (Granlund and Montgomery, 1994).
#[derive(Debug, Clone, Copy)]
pub(super) struct Divisor {
    /// The divisor.
    pub(super) d: u64,
    m: u64,
    shift: u32,
}

impl Divisor {
    const BITS: u32 = 56;

    /// Division by `d` (at least 1).
    pub(super) fn new(d: u64) -> Divisor {
        let d = d.max(1);
        let l = 64 - (d - 1).leading_zeros();
        let shift = Divisor::BITS + l;
        let m = (1u128 << shift).div_ceil(u128::from(d));
        Divisor {
            d,
            m: m as u64,
            shift,
        }
    }

    #[inline]
    pub(super) fn div(self, n: u64) -> u64 {
        if n >> Divisor::BITS == 0 {
            ((u128::from(self.m) * u128::from(n)) >> self.shift) as u64
        } else {
            n / self.d
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The multiply-and-shift division is exact below 2^56, for any divisor.
        #[test]
        fn divisor_divides_exactly(
            d in prop_oneof![1u64..=130_000, any::<u64>(), (0u32..64).prop_map(|k| 1u64 << k)],
            n in prop_oneof![any::<u64>(), 0u64..(1 << 56), Just((1u64 << 56) - 1)],
        ) {
            let div = Divisor::new(d);
            let d = d.max(1);
            prop_assert_eq!(div.div(n), n / d);
            // Around multiples of d, where a quotient would carry over first.
            let q = n / d;
            for m in [q.saturating_mul(d), q.saturating_mul(d).saturating_sub(1)] {
                prop_assert_eq!(div.div(m), m / d);
            }
        }
    }
}
