//! Shared helpers for the engine's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use llorch_engine::{catalog, Engine, EngineConfig, LoadedModel};

/// The default model, fetched by the README's test command (`scripts/test.sh`) before
/// the tests run. A missing model is a failure, not a skip.
pub fn default_model() -> PathBuf {
    catalog::resolve(catalog::DEFAULT_MODEL).expect(
        "the default model must be fetched first: `llorch models fetch` (scripts/test.sh does it)",
    )
}

/// A known model if it has been fetched (only the default one is required).
pub fn optional_model(name: &str) -> Option<PathBuf> {
    catalog::resolve(name).ok()
}

pub fn load(path: &std::path::Path) -> LoadedModel {
    llorch_engine::load(path, &candle_core::Device::Cpu, &mut |_, _| {}).expect("model loads")
}

pub fn engine(path: &std::path::Path, max_batch: usize) -> Engine {
    Engine::start(
        load(path),
        EngineConfig {
            max_batch,
            max_queue: 64,
            context_length: 2048,
            warmup: false,
            ..Default::default()
        },
    )
    .expect("engine starts")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}
