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
    /// Every matrix of this type (where its rows are whole blocks of it, see [`qtype`]).
    Gguf(GgmlDType),
    /// llama.cpp's Q4_K_M mix: Q4_K, but Q6_K for the output matrix and for the V and down
    /// matrices of the layers [`use_more_bits`] picks (about half), as `llama-quantize`
    /// writes it.
    GgufQ4KM,
    SafeTensors(DType),
}

/// llama.cpp's choice of the layers whose V and down matrices a K-quant mix keeps at more
/// bits: the first and last eighth and every third layer between.
pub fn use_more_bits(layer: usize, layers: usize) -> bool {
    // the last term only sees layers >= layers / 8 (the first is true below)
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2
}

/// The type the mix gives tensor `name` (before [`qtype`]'s fallback for short rows).
fn q4km_type(name: &str, layers: usize) -> GgmlDType {
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|i| i.parse::<usize>().ok());
    let more = name == "output.weight"
        || (name.contains(".attn_v.") || name.contains(".ffn_down."))
            && layer.is_some_and(|i| use_more_bits(i, layers));
    if more {
        GgmlDType::Q6K
    } else {
        GgmlDType::Q4K
    }
}

pub fn parse_dtype(s: &str) -> Option<SynthDtype> {
    Some(match s.to_ascii_lowercase().as_str() {
        "q4_k_m" => SynthDtype::GgufQ4KM,
        "q4_k" | "q4k" => SynthDtype::Gguf(GgmlDType::Q4K),
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

/// The weight type a 2-D tensor gets: the asked one when its rows fit the block, else a
/// 32-wide type as `llama-quantize` falls back (Q4_K to Q5_0, others to Q8_0: Qwen2.5-0.5B's
/// 896-wide rows), else f32. Norms and biases stay f32.
fn qtype(t: &Tensor, want: GgmlDType) -> GgmlDType {
    let cols = *t.dims().last().unwrap_or(&0);
    if t.rank() < 2 {
        GgmlDType::F32
    } else if cols.is_multiple_of(want.block_size()) {
        want
    } else if cols.is_multiple_of(32) && want == GgmlDType::Q4K {
        GgmlDType::Q5_0
    } else if cols.is_multiple_of(32) {
        GgmlDType::Q8_0
    } else {
        GgmlDType::F32
    }
}

pub fn write(sh: &Shape, dtype: SynthDtype, out: &Path, seed: u64) -> Result<()> {
    match dtype {
        SynthDtype::Gguf(q) => write_gguf(sh, Some(q), out, seed),
        SynthDtype::GgufQ4KM => write_gguf(sh, None, out, seed),
        SynthDtype::SafeTensors(d) => write_safetensors(sh, d, out, seed),
    }
}

/// `q`: every matrix of that type; `None`: the Q4_K_M mix.
fn write_gguf(sh: &Shape, q: Option<GgmlDType>, out: &Path, seed: u64) -> Result<()> {
    let arch = sh.arch.name();
    let (tokens, types) = vocabulary(sh.vocab);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String(format!("llorch-synth-{arch}")),
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
    // llama.cpp's LLAMA_FTYPE code where one describes the file (a file of Q4_K alone is
    // none of them: readers then name its most common type)
    let file_type = match q {
        None => Some(15),
        Some(GgmlDType::F32) => Some(0),
        Some(GgmlDType::F16) => Some(1),
        Some(GgmlDType::Q4_0) => Some(2),
        Some(GgmlDType::Q4_1) => Some(3),
        Some(GgmlDType::Q8_0) => Some(7),
        Some(GgmlDType::Q5_0) => Some(8),
        Some(GgmlDType::Q6K) => Some(18),
        _ => None,
    };
    if let Some(ft) = file_type {
        md.push(("general.file_type".into(), Value::U32(ft)));
    }
    if sh.arch == Arch::Gemma3 {
        md.push((format!("{arch}.attention.sliding_window"), Value::U32(64)));
        md.push((format!("{arch}.rope.local_freq_base"), Value::F32(10000.0)));
    }
    let ws = weights(sh, seed)?;
    let mut qs = Vec::with_capacity(ws.len());
    for (name, t) in &ws {
        let want = q.unwrap_or_else(|| q4km_type(name, sh.layers));
        qs.push((name.clone(), QTensor::quantize(t, qtype(t, want))?));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_bits_layers_are_llama_cpps() {
        let picked: Vec<usize> = (0..22).filter(|&i| use_more_bits(i, 22)).collect();
        assert_eq!(picked, [0, 1, 4, 7, 10, 13, 16, 19, 20, 21]);
        let picked: Vec<usize> = (0..8).filter(|&i| use_more_bits(i, 8)).collect();
        assert_eq!(picked, [0, 3, 6, 7]);
    }

    /// The Q4_K_M file holds the mix (rows of 256 columns, so no fallback to Q8_0), and
    /// `q4_k` holds Q4_K alone.
    #[test]
    fn q4_k_m_writes_llama_cpps_mix() {
        let sh = Shape {
            hidden: 256,
            intermediate: 512,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            layers: 8,
            vocab: 320,
            ..preset("tiny", Arch::Llama).unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        // the file's tensor types and `general.file_type`
        let types = |sh: &Shape, dtype: &str| {
            let p = dir.path().join(format!("{dtype}-{}.gguf", sh.hidden));
            write(sh, parse_dtype(dtype).unwrap(), &p, 1).unwrap();
            let mut f = std::fs::File::open(&p).unwrap();
            let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
            let ft = c
                .metadata
                .get("general.file_type")
                .map(|v| v.to_u32().unwrap());
            let t = c
                .tensor_infos
                .iter()
                .map(|(n, i)| (n.clone(), i.ggml_dtype))
                .collect::<std::collections::HashMap<_, _>>();
            (t, ft)
        };
        let (mix, ft) = types(&sh, "q4_k_m");
        assert_eq!(ft, Some(15));
        assert_eq!(mix["output.weight"], GgmlDType::Q6K);
        assert_eq!(mix["token_embd.weight"], GgmlDType::Q4K);
        for i in 0..8 {
            let more = if [0, 3, 6, 7].contains(&i) {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            };
            assert_eq!(mix[&format!("blk.{i}.attn_v.weight")], more, "layer {i}");
            assert_eq!(mix[&format!("blk.{i}.ffn_down.weight")], more, "layer {i}");
            for n in ["attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"] {
                assert_eq!(
                    mix[&format!("blk.{i}.{n}.weight")],
                    GgmlDType::Q4K,
                    "{n} {i}"
                );
            }
        }
        // rows that are not whole 256-blocks (Qwen2.5-0.5B: 896): llama.cpp's fallbacks
        let narrow = Shape {
            hidden: 96,
            intermediate: 256,
            heads: 3,
            kv_heads: 1,
            head_dim: 32,
            ..sh.clone()
        };
        let (narrow, _) = types(&narrow, "q4_k_m");
        let t = |n: &str| narrow[n];
        assert_eq!(t("blk.1.attn_q.weight"), GgmlDType::Q5_0);
        assert_eq!(t("blk.1.attn_v.weight"), GgmlDType::Q5_0);
        assert_eq!(t("blk.0.attn_v.weight"), GgmlDType::Q8_0);
        assert_eq!(t("blk.0.ffn_down.weight"), GgmlDType::Q6K);
        assert_eq!(t("blk.1.ffn_down.weight"), GgmlDType::Q4K);
        let (pure, ft) = types(&sh, "q4_k");
        assert_eq!(ft, None);
        assert!(pure
            .iter()
            .filter(|(n, _)| n.ends_with(".weight") && !n.contains("norm"))
            .all(|(_, t)| *t == GgmlDType::Q4K));
    }
}
