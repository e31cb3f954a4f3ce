//! Start-up order, readiness callback, SIGTERM, device flags: the real llorch-cpu process.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test]
async fn health_is_503_while_loading_then_200_and_callback_has_every_field() {
    let sink = callback_sink(200).await;
    let w = Worker::spawn(&["--callback-url", &sink.url]);
    let c = client();
    let t = Instant::now();
    let mut saw_503 = None;
    loop {
        if let Ok(r) = c.get(w.url("/health")).send().await {
            let s = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            if s == 503 {
                saw_503 = Some(body);
            } else {
                assert_eq!(s, 200);
                assert_eq!(body["status"], "ok");
                break;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let body = saw_503.expect("no 503 seen while the model loaded");
    assert_eq!(
        body,
        serde_json::json!({"error":{"code":503,"message":"Loading model","type":"unavailable_error"}})
    );
    // the callback arrives after readiness
    let t = Instant::now();
    while sink.bodies.lock().unwrap().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no readiness callback"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cb = sink.bodies.lock().unwrap()[0].clone();
    assert_eq!(cb["worker_id"], "test-worker");
    assert_eq!(cb["uri"], format!("http://127.0.0.1:{}", w.port));
    assert_eq!(cb["model_ref"], default_model());
    assert_eq!(cb["backend"], "cpu");
    assert_eq!(cb["device"], "cpu");
    assert_eq!(cb["memory_architecture"], "host");
    assert_eq!(cb["memory_bytes"], 98_362_432);
    assert_eq!(cb["context_length"], 8192);
    assert!(cb["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "text-gen"));
    assert_eq!(cb["pid"], w.child.id());
    assert_eq!(cb["version"], env!("CARGO_PKG_VERSION"));
    // /info agrees
    let info = w.get_json("/info").await;
    assert_eq!(info["backend"], "cpu");
    assert_eq!(info["model"]["architecture"], "llama");
    assert_eq!(info["model"]["quantization"], "Q4_1");
    assert_eq!(info["worker_id"], "test-worker");
}

#[tokio::test]
async fn a_refusing_manager_makes_the_worker_exit_nonzero() {
    let sink = callback_sink(404).await;
    let mut w = Worker::spawn(&["--callback-url", &sink.url]);
    let code = w.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(
        code,
        Some(1),
        "worker must exit 1 when the manager refuses it"
    );
    assert_eq!(sink.bodies.lock().unwrap().len(), 1, "no retry after a 4xx");
}

#[tokio::test]
async fn an_unreachable_manager_makes_the_worker_exit_nonzero_after_its_timeout() {
    let url = format!("http://127.0.0.1:{}/ready", free_port());
    let mut w = Worker::spawn(&["--callback-url", &url, "--callback-timeout-secs", "2"]);
    assert_eq!(w.wait_exit(Duration::from_secs(60)).await, Some(1));
}

#[tokio::test]
async fn sigterm_finishes_the_running_request_then_exits_0() {
    let mut w = Worker::ready(&["--shutdown-grace-secs", "60"]).await;
    let url = w.url("/v1/completions");
    let stream = tokio::spawn(async move {
        sse(
            &url,
            r#"{"prompt":"Once upon a time","max_tokens":120,"stream":true}"#,
        )
        .await
    });
    // wait until it is running
    w.wait_running(
        1,
        Duration::from_secs(30),
        "the request never started running",
    )
    .await;
    w.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // draining: new work is refused with 503 and the JSON envelope
    let (s, v) = post(
        &w.url("/v1/completions"),
        r#"{"prompt":"hi","max_tokens":2}"#,
    )
    .await;
    assert_eq!(s, 503);
    assert_eq!(v["error"]["type"], "unavailable_error");
    let events = stream.await.unwrap();
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let last: serde_json::Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert_eq!(
        last["choices"][0]["finish_reason"], "length",
        "the running request finished"
    );
    let tokens = events
        .iter()
        .filter(|(_, d)| d.contains("\"text\":\"") && !d.contains("\"text\":\"\""))
        .count();
    assert!(tokens > 100, "all tokens arrived: {tokens}");
    assert_eq!(w.wait_exit(Duration::from_secs(30)).await, Some(0));
}

#[test]
fn device_flags_belong_to_their_binary() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llorch-cpu"))
        .args(["--model", "x", "--cuda-device", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_llorch-cpu"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--worker-id",
        "--model",
        "--port",
        "--host",
        "--callback-url",
        "--cuda-device",
        "--metal-device",
        "--ctx-size",
        "--max-batch",
        "--max-queue",
        "--api-key",
        "--threads",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    assert!(help.contains("LLORCH_MODEL"), "env vars are documented");
}

#[tokio::test]
async fn a_missing_model_file_exits_nonzero() {
    let port = free_port().to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_llorch-cpu"))
        .args(["--model", "/no/such/model.gguf", "--port", &port])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/model.gguf"));
}
