//! Shared worker state: the lifecycle phase, the engine once loaded, the metrics, and
//! the live jobs that `/cancel` can reach.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use llorch_engine::device::Backend;
use llorch_engine::Engine;

use crate::args::WorkerArgs;
use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Loading = 0,
    Ready = 1,
    Draining = 2,
}

pub struct AppState {
    pub args: WorkerArgs,
    pub backend: Backend,
    phase: AtomicU8,
    pub engine: OnceLock<Engine>,
    pub metrics: Metrics,
    pub jobs: Mutex<HashMap<String, Arc<AtomicBool>>>,
    pub started: Instant,
    /// The address actually bound (port 0 resolves here).
    pub uri: OnceLock<String>,
}

pub type Shared = Arc<AppState>;

impl AppState {
    pub fn new(args: WorkerArgs, backend: Backend) -> Self {
        Self {
            args,
            backend,
            phase: AtomicU8::new(Phase::Loading as u8),
            engine: OnceLock::new(),
            metrics: Metrics::new(),
            jobs: Mutex::new(HashMap::new()),
            started: Instant::now(),
            uri: OnceLock::new(),
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Loading,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::SeqCst);
    }

    /// Names a request may use for this worker's model.
    pub fn model_matches(&self, asked: &str) -> bool {
        let Some(e) = self.engine.get() else {
            return false;
        };
        let file = std::path::Path::new(&e.info.path)
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        asked.is_empty()
            || asked == e.info.id
            || asked == self.args.model
            || asked == file
            || llorch_engine::catalog::find(asked).is_some_and(|m| m.file == file)
    }
}

/// Removes a job from the cancel registry when its request ends, however it ends.
pub struct JobGuard {
    pub state: Shared,
    pub id: String,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.state.jobs.lock().unwrap().remove(&self.id);
    }
}
