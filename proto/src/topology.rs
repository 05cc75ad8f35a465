//! Observed topology, shared by the proxies that count it and the control plane that sums it:
//! the latency buckets of an edge's histogram and the percentile read from them.

/// Upper bounds (milliseconds) of the edge latency buckets; one more bucket holds the rest.
pub const EDGE_LATENCY_BOUNDS_MS: [f64; 14] =
    [1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0];

/// Buckets per histogram: the bounds and +Inf.
pub const EDGE_BUCKETS: usize = EDGE_LATENCY_BOUNDS_MS.len() + 1;

/// The bucket a latency of `ms` falls into.
pub fn bucket_of(ms: f64) -> usize {
    EDGE_LATENCY_BOUNDS_MS.iter().position(|b| ms <= *b).unwrap_or(EDGE_LATENCY_BOUNDS_MS.len())
}

/// The `q`-quantile (0..=1) of a histogram in milliseconds, interpolated linearly inside its
/// bucket (as Prometheus' `histogram_quantile` does); the last bound for the +Inf bucket; 0
/// when empty.
pub fn quantile_ms(buckets: &[u64], q: f64) -> f64 {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut seen = 0u64;
    for (i, n) in buckets.iter().enumerate() {
        if *n > 0 && (seen + n) as f64 >= rank {
            let Some(upper) = EDGE_LATENCY_BOUNDS_MS.get(i) else {
                return EDGE_LATENCY_BOUNDS_MS[EDGE_LATENCY_BOUNDS_MS.len() - 1];
            };
            let lower = if i == 0 { 0.0 } else { EDGE_LATENCY_BOUNDS_MS[i - 1] };
            return lower + (upper - lower) * ((rank - seen as f64) / *n as f64);
        }
        seen += n;
    }
    EDGE_LATENCY_BOUNDS_MS[EDGE_LATENCY_BOUNDS_MS.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        assert_eq!(bucket_of(0.3), 0);
        assert_eq!(bucket_of(1.0), 0);
        assert_eq!(bucket_of(7.0), 3);
        assert_eq!(bucket_of(1e9), EDGE_BUCKETS - 1);
        let mut b = [0u64; EDGE_BUCKETS];
        assert_eq!(quantile_ms(&b, 0.5), 0.0);
        // 100 answers between 5 and 10 ms: the median halfway through that bucket.
        b[3] = 100;
        assert!((quantile_ms(&b, 0.5) - 7.5).abs() < 1e-9);
        assert!((quantile_ms(&b, 0.99) - 9.95).abs() < 1e-9);
        b[EDGE_BUCKETS - 1] = 100;
        assert_eq!(quantile_ms(&b, 0.99), 30000.0, "the +Inf bucket reads as the last bound");
    }
}
