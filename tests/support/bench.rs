//! Small statistics helpers for the bench examples: percentiles and one-line reports.

use std::time::Duration;

/// The `p` quantile (0..=1) of `sorted` (nearest rank). `sorted` must not be empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Prints `name: p50 .., p99 .., min .., max .. (n=..)` in milliseconds.
pub fn report(name: &str, mut samples: Vec<Duration>) {
    if samples.is_empty() {
        println!("{name}: no samples");
        return;
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name}: p50 {:.2} ms, p99 {:.2} ms, min {:.2} ms, max {:.2} ms (n={})",
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
        samples.len()
    );
}

/// The median (nearest rank) of `samples`, in any order; `None` when there are none.
pub fn median(samples: &[Duration]) -> Option<Duration> {
    let mut sorted = samples.to_vec();
    sorted.sort();
    (!sorted.is_empty()).then(|| percentile(&sorted, 0.5))
}

/// The ratio of the medians (nearest rank) of `a` and `b`, in any order; both non-empty.
pub fn p50_ratio(a: &[Duration], b: &[Duration]) -> f64 {
    let p50 = |v: &[Duration]| median(v).unwrap_or_default().as_secs_f64();
    p50(a) / p50(b)
}

/// The `n`th command-line argument split at commas, or `default` split the same way.
pub fn list_arg(n: usize, default: &str) -> Vec<String> {
    std::env::args()
        .nth(n)
        .unwrap_or_else(|| default.into())
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// The `n`th command-line argument parsed, or `default`.
pub fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}
