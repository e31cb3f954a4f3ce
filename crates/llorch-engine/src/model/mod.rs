//! Loading a model from a path: a GGUF file or a SafeTensors folder, architecture from
//! `general.architecture` / `config.json`'s `model_type`. The llama family runs on our
//! batched forward ([`family`]); Phi-3 runs on Candle's single-sequence model.

// used by the CUDA graph decoder only; compiled and tested on every build
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod ahead;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod buckets;
pub mod family;
#[cfg(feature = "cuda")]
mod graph;
mod phi3;
pub mod qcpu;
mod sources;

pub use sources::hf_name as sources_hf_name;
pub use sources::{dequantize_enabled, set_dequantize};

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;
pub use family::RowOut;
use family::{Activation, Arch, BatchItem, FamilyConfig, FamilyModel, SeqCache};

pub const SUPPORTED_GGUF: &str = "llama, mistral, qwen2, qwen3, gemma3, phi3";
pub const SUPPORTED_SAFETENSORS: &str = "llama, mistral, qwen2, qwen3";

/// What a loaded model is, as `/info`, `llorch models inspect` and the callback report it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// Short id: the file or folder name without extension.
    pub id: String,
    pub path: String,
    pub architecture: String,
    pub parameters: u64,
    pub quantization: String,
    pub context_length: usize,
    pub vocab_size: usize,
    /// Bytes of weights on the device.
    pub memory_bytes: u64,
    /// `gguf` or `safetensors`.
    pub format: String,
}

/// The forward pass behind a model.
pub enum Network {
    Family(FamilyModel),
    Phi3(phi3::Phi3),
}

/// A sequence's state on the network (its KV cache).
pub enum SeqState {
    Family(SeqCache),
    Single { len: usize },
}

impl SeqState {
    pub fn len(&self) -> usize {
        match self {
            SeqState::Family(c) => c.len(),
            SeqState::Single { len } => *len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Network {
    pub fn new_seq(&self) -> SeqState {
        match self {
            Network::Family(m) => SeqState::Family(m.new_cache()),
            Network::Phi3(_) => SeqState::Single { len: 0 },
        }
    }

    /// Sequences that can share one forward (1 for single-sequence networks).
    pub fn max_batch(&self) -> usize {
        match self {
            Network::Family(_) => usize::MAX,
            Network::Phi3(_) => 1,
        }
    }

    /// Keeps KV caches in one preallocated pool on the device (see `family::KvPool`);
    /// single-sequence networks have nothing to pool.
    pub fn enable_kv_pool(&mut self, slots: usize, cap: usize) -> Result<()> {
        match self {
            Network::Family(m) => m.enable_kv_pool(slots, cap),
            Network::Phi3(_) => Ok(()),
        }
    }

    pub fn is_cuda(&self) -> bool {
        match self {
            Network::Family(m) => m.device().is_cuda(),
            Network::Phi3(_) => false,
        }
    }

    pub fn kv_bytes_per_token(&self) -> usize {
        match self {
            Network::Family(m) => m.kv_bytes_per_token(),
            Network::Phi3(p) => p.kv_bytes_per_token(),
        }
    }

    /// Rows a step can put through the fused CUDA-graph kernels (a row per new token);
    /// 0 where there is no such path. The scheduler sizes short prompt chunks to fit.
    pub fn graph_rows(&self) -> usize {
        match self {
            Network::Family(m) => m.graph_rows(),
            Network::Phi3(_) => 0,
        }
    }

    /// Feeds new tokens for each sequence; returns last-token logits `[n, vocab]` (f32).
    pub fn forward(&mut self, batch: &mut [(&mut SeqState, &[u32])]) -> Result<Tensor> {
        match self {
            Network::Family(m) => m.forward(&mut family_items(batch)),
            Network::Phi3(p) => {
                if batch.len() != 1 {
                    return Err(EngineError::Device(
                        "phi3 runs one sequence at a time".into(),
                    ));
                }
                let (s, t) = &mut batch[0];
                let SeqState::Single { len } = s else {
                    unreachable!("single-sequence model with a family state")
                };
                let out = p.forward(t, *len)?;
                *len += t.len();
                Ok(out)
            }
        }
    }

    /// [`Self::forward`] for the scheduler: sequences marked in `greedy` may come back as
    /// their greedy pick made on the device ([`RowOut::Picked`]), the others as logits.
    pub fn forward_rows(
        &mut self,
        batch: &mut [(&mut SeqState, &[u32])],
        greedy: &[bool],
    ) -> Result<Vec<RowOut>> {
        match self {
            Network::Family(m) => m.forward_rows(&mut family_items(batch), greedy),
            Network::Phi3(_) => Ok(self
                .forward(batch)?
                .to_vec2::<f32>()?
                .into_iter()
                .map(RowOut::Logits)
                .collect()),
        }
    }
}

fn family_items<'a>(batch: &'a mut [(&mut SeqState, &[u32])]) -> Vec<BatchItem<'a>> {
    batch
        .iter_mut()
        .map(|(s, t)| match s {
            SeqState::Family(c) => BatchItem {
                cache: c,
                tokens: t,
            },
            SeqState::Single { .. } => unreachable!("family model with a single-sequence state"),
        })
        .collect()
}

pub struct LoadedModel {
    pub info: ModelInfo,
    pub network: Network,
    pub tokenizer: Tokenizer,
    pub device: Device,
}

/// Progress while loading: (tensors done, tensors total).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

/// Loads a GGUF file or a SafeTensors folder onto `device`.
pub fn load(path: &Path, device: &Device, progress: Progress<'_>) -> Result<LoadedModel> {
    if !path.exists() {
        return Err(EngineError::NotFound(path.display().to_string()));
    }
    if path.is_dir() {
        load_safetensors(path, device, progress)
    } else {
        load_gguf(path, device, progress)
    }
}

fn model_id(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    name.strip_suffix(".gguf").unwrap_or(&name).to_string()
}

/// Reads a GGUF's metadata into our family config (no weights).
pub fn gguf_family_config(g: &GgufFile, arch: &str) -> Result<Option<FamilyConfig>> {
    let a = match arch {
        "llama" | "mistral" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        "gemma3" => Arch::Gemma3,
        _ => return Ok(None),
    };
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = g.req_u64(&k("embedding_length"))? as usize;
    let heads = g.req_u64(&k("attention.head_count"))? as usize;
    let kv_heads = g
        .get_u64(&k("attention.head_count_kv"))
        .unwrap_or(heads as u64) as usize;
    let head_dim = g
        .get_u64(&k("attention.key_length"))
        .map(|x| x as usize)
        .unwrap_or(hidden / heads);
    let vocab = g
        .content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or_else(|| EngineError::BadModelFile {
            path: g.path.clone(),
            reason: "tensor token_embd.weight is missing".into(),
        })?;
    let gemma = a == Arch::Gemma3;
    Ok(Some(FamilyConfig {
        arch: a,
        hidden,
        layers: g.req_u64(&k("block_count"))? as usize,
        heads,
        kv_heads,
        head_dim,
        intermediate: g.get_u64(&k("feed_forward_length")).unwrap_or(0) as usize,
        vocab,
        eps: g
            .get_f64(&k("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-6),
        rope_base: g
            .get_f64(&k("rope.freq_base"))
            .unwrap_or(if gemma { 1e6 } else { 10000.0 }) as f32,
        rope_local_base: g.get_f64(&k("rope.local_freq_base")).unwrap_or(10000.0) as f32,
        rope_interleaved: a == Arch::Llama,
        sliding_window: if gemma {
            g.get_u64(&k("attention.sliding_window"))
                .map(|x| x as usize)
        } else {
            None
        },
        sliding_pattern: g.get_u64(&k("attention.sliding_window_type")).unwrap_or(6) as usize,
        activation: if gemma {
            Activation::GeluTanh
        } else {
            Activation::Silu
        },
        embed_scale: gemma.then(|| (hidden as f64).sqrt()),
        context_length: g.get_u64(&k("context_length")).unwrap_or(4096) as usize,
    }))
}

fn load_gguf(path: &Path, device: &Device, progress: Progress<'_>) -> Result<LoadedModel> {
    let (g, mut reader) = GgufFile::open(path)?;
    let arch = g.architecture()?;
    if !SUPPORTED_GGUF.split(", ").any(|a| a == arch) {
        return Err(EngineError::UnknownArchitecture {
            path: path.display().to_string(),
            arch,
            supported: SUPPORTED_GGUF.into(),
        });
    }
    let tokenizer = Tokenizer::from_gguf_or_sidecar(&g, path)?;
    let parameters = g.parameter_count();
    let quantization = g.quantization();
    let bytes: u64 = g.file_size;
    let (network, context_length, vocab) = if let Some(cfg) = gguf_family_config(&g, &arch)? {
        let ctx = cfg.context_length;
        let vocab = cfg.vocab;
        let total = g.content.tensor_infos.len();
        let mut src = sources::GgufSource::new(&g, &mut reader, device, total, progress);
        let m = FamilyModel::load(cfg, &mut src, device, DType::F32)?;
        (Network::Family(m), ctx, vocab)
    } else if arch == "phi3" {
        let ctx = g.get_u64("phi3.context_length").unwrap_or(4096) as usize;
        let vocab = g
            .content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .unwrap_or(0);
        let total = g.content.tensor_infos.len();
        // Candle's loader takes the parsed header by value: hand over ours (no re-read).
        let p = phi3::Phi3::load(g.content, &mut reader, device)?;
        progress(total, total);
        (Network::Phi3(p), ctx, vocab)
    } else {
        return Err(EngineError::UnknownArchitecture {
            path: path.display().to_string(),
            arch,
            supported: SUPPORTED_GGUF.into(),
        });
    };
    Ok(LoadedModel {
        info: ModelInfo {
            id: model_id(path),
            path: path.display().to_string(),
            architecture: arch,
            parameters,
            quantization,
            context_length,
            vocab_size: vocab,
            memory_bytes: bytes,
            format: "gguf".into(),
        },
        network,
        tokenizer,
        device: device.clone(),
    })
}

/// `config.json` fields we read (HF names).
#[derive(serde::Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: usize,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    max_position_embeddings: Option<usize>,
    torch_dtype: Option<String>,
}

pub fn read_hf_config(dir: &Path) -> Result<(HfConfigSummary, FamilyConfig)> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.exists() {
        return Err(EngineError::MissingFile {
            path: dir.display().to_string(),
            what: "config.json".into(),
        });
    }
    let text = std::fs::read_to_string(&cfg_path)?;
    let c: HfConfig = serde_json::from_str(&text).map_err(|e| EngineError::BadModelFile {
        path: cfg_path.display().to_string(),
        reason: e.to_string(),
    })?;
    let mt = c.model_type.clone().unwrap_or_default();
    let arch = match mt.as_str() {
        "llama" | "mistral" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        _ => {
            return Err(EngineError::UnknownArchitecture {
                path: cfg_path.display().to_string(),
                arch: mt,
                supported: SUPPORTED_SAFETENSORS.into(),
            })
        }
    };
    let fc = FamilyConfig {
        arch,
        hidden: c.hidden_size,
        layers: c.num_hidden_layers,
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
        head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
        intermediate: c.intermediate_size,
        vocab: c.vocab_size,
        eps: c.rms_norm_eps.unwrap_or(1e-6),
        rope_base: c.rope_theta.unwrap_or(10000.0) as f32,
        rope_local_base: 10000.0,
        rope_interleaved: false,
        sliding_window: None,
        sliding_pattern: 1,
        activation: Activation::Silu,
        embed_scale: None,
        context_length: c.max_position_embeddings.unwrap_or(4096),
    };
    Ok((
        HfConfigSummary {
            model_type: mt,
            torch_dtype: c.torch_dtype.unwrap_or_else(|| "unknown".into()),
        },
        fc,
    ))
}

pub struct HfConfigSummary {
    pub model_type: String,
    pub torch_dtype: String,
}

fn load_safetensors(dir: &Path, device: &Device, progress: Progress<'_>) -> Result<LoadedModel> {
    let (summary, cfg) = read_hf_config(dir)?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EngineError::MissingFile {
            path: dir.display().to_string(),
            what: "*.safetensors weights".into(),
        });
    }
    let mut src = sources::SafetensorsSource::open(&files, device, progress)?;
    let file_dtype = src.dtype();
    // The CPU computes in f32 (Candle's CPU bf16 matmul is slow); GPUs keep the file's dtype.
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        file_dtype
    };
    let ctx = cfg.context_length;
    let vocab = cfg.vocab;
    let m = FamilyModel::load(cfg, &mut src, device, dtype)?;
    Ok(LoadedModel {
        info: ModelInfo {
            id: model_id(dir),
            path: dir.display().to_string(),
            architecture: summary.model_type,
            parameters: src.parameter_count(),
            quantization: format!("{file_dtype:?}").to_lowercase(),
            context_length: ctx,
            vocab_size: vocab,
            memory_bytes: src.parameter_count() * dtype.size_in_bytes() as u64,
            format: "safetensors".into(),
        },
        network: Network::Family(m),
        tokenizer,
        device: device.clone(),
    })
}
