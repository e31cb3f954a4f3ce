//! Every bad input gets its status and the JSON error envelope naming the problem; the
//! worker keeps serving afterwards.

mod common;

use common::*;

async fn expect(
    w: &Worker,
    path: &str,
    body: &str,
    status: u16,
    param: Option<&str>,
    needle: &str,
) {
    let r = client()
        .post(w.url(path))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path} {body}: not JSON: {text}"));
    assert_eq!(s, status, "{path} {body}: {v}");
    assert_eq!(v["error"]["code"], status, "{v}");
    assert!(v["error"]["type"].is_string(), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.to_lowercase().contains(&needle.to_lowercase()),
        "{path} {body}: message {msg:?} lacks {needle:?}"
    );
    if let Some(p) = param {
        assert_eq!(v["error"]["param"], p, "{v}");
    }
}

#[tokio::test]
async fn bad_requests_get_400_naming_the_field() {
    let w = Worker::ready(&["--ctx-size", "256", "--max-body-bytes", "65536"]).await;
    let c = "/v1/completions";
    let chat = "/v1/chat/completions";
    expect(&w, c, "{\"prompt\": \"hi\"", 400, None, "malformed JSON").await;
    expect(&w, c, "", 400, None, "empty").await;
    expect(
        &w,
        c,
        r#"{"prompt":"hi","max_tokens":"ten"}"#,
        400,
        Some("max_tokens"),
        "max_tokens",
    )
    .await;
    expect(
        &w,
        c,
        r#"{"prompt":"hi","temperature":"hot"}"#,
        400,
        Some("temperature"),
        "temperature",
    )
    .await;
    expect(
        &w,
        c,
        r#"{"prompt":"hi","stream":"yes"}"#,
        400,
        Some("stream"),
        "stream",
    )
    .await;
    expect(&w, c, r#"{"max_tokens":4}"#, 400, None, "prompt").await;
    expect(&w, c, r#"{"prompt":""}"#, 400, Some("prompt"), "empty").await;
    expect(
        &w,
        c,
        r#"{"prompt":"hi","max_tokens":0}"#,
        400,
        Some("max_tokens"),
        "at least 1",
    )
    .await;
    expect(
        &w,
        c,
        r#"{"prompt":"hi","max_tokens":-5}"#,
        400,
        Some("max_tokens"),
        "at least 1",
    )
    .await;
    expect(
        &w,
        c,
        r#"{"prompt":"hi","max_tokens":100000000}"#,
        400,
        Some("max_tokens"),
        "exceeds the context",
    )
    .await;
    expect(
        &w,
        c,
        r#"{"prompt":"hi","temperature":-0.5}"#,
        400,
        Some("temperature"),
        "temperature",
    )
    .await;
    expect(
        &w,
        c,
        r#"{"prompt":"hi","top_p":0}"#,
        400,
        Some("top_p"),
        "top_p",
    )
    .await;
    expect(&w, c, r#"{"prompt":"hi","n":3}"#, 400, Some("n"), "n = 1").await;
    expect(
        &w,
        c,
        r#"{"prompt":"hi","stop":["a","b","c","d","e"]}"#,
        400,
        Some("stop"),
        "at most 4",
    )
    .await;
    expect(
        &w,
        c,
        r#"{"prompt":[1,2,999999]}"#,
        400,
        Some("prompt"),
        "outside the vocabulary",
    )
    .await;
    let long = "word ".repeat(400);
    expect(
        &w,
        c,
        &format!(r#"{{"prompt":"{long}","max_tokens":5}}"#),
        400,
        Some("prompt"),
        "context",
    )
    .await;
    expect(
        &w,
        c,
        r#"{"model":"gpt-4","prompt":"hi"}"#,
        404,
        Some("model"),
        "gpt-4",
    )
    .await;
    expect(
        &w,
        chat,
        r#"{"messages":[]}"#,
        400,
        Some("messages"),
        "empty",
    )
    .await;
    expect(
        &w,
        chat,
        r#"{"messages":"hi"}"#,
        400,
        Some("messages"),
        "messages",
    )
    .await;
    expect(
        &w,
        chat,
        r#"{"messages":[{"role":"wizard","content":"hi"}]}"#,
        400,
        Some("messages"),
        "wizard",
    )
    .await;
    expect(
        &w,
        "/execute",
        r#"{"prompt":"hi","max_tokens":0}"#,
        400,
        Some("max_tokens"),
        "at least 1",
    )
    .await;
    expect(
        &w,
        "/execute",
        r#"{"prompt":""}"#,
        400,
        Some("prompt"),
        "empty",
    )
    .await;
    expect(
        &w,
        "/execute",
        r#"{"prompt":"hi","top_k":-1}"#,
        400,
        Some("top_k"),
        "top_k",
    )
    .await;
    expect(&w, "/cancel", r#"{}"#, 400, None, "job_id").await;
    // body over the limit
    let huge = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(100_000));
    expect(&w, c, &huge, 413, None, "exceeds the limit").await;
    // unknown route and wrong method
    let r = client().get(w.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "not_found_error");
    let r = client().get(w.url("/v1/completions")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.json::<serde_json::Value>().await.unwrap()["error"]["message"].is_string());
    // and it still serves
    let (s, _) = post(&w.url(c), r#"{"prompt":"hi","max_tokens":2}"#).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn api_key_is_required_except_on_health_and_metrics() {
    let w = Worker::ready(&["--api-key", "s3cret"]).await;
    let c = client();
    for path in ["/v1/models", "/info"] {
        let r = c.get(w.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "authentication_error");
    }
    let r = c
        .post(w.url("/v1/completions"))
        .bearer_auth("wrong")
        .body(r#"{"prompt":"hi","max_tokens":2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(w.url("/v1/completions"))
        .bearer_auth("s3cret")
        .body(r#"{"prompt":"hi","max_tokens":2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(c.get(w.url("/health")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(w.url("/metrics")).send().await.unwrap().status(), 200);
}
