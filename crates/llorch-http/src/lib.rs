//! The llorch worker: an axum server over one engine. `llorch-cpu`, `llorch-cuda` and
//! `llorch-metal` are each a `main` that calls [`run`] with their backend.

pub mod args;
pub mod error;
pub mod job;
pub mod json;
pub mod metrics;
pub mod routes;
pub mod server;
pub mod state;

pub use args::WorkerArgs;
pub use server::{run, Flavour};
