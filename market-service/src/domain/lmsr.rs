//! The logarithmic market scoring rule (Hanson): cost C(q) = b · ln Σ exp(qᵢ / b), prices are
//! the softmax of q / b and always sum to 1, and the market maker's worst-case loss is b · ln n,
//! which the market's creator funds as a subsidy.
//!
//! The arithmetic runs in `f64` (log-sum-exp, stable for any q), but every amount that moves
//! money is rounded to whole millionths in the market maker's favour: a buyer pays the cost
//! rounded up, a seller receives proceeds rounded down. Events record the rounded amounts, so
//! replay never recomputes them.

use super::money::{Micro, SCALE};

fn lse(q: &[Micro], b: f64) -> f64 {
    let xs: Vec<f64> = q.iter().map(|s| s.as_f64() / b).collect();
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// C(q) in units.
pub fn cost(q: &[Micro], b: Micro) -> f64 {
    let b = b.as_f64();
    b * lse(q, b)
}

/// Current prices (probabilities), summing to 1.
pub fn prices(q: &[Micro], b: Micro) -> Vec<f64> {
    let b = b.as_f64();
    let xs: Vec<f64> = q.iter().map(|s| s.as_f64() / b).collect();
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = xs.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|x| x / z).collect()
}

/// The subsidy that funds the worst case: b · ln n, rounded up.
pub fn subsidy(b: Micro, outcomes: usize) -> Micro {
    Micro((b.as_f64() * (outcomes as f64).ln() * SCALE as f64).ceil() as i64)
}

fn with(q: &[Micro], outcome: usize, delta: Micro) -> Vec<Micro> {
    let mut next = q.to_vec();
    next[outcome] = Micro(next[outcome].0 + delta.0);
    next
}

/// What buying `shares` of `outcome` costs, rounded up.
pub fn buy_cost(q: &[Micro], b: Micro, outcome: usize, shares: Micro) -> Micro {
    let diff = cost(&with(q, outcome, shares), b) - cost(q, b);
    Micro((diff * SCALE as f64).ceil() as i64)
}

/// What selling `shares` of `outcome` pays, rounded down (never negative).
pub fn sell_proceeds(q: &[Micro], b: Micro, outcome: usize, shares: Micro) -> Micro {
    let diff = cost(q, b) - cost(&with(q, outcome, Micro(-shares.0)), b);
    Micro(((diff * SCALE as f64).floor() as i64).max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_start_even_and_move_toward_bought_outcomes() {
        let b = Micro::units(100);
        let q = vec![Micro::ZERO; 4];
        for p in prices(&q, b) {
            assert!((p - 0.25).abs() < 1e-12);
        }
        let q2 = with(&q, 1, Micro::units(50));
        let p = prices(&q2, b);
        assert!(p[1] > 0.25 && (p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn round_trips_never_profit_the_trader() {
        let b = Micro::units(50);
        let q = vec![Micro::units(10), Micro::units(3)];
        for shares in [Micro(1), Micro::units(1), Micro::units(1000)] {
            let paid = buy_cost(&q, b, 0, shares);
            let got = sell_proceeds(&with(&q, 0, shares), b, 0, shares);
            assert!(got <= paid, "{shares}: paid {paid}, got back {got}");
        }
    }

    #[test]
    fn extreme_quantities_stay_finite() {
        let b = Micro(1); // b = 0.000001
        let q = vec![Micro::units(1_000_000), Micro::ZERO];
        assert!(cost(&q, b).is_finite());
        let p = prices(&q, b);
        assert!((p[0] - 1.0).abs() < 1e-9 && p[1] >= 0.0);
        assert_eq!(subsidy(Micro::units(100), 2), Micro((100.0 * 2f64.ln() * 1e6_f64).ceil() as i64));
    }
}
