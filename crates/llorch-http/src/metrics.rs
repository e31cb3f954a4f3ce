//! The worker's Prometheus metrics (`llorch_*`, names after vLLM's; see
//! `.specs/metrics.md`). Histograms and counters move per request and per token as
//! events flow; gauges are read from the engine at scrape time.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

// vLLM's buckets (mistral.rs copies them): TTFT and ITL need sub-millisecond to seconds.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5,
];
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

pub struct Metrics {
    registry: Registry,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
    pub batch_size: Histogram,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub kv_usage: Gauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub success: IntCounterVec,
    pub failure: IntCounterVec,
    pub model_load_seconds: Gauge,
    pub info: GaugeVec,
    pub http_requests: HistogramVec,
}

fn hist(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid histogram")
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            registry: Registry::new(),
            ttft: hist(
                "llorch_time_to_first_token_seconds",
                "Time from request arrival to its first generated token.",
                TTFT_BUCKETS,
            ),
            itl: hist(
                "llorch_inter_token_latency_seconds",
                "Time between consecutive generated tokens of a request.",
                ITL_BUCKETS,
            ),
            e2e: hist(
                "llorch_e2e_request_latency_seconds",
                "Time from request arrival to its last token.",
                E2E_BUCKETS,
            ),
            queue_time: hist(
                "llorch_request_queue_time_seconds",
                "Time a request waited in the queue before its prefill began.",
                TTFT_BUCKETS,
            ),
            batch_size: hist(
                "llorch_batch_size",
                "Sequences in each engine step (continuous batching).",
                BATCH_BUCKETS,
            ),
            running: IntGauge::new("llorch_requests_running", "Requests in the running batch.")
                .unwrap(),
            waiting: IntGauge::new("llorch_requests_waiting", "Requests waiting in the queue.")
                .unwrap(),
            kv_usage: Gauge::new(
                "llorch_kv_cache_usage_ratio",
                "Share of the KV-cache budget reserved by running requests (0-1).",
            )
            .unwrap(),
            prompt_tokens: IntCounter::new(
                "llorch_prompt_tokens_total",
                "Prompt tokens prefilled.",
            )
            .unwrap(),
            generation_tokens: IntCounter::new(
                "llorch_generation_tokens_total",
                "Tokens generated.",
            )
            .unwrap(),
            success: IntCounterVec::new(
                Opts::new(
                    "llorch_request_success_total",
                    "Requests that finished, by finish reason.",
                ),
                &["finished_reason"],
            )
            .unwrap(),
            failure: IntCounterVec::new(
                Opts::new(
                    "llorch_request_failure_total",
                    "Requests that failed, by reason.",
                ),
                &["reason"],
            )
            .unwrap(),
            model_load_seconds: Gauge::new(
                "llorch_model_load_seconds",
                "Seconds the model took to load and warm up.",
            )
            .unwrap(),
            info: GaugeVec::new(
                Opts::new(
                    "llorch_worker_info",
                    "Constant 1, labelled with what this worker is.",
                ),
                &["worker_id", "backend", "device", "model"],
            )
            .unwrap(),
            http_requests: HistogramVec::new(
                HistogramOpts::new(
                    "llorch_http_request_duration_seconds",
                    "HTTP requests by path and status.",
                )
                .buckets(E2E_BUCKETS.to_vec()),
                &["path", "status"],
            )
            .unwrap(),
        };
        let r = &m.registry;
        r.register(Box::new(m.ttft.clone())).unwrap();
        r.register(Box::new(m.itl.clone())).unwrap();
        r.register(Box::new(m.e2e.clone())).unwrap();
        r.register(Box::new(m.queue_time.clone())).unwrap();
        r.register(Box::new(m.batch_size.clone())).unwrap();
        r.register(Box::new(m.running.clone())).unwrap();
        r.register(Box::new(m.waiting.clone())).unwrap();
        r.register(Box::new(m.kv_usage.clone())).unwrap();
        r.register(Box::new(m.prompt_tokens.clone())).unwrap();
        r.register(Box::new(m.generation_tokens.clone())).unwrap();
        r.register(Box::new(m.success.clone())).unwrap();
        r.register(Box::new(m.failure.clone())).unwrap();
        r.register(Box::new(m.model_load_seconds.clone())).unwrap();
        r.register(Box::new(m.info.clone())).unwrap();
        r.register(Box::new(m.http_requests.clone())).unwrap();
        // Series present from the start, so rates work before the first request.
        for f in ["stop", "length", "eos"] {
            m.success.with_label_values(&[f]);
        }
        for f in [
            "validation",
            "overloaded",
            "cancelled",
            "internal",
            "unauthorized",
            "unavailable",
        ] {
            m.failure.with_label_values(&[f]);
        }
        m
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf-8 metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
