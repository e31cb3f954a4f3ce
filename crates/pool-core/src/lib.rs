//! pool-managerd's logic: device detection, configuration, the worker registry and its
//! supervision (spawn, readiness, health, restart, circuit breaker, stop), routing of
//! client requests to ready workers, and the manager's HTTP API.

pub mod config;
pub mod devices;
pub mod manager;
pub mod metrics;
pub mod proxy;
pub mod server;

pub use config::PoolConfig;
pub use manager::Manager;
