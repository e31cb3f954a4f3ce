//! Continuous batching: our batched forward gives each sequence the logits it gets alone,
//! with sequences of different lengths joining mid-way, and a request's greedy tokens
//! are the same alone or among 15 others.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use llorch_engine::engine::{Event, FinishReason, GenerationRequest};
use llorch_engine::model::family::Arch;
use llorch_engine::model::{Network, SeqState};
use llorch_engine::{synth, SamplingParams};

fn row(t: &candle_core::Tensor, i: usize) -> Vec<f32> {
    t.get(i).unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Three sequences: A prefills alone, decodes; B joins (its prefill in the same forward
/// as A's decode); C joins later with a long prompt; all decode together. Every logit row
/// is checked against the same sequence run alone.
fn check_batched_equals_alone(net: &mut Network, tol: f32) -> f32 {
    let prompts: [Vec<u32>; 3] = [
        (0..7).map(|i| 20 + i * 3).collect(),
        (0..3).map(|i| 50 + i).collect(),
        (0..19).map(|i| 100 + i * 2).collect(),
    ];
    let decodes: [Vec<u32>; 3] = [
        vec![11, 12, 13, 14, 15, 16],
        vec![21, 22, 23, 24],
        vec![31, 32],
    ];
    // alone: prompt, then each decode token
    let mut alone: Vec<Vec<Vec<f32>>> = vec![];
    for (p, d) in prompts.iter().zip(&decodes) {
        let mut s = net.new_seq();
        let mut rows = vec![row(&net.forward(&mut [(&mut s, &p[..])]).unwrap(), 0)];
        for t in d {
            rows.push(row(&net.forward(&mut [(&mut s, &[*t][..])]).unwrap(), 0));
        }
        alone.push(rows);
    }
    // together: (step) -> what each sequence feeds; None = not running
    let mut st: Vec<SeqState> = (0..3).map(|_| net.new_seq()).collect();
    let mut next = [0usize; 3]; // how many rows of `alone` each has produced
    let schedule: [[bool; 3]; 7] = [
        [true, false, false],
        [true, true, false],
        [true, true, true],
        [true, true, true],
        [true, true, true],
        [true, true, false],
        [true, false, false],
    ];
    let mut worst = 0f32;
    for active in schedule {
        let feeds: Vec<(usize, Vec<u32>)> = (0..3)
            .filter(|&i| active[i] && next[i] <= decodes[i].len())
            .map(|i| {
                (
                    i,
                    if next[i] == 0 {
                        prompts[i].clone()
                    } else {
                        vec![decodes[i][next[i] - 1]]
                    },
                )
            })
            .collect();
        let mut refs: Vec<Option<&mut SeqState>> = st.iter_mut().map(Some).collect();
        let mut batch: Vec<(&mut SeqState, &[u32])> = vec![];
        for (i, f) in &feeds {
            batch.push((refs[*i].take().unwrap(), &f[..]));
        }
        let out = net.forward(&mut batch).unwrap();
        for (k, (i, _)) in feeds.iter().enumerate() {
            let d = max_abs_diff(&row(&out, k), &alone[*i][next[*i]]);
            assert!(
                d < tol,
                "sequence {i} row {}: max |Δlogit| batched vs alone = {d}",
                next[*i]
            );
            worst = worst.max(d);
            next[*i] += 1;
        }
    }
    assert_eq!(next, [7, 5, 3], "every row was compared");
    worst
}

#[test]
fn batched_forward_equals_single_sequence_synthetic() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, dtype) in [
        (Arch::Llama, "q8_0"),
        (Arch::Qwen2, "f32"),
        (Arch::Qwen3, "q4_0"),
        (Arch::Gemma3, "q8_0"),
    ] {
        let sh = synth::preset("tiny", arch).unwrap();
        let d = synth::parse_dtype(dtype).unwrap();
        let p = match d {
            synth::SynthDtype::Gguf(_) | synth::SynthDtype::GgufQ4KM => {
                dir.path().join(format!("{}.gguf", arch.name()))
            }
            _ => dir.path().join(arch.name()),
        };
        synth::write(&sh, d, &p, 3).unwrap();
        let mut net = common::load(&p).network;
        let worst = check_batched_equals_alone(&mut net, 1e-3);
        eprintln!("{arch:?} {dtype}: worst |Δlogit| {worst}");
    }
}

#[test]
fn batched_forward_equals_single_sequence_real_model() {
    let mut net = common::load(&common::default_model()).network;
    // Candle's quantized matmul quantizes each activation row on its own, so a row's
    // result does not depend on its neighbours: measured exactly equal (Δ = 0) here.
    let worst = check_batched_equals_alone(&mut net, 1e-3);
    eprintln!("SmolLM2 Q4_1: worst |Δlogit| {worst}");
}

fn run(
    e: &llorch_engine::Engine,
    prompt: Vec<u32>,
    n: usize,
) -> (tokio::sync::mpsc::UnboundedReceiver<Event>, Arc<AtomicBool>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    e.submit(GenerationRequest {
        prompt,
        max_tokens: n,
        sampling: SamplingParams::default(),
        stop: vec![],
        ignore_eos: true,
        events: tx,
        cancel: cancel.clone(),
        enqueued: Instant::now(),
    })
    .unwrap();
    (rx, cancel)
}

fn tokens(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> Vec<u32> {
    let mut out = vec![];
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token { id, .. } => out.push(id),
            Event::Done(f) => {
                assert_eq!(f.finish, FinishReason::Length);
                return out;
            }
            Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
    panic!("no Done event")
}

#[test]
fn greedy_tokens_are_the_same_alone_and_among_15_others() {
    let path = common::default_model();
    let e = common::engine(&path, 16);
    let texts = [
        "The capital of France is",
        "Once upon a time, there was a little girl named Lily. She",
        "def add(a, b):\n    return",
        "The three primary colors are",
    ];
    let prompts: Vec<Vec<u32>> = (0..16)
        .map(|i| {
            let t = format!(
                "{} {}",
                texts[i % texts.len()],
                if i >= 4 {
                    "and more words".repeat(i % 5)
                } else {
                    String::new()
                }
            );
            e.tokenizer.encode(t.trim_end(), true).unwrap()
        })
        .collect();
    let alone = tokens(run(&e, prompts[0].clone(), 24).0);
    // 16 at once (the first is the same request), submitted together so they share steps
    let rxs: Vec<_> = prompts.iter().map(|p| run(&e, p.clone(), 24).0).collect();
    let mut outs: Vec<Vec<u32>> = rxs.into_iter().map(tokens).collect();
    let among = outs.remove(0);
    assert_eq!(
        alone, among,
        "request 0's greedy tokens changed when batched with 15 others"
    );
    assert!(e.stats.steps.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

/// The device KV pool (used on CUDA; enabled here on CPU to run the same code): sequences
/// in pool slots give the logits of per-sequence caches, alone and batched, with the
/// pooled decode path (one scatter + one masked attention for all sequences) taken
/// whenever every sequence decodes. Gemma 3 covers the sliding-window mask.
#[test]
fn kv_pool_equals_per_sequence_caches() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, dtype) in [
        (Arch::Llama, "q8_0"),
        (Arch::Gemma3, "q8_0"),
        (Arch::Qwen2, "f32"),
    ] {
        let sh = synth::preset("tiny", arch).unwrap();
        let p = dir.path().join(format!("{}.gguf", arch.name()));
        let p = if dtype == "f32" {
            dir.path().join(arch.name())
        } else {
            p
        };
        synth::write(&sh, synth::parse_dtype(dtype).unwrap(), &p, 5).unwrap();
        let mut plain = common::load(&p).network;
        let mut pooled = common::load(&p).network;
        // 2 slots for 3 sequences: the third gets a cache of its own, so batches that mix
        // the two kinds take the per-sequence path and the others the pooled one
        pooled.enable_kv_pool(2, 64).unwrap();
        let worst = check_batched_equals_alone(&mut pooled, 1e-3);
        // and pooled == plain for one sequence over prefill and 8 decode steps
        let mut a = plain.new_seq();
        let mut b = pooled.new_seq();
        let mut c = pooled.new_seq(); // a second running sequence so decode steps batch
        let prompt: Vec<u32> = (0..9).map(|i| 40 + i).collect();
        pooled.forward(&mut [(&mut c, &prompt[..3])]).unwrap();
        let mut feed = prompt.clone();
        for step in 0..9 {
            let x = row(&plain.forward(&mut [(&mut a, &feed[..])]).unwrap(), 0);
            let y = if step == 0 {
                row(&pooled.forward(&mut [(&mut b, &feed[..])]).unwrap(), 0)
            } else {
                let out = pooled
                    .forward(&mut [(&mut c, &[7u32][..]), (&mut b, &feed[..])])
                    .unwrap();
                row(&out, 1)
            };
            let d = max_abs_diff(&x, &y);
            assert!(d < 1e-3, "{arch:?} step {step}: pooled vs plain {d}");
            feed = vec![60 + step];
        }
        eprintln!("{arch:?}: pooled batched vs alone worst {worst}");
    }
}
