//! Opt-in per-phase timing of the forward pass (`llorch bench --profile`). On the CPU,
//! Candle ops run synchronously, so wall time around each phase is the time of its ops.
//! Off by default; when off, each probe costs one relaxed atomic load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ON: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

pub fn reset() {
    TABLE.lock().unwrap().clear();
}

/// A probe: `let t = profile::start(); ...; profile::stop("phase", t);`
#[inline]
pub fn start() -> Option<Instant> {
    ON.load(Ordering::Relaxed).then(Instant::now)
}

#[inline]
pub fn stop(phase: &'static str, t: Option<Instant>) {
    if let Some(t) = t {
        let mut m = TABLE.lock().unwrap();
        let e = m.entry(phase).or_default();
        e.0 += t.elapsed();
        e.1 += 1;
    }
}

/// (phase, total time, calls), largest first.
pub fn report() -> Vec<(&'static str, Duration, u64)> {
    let mut v: Vec<_> = TABLE
        .lock()
        .unwrap()
        .iter()
        .map(|(k, (d, n))| (*k, *d, *n))
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}
