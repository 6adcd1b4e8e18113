//! Where a run's time goes, per op kind: with `DSC_PROFILE=1` in the environment the
//! interpreter times every op it executes (calls excluded: their ops are timed inside),
//! and [`report`] prints the totals. Off, each op costs one relaxed load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// 0: not read yet, 1: off, 2: on.
static STATE: AtomicU8 = AtomicU8::new(0);
static TOTALS: Mutex<Option<HashMap<&'static str, (Duration, u64)>>> = Mutex::new(None);

fn on() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var_os("DSC_PROFILE").is_some_and(|v| v != "0" && !v.is_empty());
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        s => s == 2,
    }
}

/// The start of an op, when profiling.
pub(crate) fn start() -> Option<Instant> {
    on().then(Instant::now)
}

/// Adds the time since `started` to `op`'s total.
pub(crate) fn record(op: &'static str, started: Option<Instant>) {
    if let Some(t) = started {
        let e = t.elapsed();
        let mut g = TOTALS.lock().unwrap_or_else(|p| p.into_inner());
        let entry = g.get_or_insert_with(HashMap::new).entry(op).or_default();
        entry.0 += e;
        entry.1 += 1;
    }
}

/// The totals so far, largest first, as lines `op  seconds  share  calls`; empty when
/// profiling is off. Clears them.
pub fn report() -> String {
    let mut g = TOTALS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(map) = g.take() else { return String::new() };
    let total: f64 = map.values().map(|v| v.0.as_secs_f64()).sum();
    let mut rows: Vec<_> = map.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1 .0));
    let mut out = format!("{:<20} {:>9} {:>6} {:>8}\n", "op", "seconds", "share", "calls");
    for (op, (d, n)) in rows {
        out += &format!("{op:<20} {:>9.3} {:>5.1}% {n:>8}\n", d.as_secs_f64(), 100.0 * d.as_secs_f64() / total.max(1e-12));
    }
    out
}
