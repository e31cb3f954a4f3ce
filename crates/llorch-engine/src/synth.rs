//! Synthetic models: the exact shape of a real model with seeded random weights and a
//! byte-level vocabulary, written as a real GGUF file or SafeTensors folder. For fast
//! tests of every architecture and for GPU benchmarks where real weights cannot travel.
//! The text such a model writes is noise; its speed and numerics are those of the shape.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{EngineError, Result};
use crate::model::family::Arch;

#[derive(Debug, Clone)]
pub struct Shape {
    pub arch: Arch,
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub context: usize,
    pub rope_base: f32,
}

/// Named shapes: real models' dimensions, and tiny ones for tests.
pub fn preset(name: &str, arch: Arch) -> Option<Shape> {
    let s = |layers, hidden, intermediate, heads, kv_heads, vocab, context, rope_base| Shape {
        arch,
        layers,
        hidden,
        intermediate,
        heads,
        kv_heads,
        head_dim: hidden / heads,
        vocab,
        context,
        rope_base,
    };
    Some(match name {
        "tinyllama-1.1b" => s(22, 2048, 5632, 32, 4, 32000, 2048, 10000.0),
        "smollm2-135m" => s(30, 576, 1536, 9, 3, 49152, 8192, 100000.0),
        "qwen2.5-0.5b" => s(24, 896, 4864, 14, 2, 151936, 32768, 1e6),
        "gemma3-270m" => Shape {
            head_dim: 256,
            ..s(18, 640, 2048, 4, 1, 262144, 32768, 1e6)
        },
        // A few MB: shape coverage in unit tests.
        "tiny" => s(2, 64, 128, 4, 2, 320, 256, 10000.0),
        _ => return None,
    })
}

pub const PRESETS: &str = "tinyllama-1.1b, smollm2-135m, qwen2.5-0.5b, gemma3-270m, tiny";

/// Output format: a GGUF with this weight type, or a SafeTensors folder in this dtype.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SynthDtype {
    Gguf(GgmlDType),
    SafeTensors(DType),
}

pub fn parse_dtype(s: &str) -> Option<SynthDtype> {
    Some(match s.to_ascii_lowercase().as_str() {
        "q4_k_m" | "q4_k" | "q4k" => SynthDtype::Gguf(GgmlDType::Q4K),
        "q8_0" => SynthDtype::Gguf(GgmlDType::Q8_0),
        "q4_0" => SynthDtype::Gguf(GgmlDType::Q4_0),
        "q4_1" => SynthDtype::Gguf(GgmlDType::Q4_1),
        "q5_0" => SynthDtype::Gguf(GgmlDType::Q5_0),
        "q6_k" => SynthDtype::Gguf(GgmlDType::Q6K),
        "f16-gguf" => SynthDtype::Gguf(GgmlDType::F16),
        "f32-gguf" => SynthDtype::Gguf(GgmlDType::F32),
        "f16" => SynthDtype::SafeTensors(DType::F16),
        "bf16" => SynthDtype::SafeTensors(DType::BF16),
        "f32" => SynthDtype::SafeTensors(DType::F32),
        _ => return None,
    })
}

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// GPT-2's byte → printable character table, so every byte is one token.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut map = vec!['\0'; 256];
    for &b in &printable {
        map[b as usize] = char::from_u32(b).unwrap();
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            map[b as usize] = char::from_u32(256 + n).unwrap();
            n += 1;
            printable.push(b);
        }
    }
    map
}

/// Tokens and llama.cpp token types of the synthetic vocabulary: 3 specials, 256
/// bytes, then unused fillers up to the vocabulary size.
pub fn vocabulary(vocab: usize) -> (Vec<String>, Vec<i64>) {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut types = vec![3i64; 3];
    for c in byte_chars() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let mut i = 0;
    while tokens.len() < vocab {
        tokens.push(format!("<|unused_{i}|>"));
        types.push(5);
        i += 1;
    }
    tokens.truncate(vocab.max(259));
    types.truncate(tokens.len());
    (tokens, types)
}

struct Rand(StdRng);

impl Rand {
    fn tensor(&mut self, rows: usize, cols: usize, std: f32) -> Result<Tensor> {
        let a = std * 3f32.sqrt();
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| self.0.random_range(-a..a))
            .collect();
        Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
    }
    fn norm(&mut self, n: usize) -> Result<Tensor> {
        let v: Vec<f32> = (0..n)
            .map(|_| 1.0 + self.0.random_range(-0.1..0.1))
            .collect();
        Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
    }
}

/// All tensors of the shape, under GGUF names, f32.
fn weights(sh: &Shape, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let mut r = Rand(StdRng::seed_from_u64(seed));
    let (h, hd, q, kv) = (
        sh.hidden,
        sh.head_dim,
        sh.heads * sh.head_dim,
        sh.kv_heads * sh.head_dim,
    );
    let mut out = vec![("token_embd.weight".to_string(), r.tensor(sh.vocab, h, 1.0)?)];
    for i in 0..sh.layers {
        let p = |n: &str| format!("blk.{i}.{n}");
        out.push((p("attn_norm.weight"), r.norm(h)?));
        out.push((p("attn_q.weight"), r.tensor(q, h, 1.0 / (h as f32).sqrt())?));
        out.push((
            p("attn_k.weight"),
            r.tensor(kv, h, 1.0 / (h as f32).sqrt())?,
        ));
        out.push((
            p("attn_v.weight"),
            r.tensor(kv, h, 1.0 / (h as f32).sqrt())?,
        ));
        if sh.arch == Arch::Qwen2 {
            out.push((p("attn_q.bias"), r.tensor(1, q, 0.1)?.squeeze(0)?));
            out.push((p("attn_k.bias"), r.tensor(1, kv, 0.1)?.squeeze(0)?));
            out.push((p("attn_v.bias"), r.tensor(1, kv, 0.1)?.squeeze(0)?));
        }
        if matches!(sh.arch, Arch::Qwen3 | Arch::Gemma3) {
            out.push((p("attn_q_norm.weight"), r.norm(hd)?));
            out.push((p("attn_k_norm.weight"), r.norm(hd)?));
        }
        out.push((
            p("attn_output.weight"),
            r.tensor(h, q, 1.0 / (q as f32).sqrt())?,
        ));
        if sh.arch == Arch::Gemma3 {
            out.push((p("post_attention_norm.weight"), r.norm(h)?));
            out.push((p("post_ffw_norm.weight"), r.norm(h)?));
        }
        out.push((p("ffn_norm.weight"), r.norm(h)?));
        out.push((
            p("ffn_gate.weight"),
            r.tensor(sh.intermediate, h, 1.0 / (h as f32).sqrt())?,
        ));
        out.push((
            p("ffn_up.weight"),
            r.tensor(sh.intermediate, h, 1.0 / (h as f32).sqrt())?,
        ));
        out.push((
            p("ffn_down.weight"),
            r.tensor(h, sh.intermediate, 1.0 / (sh.intermediate as f32).sqrt())?,
        ));
    }
    out.push(("output_norm.weight".to_string(), r.norm(h)?));
    out.push((
        "output.weight".to_string(),
        r.tensor(sh.vocab, h, 1.0 / (h as f32).sqrt())?,
    ));
    Ok(out)
}

/// The weight type a 2-D tensor gets: the asked one when its rows fit the block, else
/// Q8_0 (32-wide blocks), else f32. Norms and biases stay f32.
fn qtype(t: &Tensor, want: GgmlDType) -> GgmlDType {
    let cols = *t.dims().last().unwrap_or(&0);
    if t.rank() < 2 {
        GgmlDType::F32
    } else if cols.is_multiple_of(want.block_size()) {
        want
    } else if cols.is_multiple_of(32) {
        GgmlDType::Q8_0
    } else {
        GgmlDType::F32
    }
}

pub fn write(sh: &Shape, dtype: SynthDtype, out: &Path, seed: u64) -> Result<()> {
    match dtype {
        SynthDtype::Gguf(q) => write_gguf(sh, q, out, seed),
        SynthDtype::SafeTensors(d) => write_safetensors(sh, d, out, seed),
    }
}

fn write_gguf(sh: &Shape, q: GgmlDType, out: &Path, seed: u64) -> Result<()> {
    let arch = sh.arch.name();
    let (tokens, types) = vocabulary(sh.vocab);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String(format!("llorch-synth-{arch}")),
        ),
        (
            "general.file_type".into(),
            Value::U32(if q == GgmlDType::Q4K { 15 } else { 0 }),
        ),
        (format!("{arch}.block_count"), Value::U32(sh.layers as u32)),
        (
            format!("{arch}.embedding_length"),
            Value::U32(sh.hidden as u32),
        ),
        (
            format!("{arch}.feed_forward_length"),
            Value::U32(sh.intermediate as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            Value::U32(sh.heads as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Value::U32(sh.kv_heads as u32),
        ),
        (
            format!("{arch}.attention.key_length"),
            Value::U32(sh.head_dim as u32),
        ),
        (
            format!("{arch}.attention.value_length"),
            Value::U32(sh.head_dim as u32),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
        (format!("{arch}.rope.freq_base"), Value::F32(sh.rope_base)),
        (
            format!("{arch}.context_length"),
            Value::U32(sh.context as u32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(|t| Value::I32(t as i32)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(crate::chat::CHATML.into()),
        ),
    ];
    if sh.arch == Arch::Gemma3 {
        md.push((format!("{arch}.attention.sliding_window"), Value::U32(64)));
        md.push((format!("{arch}.rope.local_freq_base"), Value::F32(10000.0)));
    }
    let ws = weights(sh, seed)?;
    let mut qs = Vec::with_capacity(ws.len());
    for (name, t) in &ws {
        qs.push((name.clone(), QTensor::quantize(t, qtype(t, q))?));
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(out)?);
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    candle_core::quantized::gguf_file::write(&mut f, &md_refs, &t_refs)?;
    Ok(())
}

fn write_safetensors(sh: &Shape, dtype: DType, out: &Path, seed: u64) -> Result<()> {
    let model_type = match sh.arch {
        Arch::Llama => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
        Arch::Gemma3 => {
            return Err(EngineError::invalid(
                "arch",
                "gemma3 is written as GGUF only",
            ));
        }
    };
    std::fs::create_dir_all(out)?;
    let ws = weights(sh, seed)?;
    let mut map = std::collections::HashMap::new();
    for (name, t) in ws {
        map.insert(crate::model::sources_hf_name(&name), t.to_dtype(dtype)?);
    }
    candle_core::safetensors::save(&map, out.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": [match sh.arch { Arch::Qwen2 => "Qwen2ForCausalLM", Arch::Qwen3 => "Qwen3ForCausalLM", _ => "LlamaForCausalLM" }],
        "model_type": model_type,
        "hidden_size": sh.hidden,
        "intermediate_size": sh.intermediate,
        "num_hidden_layers": sh.layers,
        "num_attention_heads": sh.heads,
        "num_key_value_heads": sh.kv_heads,
        "head_dim": sh.head_dim,
        "vocab_size": sh.vocab,
        "max_position_embeddings": sh.context,
        "rms_norm_eps": 1e-6,
        "rope_theta": sh.rope_base,
        "tie_word_embeddings": false,
        "sliding_window": null,
        "use_sliding_window": false,
        "max_window_layers": sh.layers,
        "hidden_act": "silu",
        "attention_bias": sh.arch == Arch::Qwen2,
        "torch_dtype": format!("{dtype:?}").to_lowercase().replace("bf16", "bfloat16").replace("f16", "float16").replace("f32", "float32"),
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )?;
    let (tokens, types) = vocabulary(sh.vocab);
    let tj = crate::tokenizer::gpt2_tokenizer_json(&tokens, &types, &[], "default");
    std::fs::write(
        out.join("tokenizer.json"),
        serde_json::to_string(&tj).unwrap(),
    )?;
    let tc = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "add_bos_token": false,
        "chat_template": crate::chat::CHATML,
    });
    std::fs::write(
        out.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc).unwrap(),
    )?;
    Ok(())
}
