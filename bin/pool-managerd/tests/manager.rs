//! pool-managerd as a real process: it spawns real llorch-cpu workers, routes to them,
//! restarts them after SIGKILL, opens its circuit breaker on a crashing binary, and
//! leaves no worker behind on SIGTERM or SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_pool-managerd"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

struct Mgr {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Mgr {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts pool-managerd with a config whose [[pools]] come from `pools`.
fn start(pools: &str, worker_dir: &Path) -> Mgr {
    assert!(
        worker_dir.join("llorch-cpu").exists(),
        "{}/llorch-cpu is missing: build the workspace first (scripts/test.sh does)",
        worker_dir.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = format!(
        "pool_id = \"test\"\nworker_bin_dir = \"{}\"\n[timeouts]\nstart_secs = 60\nhealth_interval_secs = 1\nstop_grace_secs = 5\n[restart]\nmax_restarts = 3\nwindow_secs = 60\nbackoff_initial_ms = 100\nbackoff_max_ms = 400\n{pools}",
        worker_dir.display()
    );
    let cfg_path = dir.path().join("pool.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pool-managerd"))
        .args([
            "--config",
            cfg_path.to_str().unwrap(),
            "--bind",
            &format!("127.0.0.1:{port}"),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Mgr {
        child,
        base: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    }
}

const POOL: &str = "[[pools]]\nmodel = \"smollm2-135m-instruct\"\ndevice = \"cpu\"\nreplicas = 1\nthreads = 1\nctx_size = 2048\n";

async fn state(m: &Mgr) -> serde_json::Value {
    for _ in 0..200 {
        if let Ok(r) = client().get(format!("{}/v2/state", m.base)).send().await {
            return r.json().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("manager not answering")
}

/// Waits until the first worker has `status` (and, if given, a pid different from `not_pid`).
async fn wait_worker(
    m: &Mgr,
    status: &str,
    not_pid: Option<u64>,
    limit: Duration,
) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let s = state(m).await;
        if let Some(w) = s["workers"].get(0) {
            if w["status"] == status && (not_pid.is_none() || w["pid"].as_u64() != not_pid) {
                return w.clone();
            }
        }
        assert!(t.elapsed() < limit, "worker never became {status}: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn alive(pid: u64) -> bool {
    // a zombie is dead for our purpose
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

async fn completion(m: &Mgr) -> (u16, String) {
    let r = client()
        .post(format!("{}/v1/completions", m.base))
        .body(r#"{"model":"smollm2-135m-instruct","prompt":"The capital of France is","max_tokens":8,"stream":true}"#)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn spawns_routes_restarts_and_stops_cleanly() {
    let m = start(POOL, &bin_dir());
    let w = wait_worker(&m, "ready", None, Duration::from_secs(60)).await;
    let pid = w["pid"].as_u64().unwrap();
    assert!(alive(pid));
    let s = state(&m).await;
    assert_eq!(s["pool_id"], "test");
    assert!(s["devices"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["kind"] == "cpu"));
    // routed, streamed
    let (st, body) = completion(&m).await;
    assert_eq!(st, 200, "{body}");
    assert!(
        body.matches("data: ").count() >= 9 && body.trim_end().ends_with("data: [DONE]"),
        "{body}"
    );
    let models: serde_json::Value = client()
        .get(format!("{}/v1/models", m.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
    // an unknown model is 404, naming it
    let r = client()
        .post(format!("{}/v1/completions", m.base))
        .body(r#"{"model":"llama-9000","prompt":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("llama-9000"));
    // a fake callback for a worker the manager never spawned
    let r = client()
        .post(format!("{}/v2/internal/workers/ready", m.base))
        .body(r#"{"worker_id":"intruder","uri":"http://127.0.0.1:1","model_ref":"x","backend":"cpu","device":"cpu","memory_bytes":1,"memory_architecture":"host","context_length":1,"capabilities":[],"pid":1,"version":"0"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], 404);

    // kill -9 the worker mid-stream: the client gets a clean error, the manager restarts it
    let url = format!("{}/v1/completions", m.base);
    let stream = tokio::spawn(async move {
        let r = client()
            .post(url)
            .body(r#"{"prompt":"Once upon a time","max_tokens":1500,"stream":true}"#)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let (st, body) = stream.await.unwrap();
    assert_eq!(st, 200);
    assert!(
        body.contains("\"error\""),
        "the stream must end with an error event: {}",
        &body[body.len().saturating_sub(300)..]
    );
    let w2 = wait_worker(&m, "ready", Some(pid), Duration::from_secs(60)).await;
    assert!(w2["restarts"].as_u64().unwrap() >= 1);
    assert!(!alive(pid));
    let (st, _) = completion(&m).await;
    assert_eq!(st, 200, "a later request goes to the restarted worker");
    let metrics = client()
        .get(format!("{}/metrics", m.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pool_mgr_worker_restarts_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("pool_mgr_workers{status=\"ready\"} 1"));
    assert!(metrics.contains(
        "pool_mgr_requests_routed_total{model=\"smollm2-135m-instruct\",status=\"200\"} 2"
    ));

    // SIGTERM: every worker stops, the manager exits 0
    let pid2 = w2["pid"].as_u64().unwrap();
    let mut m = m;
    unsafe { libc::kill(m.child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let code = loop {
        if let Some(s) = m.child.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "manager did not exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, Some(0));
    assert!(!alive(pid2), "worker {pid2} survived the manager's SIGTERM");
}

#[tokio::test]
async fn sigkill_of_the_manager_leaves_no_worker() {
    let mut m = start(POOL, &bin_dir());
    let w = wait_worker(&m, "ready", None, Duration::from_secs(60)).await;
    let pid = w["pid"].as_u64().unwrap();
    m.child.kill().unwrap(); // SIGKILL
    m.child.wait().unwrap();
    let t = Instant::now();
    while alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "worker {pid} outlived a SIGKILLed manager"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_crashing_worker_binary_opens_the_circuit() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("llorch-cpu");
    std::fs::write(&fake, "#!/bin/sh\necho 'simulated crash' >&2\nexit 3\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let m = start(POOL, dir.path());
    let w = wait_worker(&m, "failed", None, Duration::from_secs(30)).await;
    assert!(
        w["last_error"].as_str().unwrap().contains("circuit open"),
        "{w}"
    );
    assert_eq!(w["restarts"], 3);
    // no ready worker: 503 naming the model
    let r = client()
        .post(format!("{}/v1/chat/completions", m.base))
        .body(r#"{"model":"smollm2-135m-instruct","messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("smollm2-135m-instruct"),
        "{v}"
    );
    let metrics = client()
        .get(format!("{}/metrics", m.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pool_mgr_worker_stops_total{reason=\"circuit_open\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("pool_mgr_workers{status=\"failed\"} 1"));
}

#[tokio::test]
async fn bad_config_names_the_key_and_exits_nonzero() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pool.toml");
    std::fs::write(&p, "[[pools]]\nmodel = \"x\"\ndevice = \"tpu:0\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pool-managerd"))
        .args(["--config", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3") && err.contains("device"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_pool-managerd"))
        .arg("devices")
        .output()
        .unwrap();
    let devs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(devs.as_array().unwrap().iter().any(|d| d["kind"] == "cpu"));
}
