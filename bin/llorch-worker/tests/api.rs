//! The HTTP API on the real worker: OpenAI completions and chat (streaming and not),
//! /execute events, /cancel, tokenize, disconnects, the queue, metrics.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;

const CHAT: &str = r#"{"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"What is the capital of France?"}],"max_tokens":40,"temperature":0}"#;

fn with_stream(body: &str) -> String {
    format!(
        "{},\"stream\":true,\"stream_options\":{{\"include_usage\":true}}}}",
        &body[..body.len() - 1]
    )
}

#[tokio::test]
async fn completions_and_chat_stream_the_same_text_as_non_streaming() {
    let w = Worker::ready(&[]).await;
    // chat
    let (s, v) = post(&w.url("/v1/chat/completions"), CHAT).await;
    assert_eq!(s, 200, "{v}");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["object"], "chat.completion");
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"],
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    let ev = sse(&w.url("/v1/chat/completions"), &with_stream(CHAT)).await;
    assert_eq!(ev.last().unwrap().1, "[DONE]");
    let chunks: Vec<serde_json::Value> = ev[..ev.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|ch| ch["delta"]["content"].as_str())
                .map(str::to_string)
        })
        .collect();
    assert_eq!(streamed, text);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"], v["usage"], "include_usage chunk");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    // completions
    let body =
        r#"{"prompt":"Once upon a time, there was a little girl named Lily. She","max_tokens":24}"#;
    let (s, v) = post(&w.url("/v1/completions"), body).await;
    assert_eq!(s, 200);
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 24);
    let ev = sse(&w.url("/v1/completions"), &with_stream(body)).await;
    let streamed: String = ev[..ev.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str::<serde_json::Value>(d).unwrap())
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|ch| ch["text"].as_str())
                .map(str::to_string)
        })
        .collect();
    assert_eq!(streamed, text);
    // prompt as token ids gives the same
    let ids: serde_json::Value = post(
        &w.url("/tokenize"),
        r#"{"content":"Once upon a time, there was a little girl named Lily. She"}"#,
    )
    .await
    .1;
    let (_, v2) = post(
        &w.url("/v1/completions"),
        &format!(r#"{{"prompt":{},"max_tokens":24}}"#, ids["tokens"]),
    )
    .await;
    assert_eq!(v2["choices"][0]["text"], text.as_str());
    let (_, d) = post(
        &w.url("/detokenize"),
        &format!(r#"{{"tokens":{}}}"#, ids["tokens"]),
    )
    .await;
    assert_eq!(
        d["content"],
        "Once upon a time, there was a little girl named Lily. She"
    );
    // /v1/models lists the model, and its id is accepted as `model`
    let m = w.get_json("/v1/models").await;
    let id = m["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(id, "SmolLM2-135M-Instruct.Q4_1");
    let (s, _) = post(
        &w.url("/v1/completions"),
        &format!(r#"{{"model":"{id}","prompt":"Hi","max_tokens":2}}"#),
    )
    .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn execute_streams_typed_events_in_order_and_stop_sequences_end_it() {
    let w = Worker::ready(&[]).await;
    let ev = sse(
        &w.url("/execute"),
        r#"{"job_id":"j1","prompt":"1, 2, 3, 4, 5,","max_tokens":30,"stop":[" 8"]}"#,
    )
    .await;
    let names: Vec<&str> = ev.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names[0], "started");
    assert_eq!(&names[names.len() - 2..], ["metrics", "end"]);
    assert!(
        names[1..names.len() - 2].iter().all(|n| *n == "token") && names.len() > 4,
        "{names:?}"
    );
    let started: serde_json::Value = serde_json::from_str(&ev[0].1).unwrap();
    assert_eq!(started["job_id"], "j1");
    let text: String = ev
        .iter()
        .filter(|(e, _)| e == "token")
        .enumerate()
        .map(|(k, (_, d))| {
            let v: serde_json::Value = serde_json::from_str(d).unwrap();
            assert_eq!(v["i"], k);
            v["t"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(text.contains('7') && !text.contains('8'), "{text:?}");
    let end: serde_json::Value = serde_json::from_str(&ev.last().unwrap().1).unwrap();
    assert_eq!(end["stop_reason"], "STOP_SEQUENCE");
    assert_eq!(end["stop_sequence_matched"], " 8");
    assert!(end["tokens_out"].as_u64().unwrap() >= 3);
    assert!(end["decode_time_ms"].is_u64());
}

#[tokio::test]
async fn cancel_ends_the_stream_with_cancelled_and_is_idempotent() {
    let w = Worker::ready(&[]).await;
    let r = client()
        .post(w.url("/execute"))
        .body(r#"{"job_id":"long","prompt":"Once upon a time","max_tokens":2000}"#)
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("event: token") {
        seen.push_str(&String::from_utf8_lossy(
            &body.next().await.unwrap().unwrap(),
        ));
    }
    for _ in 0..2 {
        let r = client()
            .post(w.url("/cancel"))
            .body(r#"{"job_id":"long"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    while let Some(chunk) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let ev = parse_sse(&seen);
    let (name, data) = ev.last().unwrap();
    assert_eq!(name, "error");
    let v: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(v["code"], "CANCELLED");
    assert!(
        ev.iter().filter(|(e, _)| e == "token").count() < 1000,
        "stopped early"
    );
    // after the job is gone, cancel still answers 202
    let r = client()
        .post(w.url("/cancel"))
        .body(r#"{"job_id":"long"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

#[tokio::test]
async fn a_client_that_disconnects_frees_the_engine() {
    let w = Worker::ready(&["--max-batch", "1"]).await;
    for stream in [true, false] {
        let before = metric(
            &metrics(&w).await,
            "llorch_request_failure_total{reason=\"cancelled\"}",
        );
        let body =
            format!(r#"{{"prompt":"Once upon a time","max_tokens":4000,"stream":{stream}}}"#);
        let url = w.url("/v1/completions");
        // keep reading the response, so the only disconnect is the abort below
        let req = tokio::spawn(async move {
            let r = client().post(url).body(body).send().await?;
            r.bytes().await
        });
        // until it runs
        w.wait_running(
            1,
            Duration::from_secs(30),
            "the request never started running",
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        req.abort(); // drops the connection
        w.wait_running(
            0,
            Duration::from_secs(5),
            "the engine kept generating for a gone client",
        )
        .await;
        let after = metric(
            &metrics(&w).await,
            "llorch_request_failure_total{reason=\"cancelled\"}",
        );
        assert_eq!(after, before + 1.0, "stream={stream}");
        // the next request starts at once: the batch of 1 is free
        let (s, _) = post(
            &w.url("/v1/completions"),
            r#"{"prompt":"Hi","max_tokens":2}"#,
        )
        .await;
        assert_eq!(s, 200);
    }
}

#[tokio::test]
async fn a_full_queue_answers_429_and_every_accepted_request_completes() {
    let w = Worker::ready(&["--max-batch", "1", "--max-queue", "2"]).await;
    let mut tasks = vec![];
    for _ in 0..10 {
        let url = w.url("/v1/completions");
        tasks.push(tokio::spawn(async move {
            let r = client()
                .post(url)
                .body(r#"{"prompt":"Count: 1, 2,","max_tokens":48}"#)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let v: serde_json::Value = r.json().await.unwrap();
            (status, retry, v)
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        let (s, retry, v) = t.await.unwrap();
        match s {
            200 => {
                assert_eq!(v["usage"]["completion_tokens"], 48);
                ok += 1;
            }
            429 => {
                assert_eq!(v["error"]["type"], "overloaded_error");
                assert_eq!(v["error"]["code"], 429);
                assert!(retry.is_some(), "Retry-After header");
                refused += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(refused > 0, "some requests must be refused");
    // the queue holds 2; the running request may or may not have left it yet
    assert!(ok >= 2, "at least the queued requests complete: {ok}");
    let m = metrics(&w).await;
    assert_eq!(
        metric(&m, "llorch_request_failure_total{reason=\"overloaded\"}"),
        refused as f64
    );
}

#[tokio::test]
async fn metrics_move_by_the_right_amounts_and_pass_promtool() {
    let w = Worker::ready(&[]).await;
    let m0 = metrics(&w).await;
    let (_, a) = post(
        &w.url("/v1/completions"),
        r#"{"prompt":"The sky is","max_tokens":5}"#,
    )
    .await;
    let (_, b) = post(&w.url("/v1/chat/completions"), CHAT).await;
    let _ = post(&w.url("/v1/completions"), r#"{"prompt":"","max_tokens":5}"#).await;
    let m1 = metrics(&w).await;
    let d = |s: &str| metric(&m1, s) - metric(&m0, s);
    let prompt = a["usage"]["prompt_tokens"].as_f64().unwrap()
        + b["usage"]["prompt_tokens"].as_f64().unwrap();
    let gen = a["usage"]["completion_tokens"].as_f64().unwrap()
        + b["usage"]["completion_tokens"].as_f64().unwrap();
    assert_eq!(d("llorch_prompt_tokens_total"), prompt);
    assert_eq!(d("llorch_generation_tokens_total"), gen);
    assert_eq!(
        d("llorch_request_success_total{finished_reason=\"length\"}"),
        1.0
    );
    assert_eq!(
        d("llorch_request_success_total{finished_reason=\"eos\"}"),
        1.0
    );
    assert_eq!(
        d("llorch_request_failure_total{reason=\"validation\"}"),
        1.0
    );
    assert_eq!(d("llorch_time_to_first_token_seconds_count"), 2.0);
    assert_eq!(d("llorch_e2e_request_latency_seconds_count"), 2.0);
    assert_eq!(d("llorch_request_queue_time_seconds_count"), 2.0);
    assert_eq!(d("llorch_inter_token_latency_seconds_count"), gen - 2.0);
    assert_eq!(metric(&m1, "llorch_requests_running"), 0.0);
    assert!(metric(&m1, "llorch_model_load_seconds") > 0.0);
    assert!(m1.contains(
        "llorch_worker_info{backend=\"cpu\",device=\"cpu\",model=\"SmolLM2-135M-Instruct.Q4_1\",worker_id=\"test-worker\"} 1"
    ));
    for name in [
        "llorch_requests_waiting",
        "llorch_kv_cache_usage_ratio",
        "llorch_batch_size_count",
    ] {
        assert!(m1.contains(name), "{name} missing");
    }
    // promtool (Debian package `prometheus`; scripts/test.sh installs it)
    let mut p = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is required: apt-get install prometheus (scripts/test.sh does)");
    use std::io::Write;
    p.stdin.take().unwrap().write_all(m1.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
