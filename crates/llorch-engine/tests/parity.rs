//! Parity with an independent runtime: llama.cpp (llama-cpp-python 0.3.36). The golden
//! files under `reference/` were produced by `reference/llamacpp_golden.py`; these tests
//! only read them.

mod common;

use llorch_engine::engine::generate_blocking;
use llorch_engine::gguf::GgufFile;
use llorch_engine::tokenizer::Tokenizer;
use llorch_engine::{catalog, SamplingParams};
use serde_json::Value;

fn golden(name: &str) -> Value {
    let p = common::repo_root().join("reference").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn check_tokenizer(tok: &Tokenizer, cases: &Value, label: &str) {
    for c in cases.as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, true).unwrap();
        assert_eq!(
            got, want,
            "{label}: token ids of {text:?} differ from llama.cpp's"
        );
        // round trip on text without special tokens (decode leaves specials out)
        if !text.contains('<') {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(
                tok.decode(&ids).unwrap(),
                text,
                "{label}: {text:?} does not round-trip"
            );
        }
    }
}

/// The tokenizer built from each GGUF's embedded vocabulary gives llama.cpp's ids on
/// Unicode, code, whitespace runs and special tokens. The default model is required;
/// the other shipped models are checked when they have been fetched.
#[test]
fn gguf_tokenizers_match_llama_cpp() {
    let g = golden("tokenizer_ids.json");
    let mut checked = 0;
    for (name, m) in g["models"].as_object().unwrap() {
        let path = if name == catalog::DEFAULT_MODEL {
            common::default_model()
        } else {
            match common::optional_model(name) {
                Some(p) => p,
                None => continue,
            }
        };
        let (file, _) = GgufFile::open(&path).unwrap();
        let embedded = Tokenizer::from_gguf_embedded(&file).unwrap();
        check_tokenizer(
            &embedded,
            &m["cases"],
            &format!("{name} (embedded vocabulary)"),
        );
        // and whatever the loader picks (Gemma: the tokenizer.json fetched beside it)
        let loaded = common::load(&path).tokenizer;
        check_tokenizer(&loaded, &m["cases"], &format!("{name} (as loaded)"));
        checked += 1;
    }
    assert!(checked >= 1);
}

/// Logits within this distance are a near-tie: which one wins depends on float summation
/// order (kernel blocking, prefill vs decode shapes), in llama.cpp as in Candle.
const NEAR_TIE: f32 = 0.25;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Greedy continuations against llama.cpp's, two ways:
/// 1. teacher-forced: fed llama.cpp's own tokens, at every one of the 32 positions our
///    argmax is llama.cpp's token, or llama.cpp's token is within NEAR_TIE of ours;
///    and over all prompts at least 90% of positions agree exactly;
/// 2. free-running: our greedy tokens equal llama.cpp's for at least the first 16 of every
///    prompt, unless the two part at a near-tie (checked here). Which prompts part moves
///    with float summation order; see reference/README.md.
#[test]
fn greedy_tokens_match_llama_cpp_on_the_default_model() {
    let g = golden("golden_greedy.json");
    let m = &g["models"][catalog::DEFAULT_MODEL];
    let e = common::engine(&common::default_model(), 1);
    let mut net = common::load(&common::default_model()).network;
    let (mut positions, mut disagreements) = (0, 0);
    for c in m["cases"].as_array().unwrap() {
        let text = c["prompt"].as_str().unwrap();
        let prompt = ids(&c["prompt_ids"]);
        let want = ids(&c["output_ids"]);
        assert_eq!(
            e.tokenizer.encode(text, true).unwrap(),
            prompt,
            "prompt ids of {text:?}"
        );
        // 1. teacher-forced
        let mut ties = vec![];
        let mut s = net.new_seq();
        let mut feed = prompt.clone();
        for (i, &w) in want.iter().enumerate() {
            let l: Vec<f32> = net
                .forward(&mut [(&mut s, &feed[..])])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let ours = l
                .iter()
                .enumerate()
                .fold(0, |b, (j, &x)| if x > l[b] { j } else { b });
            if ours != w as usize {
                let gap = l[ours] - l[w as usize];
                assert!(
                    gap < NEAR_TIE,
                    "{text:?} position {i}: we pick {ours}, llama.cpp {w}, {gap:.3} logits apart"
                );
                ties.push(i);
            }
            positions += 1;
            feed = vec![w];
        }
        // 2. free-running
        let mut got = vec![];
        generate_blocking(
            &e,
            prompt.clone(),
            Some(want.len() as i64),
            SamplingParams::default(),
            vec![],
            false,
            |_, id| {
                if id != u32::MAX {
                    got.push(id)
                }
            },
        )
        .unwrap();
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        eprintln!(
            "{text:?}: {same}/{} greedy tokens equal; near-ties at {ties:?}",
            want.len()
        );
        disagreements += ties.len();
        if same < 16.min(want.len()) {
            // the only accepted reason to part early: a near-tie where we parted, shown by
            // the same position failing the exact test when fed llama.cpp's prefix
            let mut s = net.new_seq();
            let mut ctx = prompt.clone();
            ctx.extend_from_slice(&want[..same]);
            let l: Vec<f32> = net
                .forward(&mut [(&mut s, &ctx[..])])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let gap = (l[got[same] as usize] - l[want[same] as usize]).abs();
            assert!(
                gap < NEAR_TIE,
                "{text:?}: only {same} greedy tokens match llama.cpp and token {same} is no near-tie ({gap:.3})\nours:   {got:?}\ntheirs: {want:?}"
            );
        }
    }
    assert!(
        disagreements * 10 <= positions,
        "teacher-forced, {disagreements} of {positions} positions pick another token than llama.cpp"
    );
}
