//! The `openai` Python package (in the venv scripts/test.sh makes) against the real worker:
//! chat and completions, streaming and not.

mod common;

use common::*;

#[tokio::test]
async fn openai_python_client_works() {
    let py = std::env::var("LLORCH_TEST_PYTHON").unwrap_or_else(|_| {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/python");
        assert!(
            std::path::Path::new(p).exists(),
            "no Python venv with `openai`: run scripts/test.sh (it makes .venv)"
        );
        p.to_string()
    });
    let w = Worker::ready(&[]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = tokio::process::Command::new(py)
        .arg(script)
        .arg(w.url("/v1"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ALL OK"), "{stdout}");
}
