//! The manager's Prometheus metrics (`pool_mgr_*`, `.specs/metrics.md`).

use prometheus::{Encoder, GaugeVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

pub struct PoolMetrics {
    registry: Registry,
    pub workers: GaugeVec,
    pub worker_starts: IntCounterVec,
    pub worker_restarts: IntCounter,
    pub worker_stops: IntCounterVec,
    pub requests_routed: IntCounterVec,
    pub device_memory: GaugeVec,
}

impl PoolMetrics {
    pub fn new() -> Self {
        let m = Self {
            registry: Registry::new(),
            workers: GaugeVec::new(Opts::new("pool_mgr_workers", "Workers by status."), &["status"]).unwrap(),
            worker_starts: IntCounterVec::new(
                Opts::new("pool_mgr_worker_starts_total", "Worker starts by outcome (ready, timeout, exited, spawn_error)."),
                &["outcome"],
            )
            .unwrap(),
            worker_restarts: IntCounter::new("pool_mgr_worker_restarts_total", "Workers restarted after a crash or failed health checks.")
                .unwrap(),
            worker_stops: IntCounterVec::new(
                Opts::new("pool_mgr_worker_stops_total", "Workers stopped, by reason (requested, shutdown, circuit_open, start_timeout)."),
                &["reason"],
            )
            .unwrap(),
            requests_routed: IntCounterVec::new(
                Opts::new("pool_mgr_requests_routed_total", "Requests routed to workers, by model and HTTP status."),
                &["model", "status"],
            )
            .unwrap(),
            device_memory: GaugeVec::new(
                Opts::new("pool_mgr_device_memory_bytes", "Device memory found at start-up; kind is total or free."),
                &["device", "kind"],
            )
            .unwrap(),
        };
        for c in [
            Box::new(m.workers.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.worker_starts.clone()),
            Box::new(m.worker_restarts.clone()),
            Box::new(m.worker_stops.clone()),
            Box::new(m.requests_routed.clone()),
            Box::new(m.device_memory.clone()),
        ] {
            m.registry.register(c).unwrap();
        }
        for s in ["starting", "ready", "draining", "stopped", "failed"] {
            m.workers.with_label_values(&[s]).set(0.0);
        }
        m
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    }
}

impl Default for PoolMetrics {
    fn default() -> Self {
        Self::new()
    }
}
