//! Test harness: starts the real `llorch-cpu` binary on a free loopback port, with a
//! readiness-callback receiver, and talks HTTP to it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn default_model() -> String {
    let dir = std::env::var("LLORCH_MODELS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/llorch/models")
        });
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run `llorch models fetch` first (scripts/test.sh does)",
        p.display()
    );
    p.display().to_string()
}

pub struct Worker {
    pub child: Child,
    pub base: String,
    pub port: u16,
}

impl Worker {
    /// Starts llorch-cpu with extra flags; does not wait for readiness.
    pub fn spawn(extra: &[&str]) -> Worker {
        let port = free_port();
        let model = default_model();
        let mut args = vec!["--model", model.as_str(), "--port"];
        let port_s = port.to_string();
        args.push(&port_s);
        args.extend_from_slice(&["--threads", "1", "--worker-id", "test-worker"]);
        args.extend_from_slice(extra);
        let child = Command::new(env!("CARGO_BIN_EXE_llorch-cpu"))
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn llorch-cpu");
        Worker {
            child,
            base: format!("http://127.0.0.1:{port}"),
            port,
        }
    }

    /// Starts a worker and waits until /health is 200.
    pub async fn ready(extra: &[&str]) -> Worker {
        let w = Worker::spawn(extra);
        w.wait_ready().await;
        w
    }

    pub async fn wait_ready(&self) {
        let c = client();
        let t = Instant::now();
        loop {
            if let Ok(r) = c.get(format!("{}/health", self.base)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "worker not ready within 60s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `/health` reports `n` running requests; panics with `why` after `limit`.
    pub async fn wait_running(&self, n: u64, limit: Duration, why: &str) {
        let t = Instant::now();
        loop {
            let h = self.get_json("/health").await;
            if h["running"] == n {
                return;
            }
            assert!(
                t.elapsed() < limit,
                "{why}: running is {} after {limit:?}",
                h["running"]
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET `path` and parse the body as JSON (whatever the status).
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        client()
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the process to exit; its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

pub async fn post(url: &str, body: &str) -> (u16, serde_json::Value) {
    let r = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({s}): {text}"));
    (s, v)
}

/// Reads an SSE response fully; returns (event name, data) pairs.
pub async fn sse(url: &str, body: &str) -> Vec<(String, String)> {
    let r = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "stream status");
    let text = r.text().await.unwrap();
    parse_sse(&text)
}

pub fn parse_sse(text: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    for block in text.split("\n\n") {
        let mut ev = String::from("message");
        let mut data = String::new();
        for line in block.lines() {
            if let Some(e) = line.strip_prefix("event:") {
                ev = e.trim().to_string();
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.strip_prefix(' ').unwrap_or(d));
            }
        }
        if !data.is_empty() {
            out.push((ev, data));
        }
    }
    out
}

pub async fn metrics(w: &Worker) -> String {
    client()
        .get(w.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one series in Prometheus text, 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A readiness-callback receiver: a real HTTP server on loopback recording bodies.
pub struct CallbackSink {
    pub url: String,
    pub bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

pub async fn callback_sink(status: u16) -> CallbackSink {
    use axum::routing::post;
    let bodies = Arc::new(Mutex::new(vec![]));
    let b2 = bodies.clone();
    let app = axum::Router::new().route(
        "/ready",
        post(move |body: axum::Json<serde_json::Value>| {
            let b = b2.clone();
            async move {
                b.lock().unwrap().push(body.0);
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ready", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    CallbackSink { url, bodies }
}
