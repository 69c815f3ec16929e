//! What the data-binary benchmarks report over their rounds.

/// The middle value of `v` (the upper of the two middle ones for an even count), `v` non-empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
