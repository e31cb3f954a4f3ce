//! Our own forward pass for the llama family (llama / SmolLM2 / TinyLlama / Mistral,
//! qwen2, qwen3, gemma3), from GGUF (quantized) or SafeTensors (f32/f16/bf16) weights.
//!
//! Why not Candle's model files: they keep one KV cache inside the model, so only one
//! sequence can run at a time. Here the KV cache belongs to the sequence ([`SeqCache`])
//! and [`FamilyModel::forward`] takes a ragged batch: any number of sequences, each
//! with any number of new tokens at its own position. All matmuls run once over the
//! stacked tokens (weights are read once per step, whatever the batch size); only
//! attention runs per sequence, over that sequence's own cache. Prefill, decode and a
//! mix of both are the same call. The unit tests check the logits against Candle's
//! reference implementations on the same files.

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::kv_cache::KvCache;
use candle_nn::RmsNorm;
use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use super::qcpu::QMat;

use crate::error::Result;
use crate::profile;

/// Architecture quirks that differ inside the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    GeluTanh,
}

#[derive(Debug, Clone)]
pub struct FamilyConfig {
    pub arch: Arch,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub eps: f64,
    pub rope_base: f32,
    /// Gemma 3's sliding-window layers use a second RoPE base.
    pub rope_local_base: f32,
    /// GGUF llama files store Q/K permuted for llama.cpp's interleaved ("normal") RoPE;
    /// HF SafeTensors and the other architectures use the half-split ("neox") form.
    pub rope_interleaved: bool,
    pub sliding_window: Option<usize>,
    /// Gemma 3: every `sliding_pattern`-th layer is global, the others use the window.
    pub sliding_pattern: usize,
    pub activation: Activation,
    pub embed_scale: Option<f64>,
    pub context_length: usize,
}

/// A weight matrix: our AVX2 kernel for CPU Q4_1/Q5_0 ([`qcpu`]), Candle's otherwise.
enum Mat {
    Candle(QMatMul),
    Cpu(QMat),
}

struct Linear {
    w: Mat,
    b: Option<Tensor>,
}

/// Above this many rows Candle's CUDA quantized matmul switches from its matrix-vector
/// kernels to the matrix-matrix ones (MMQ), whose 8-bit activation rounding measured
/// 1.3x the CPU kernels' error against the exact product on the H100 (the vector kernels:
/// 0.7x; `bench/results/gpu-h100/`). There we dequantize the weight and use cuBLAS on the
/// tensor cores in TF32 (10-bit mantissas, f32 sums: ~1e-4 relative, still well inside
/// the MMQ's error; plain f32 GEMM made a 256-token prefill chunk ~4x slower).
const CUDA_MMQ_ROWS: usize = 8;

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(x.rank() - 1)?;
        let y = match &self.w {
            Mat::Candle(QMatMul::QTensor(q)) if x.device().is_cuda() && rows > CUDA_MMQ_ROWS => {
                let w = q.dequantize(x.device())?;
                tf32_matmul(x, &w)?
            }
            Mat::Candle(m) => m.forward(x)?,
            Mat::Cpu(m) => m.forward(x)?,
        };
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Decode attention on the CPU (one new token per sequence), straight over each cache's
/// memory and spread over Candle's worker threads by (sequence, head): through Candle's ops
/// it is a dozen small operations per sequence and layer, run one after another (~15% of
/// an 8-sequence step of SmolLM2 on two cores). `q` is the step's `[tokens, heads, d]`
/// after RoPE; `items` are the decoding items, `spans[i].0` the row of item i's token,
/// `caches[i]` its `[kv_heads, L, d]` keys and values with the new position last. Returns
/// `[items.len(), heads * d]`; `None` (Candle's path) for other devices, dtypes or layouts.
fn cpu_decode_attention(
    (heads, kv_heads, d): (usize, usize, usize),
    q: &Tensor,
    items: &[usize],
    spans: &[(usize, usize, usize)],
    caches: &[(Tensor, Tensor)],
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    use candle_core::{CpuStorage, Storage};
    if !q.device().is_cpu() || q.dtype() != DType::F32 {
        return Ok(None);
    }
    let n = items.len();
    let q: Vec<f32> = q.flatten_all()?.to_vec1()?;
    let guards: Vec<_> = items
        .iter()
        .flat_map(|&i| {
            [
                caches[i].0.storage_and_layout(),
                caches[i].1.storage_and_layout(),
            ]
        })
        .collect();
    // per sequence and for keys then values: (data, offset, head stride, position stride, L)
    let mut views: Vec<(&[f32], usize, usize, usize, usize)> = Vec::with_capacity(2 * n);
    for (st, l) in &guards {
        let Storage::Cpu(CpuStorage::F32(data)) = &**st else {
            return Ok(None);
        };
        match (l.dims(), l.stride()) {
            ([kv, len, dd], [s0, s1, 1]) if *kv == kv_heads && *dd == d => {
                views.push((data.as_slice(), l.start_offset(), *s0, *s1, *len))
            }
            _ => return Ok(None),
        }
    }
    let g = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; n * heads * d];
    let out_ptr = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(n * heads, |tasks| {
        let mut sc = Vec::new();
        for task in tasks {
            let (i, h) = (task / heads, task % heads);
            let (kd, ko, ks0, ks1, len) = views[2 * i];
            let (vd, vo, vs0, vs1, _) = views[2 * i + 1];
            let first = match window {
                Some(w) if len > w => len - w,
                _ => 0,
            };
            let row = spans[items[i]].0;
            let qh = &q[(row * heads + h) * d..(row * heads + h + 1) * d];
            let (kb, vb) = (ko + (h / g) * ks0, vo + (h / g) * vs0);
            sc.clear();
            let mut mx = f32::NEG_INFINITY;
            for j in first..len {
                let kr = &kd[kb + j * ks1..kb + j * ks1 + d];
                let s = qh.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale;
                mx = mx.max(s);
                sc.push(s);
            }
            let mut den = 0f32;
            for s in sc.iter_mut() {
                *s = (*s - mx).exp();
                den += *s;
            }
            // SAFETY: execute_chunked hands out disjoint task ranges and each task writes
            // only its own (sequence, head) slice of `out`, which outlives the call.
            let o =
                unsafe { std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(task * d), d) };
            o.fill(0.0);
            for (j, &p) in (first..len).zip(sc.iter()) {
                let vr = &vd[vb + j * vs1..vb + j * vs1 + d];
                for (oe, ve) in o.iter_mut().zip(vr) {
                    *oe += p * ve;
                }
            }
            for oe in o.iter_mut() {
                *oe /= den;
            }
        }
    });
    drop(views);
    drop(guards);
    Ok(Some(Tensor::from_vec(out, (n, heads * d), &Device::Cpu)?))
}

/// `x @ w^T` with Candle's f32 GEMM allowed to use TF32 for this product only (Candle's
/// switch is process-wide; the engine thread is the only one running model operations).
fn tf32_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda::{gemm_reduced_precision_f32, set_gemm_reduced_precision_f32};
        let before = gemm_reduced_precision_f32();
        set_gemm_reduced_precision_f32(true);
        let y = x.broadcast_matmul(&w.t()?);
        set_gemm_reduced_precision_f32(before);
        Ok(y?)
    }
    #[cfg(not(feature = "cuda"))]
    Ok(x.broadcast_matmul(&w.t()?)?)
}

/// Projections that read the same input (Q/K/V, gate/up). Stacked into one matrix when
/// their storage types agree, so a decode step quantizes the input once and launches one
/// matmul instead of two or three (on CUDA each saved launch is ~5 us per layer).
enum Proj {
    Fused(Linear, Vec<usize>),
    Split(Vec<Linear>),
}

impl Proj {
    /// One output per projection, `[n, size_i]`, in the order they were loaded.
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Proj::Split(ls) => ls.iter().map(|l| l.forward(x)).collect(),
            Proj::Fused(l, sizes) => {
                let y = l.forward(x)?;
                let last = y.rank() - 1;
                let mut off = 0;
                let mut out = Vec::with_capacity(sizes.len());
                for &sz in sizes {
                    out.push(y.narrow(last, off, sz)?);
                    off += sz;
                }
                Ok(out)
            }
        }
    }
}

struct Layer {
    attn_norm: RmsNorm,
    qkv: Proj,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    gate_up: Proj,
    down: Linear,
    post_ffn_norm: Option<RmsNorm>,
    window: Option<usize>,
    rope_base: f32,
}

/// A weight as loaded, before it becomes a matmul: dense, or quantized blocks.
enum Weight {
    Dense(Tensor),
    Quant(Arc<QTensor>),
}

fn load_weight(src: &mut dyn WeightSource, name: &str, dtype: DType) -> Result<Weight> {
    Ok(match src.dense(name, dtype)? {
        Some(t) => Weight::Dense(t),
        None => Weight::Quant(src.matrix(name)?),
    })
}

fn load_bias(
    src: &mut dyn WeightSource,
    name: &str,
    bias: bool,
    dtype: DType,
) -> Result<Option<Tensor>> {
    let bname = format!("{name}.bias");
    Ok(if bias && src.has(&bname) {
        Some(src.vector(&bname, dtype)?)
    } else {
        None
    })
}

impl Weight {
    fn rows(&self) -> usize {
        match self {
            Weight::Dense(t) => t.dims()[0],
            Weight::Quant(q) => q.shape().dims()[0],
        }
    }

    fn into_mat(self) -> Result<Mat> {
        Ok(match self {
            Weight::Dense(t) => Mat::Candle(QMatMul::Tensor(t)),
            Weight::Quant(q) => match QMat::from_qtensor(&q)? {
                Some(m) => Mat::Cpu(m),
                None => Mat::Candle(QMatMul::from_arc(q)?),
            },
        })
    }

    /// Stacks the parts along the output rows when they share storage type and width
    /// (a GGUF row is whole blocks, so stacking is concatenating bytes); `None` otherwise.
    fn fuse(ws: &[Weight], device: &Device) -> Result<Option<Weight>> {
        let mut dense = Vec::new();
        let mut quant = Vec::new();
        for w in ws {
            match w {
                Weight::Dense(t) => dense.push(t.clone()),
                Weight::Quant(q) => quant.push(q.clone()),
            }
        }
        if dense.len() == ws.len() {
            return Ok(Some(Weight::Dense(Tensor::cat(&dense, 0)?)));
        }
        if quant.len() != ws.len() {
            return Ok(None);
        }
        let dt = quant[0].dtype();
        let k = quant[0].shape().dims().get(1).copied();
        if quant.iter().any(|q| {
            q.dtype() != dt || q.shape().rank() != 2 || q.shape().dims().get(1).copied() != k
        }) {
            return Ok(None);
        }
        let mut bytes = Vec::new();
        for q in &quant {
            bytes.extend_from_slice(&q.data()?);
        }
        let n: usize = quant.iter().map(|q| q.shape().dims()[0]).sum();
        let storage = QStorage::from_data(Cow::Owned(bytes), device, dt)?;
        Ok(Some(Weight::Quant(Arc::new(QTensor::new(
            storage,
            (n, k.unwrap_or(0)),
        )?))))
    }
}

/// cos/sin for positions `0..len` at one RoPE base, on the device, built once and grown
/// by doubling: a decode step then takes a view (or one gather for a mixed batch)
/// instead of computing and uploading tables.
struct RopeTable {
    base: f32,
    len: usize,
    cos: Tensor,
    sin: Tensor,
}

/// Where weights come from: GGUF tensors or a SafeTensors folder, under GGUF's names.
pub trait WeightSource {
    /// A matrix for a matmul; quantized stays quantized.
    fn matrix(&mut self, name: &str) -> Result<Arc<QTensor>>;
    /// A dense tensor (norm weights, biases) in the compute dtype.
    fn vector(&mut self, name: &str, dtype: DType) -> Result<Tensor>;
    fn has(&self, name: &str) -> bool;
    /// Dense weights are used as `QMatMul::Tensor` in this dtype.
    fn dense(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>>;
}

enum Embedding {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

/// One sequence's KV cache: per layer, keys and values of shape `[kv_heads, len, head_dim]`.
pub struct SeqCache {
    layers: Vec<KvCache>,
    len: usize,
    /// Set when the cache lives in the model's [`KvPool`] (then `layers` is empty).
    slot: Option<Slot>,
}

/// A sequence's claim on one row of the [`KvPool`]; given back when the sequence ends.
struct Slot {
    idx: usize,
    free: Arc<Mutex<Vec<usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
        f.push(self.idx);
        // lowest first: running sequences stay packed at the front of the pool
        f.sort_unstable_by(|a, b| b.cmp(a));
    }
}

/// Preallocated KV caches for up to `slots` sequences of `cap` positions, per layer
/// `[slots, kv_heads, cap, head_dim]`, on the device. Why: with per-sequence caches a decode
/// step launches ~7 operations per sequence per layer for attention, which on a GPU costs
/// more than the math (launch-bound). With every cache in one tensor, a decode step over
/// any number of sequences is one scatter write of the new keys/values and one masked
/// attention per layer.
struct KvPool {
    slots: usize,
    cap: usize,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    free: Arc<Mutex<Vec<usize>>>,
}

/// Per-step tensors for the pooled decode path, shared by all layers.
struct PooledStep {
    /// Rows of the attention batch: `0..rows`, the highest slot in use plus one.
    rows: usize,
    /// Longest cache in the step (attention runs over `0..lmax`).
    lmax: usize,
    /// Each item's slot, `[n]` u32.
    slot_ids: Tensor,
    /// Item i sits in slot i: queries and outputs need no placing or gathering.
    packed: bool,
    /// Row in the `[slots * kv * cap, d]` view of the pool for each new key/value row.
    scatter: Tensor,
    /// Additive masks `[rows, 1, 1, lmax]` per window kind: (window, mask).
    masks: Vec<(Option<usize>, Tensor)>,
}

impl SeqCache {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One item's result of a step.
pub enum RowOut {
    /// The greedy pick, made on the device.
    Picked { id: u32, logprob: f32 },
    /// The last token's logits (`vocab` f32).
    Logits(Vec<f32>),
}

/// One entry of a ragged batch: new tokens for one sequence, appended at `cache.len()`.
pub struct BatchItem<'a> {
    pub cache: &'a mut SeqCache,
    pub tokens: &'a [u32],
}

pub struct FamilyModel {
    pub cfg: FamilyConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    device: Device,
    dtype: DType,
    rope: Mutex<Vec<RopeTable>>,
    pool: Option<KvPool>,
    /// Decode steps through our fused kernels as CUDA graphs (see [`super::graph`]).
    #[cfg(feature = "cuda")]
    /// Boxed: the decoder's tables are large and most models' enum values never hold one.
    graph: Option<Box<Mutex<super::graph::GraphDecoder>>>,
}

/// Grow KV caches in chunks of this many positions (allocation amortised, memory bounded).
const KV_CHUNK: usize = 256;

impl FamilyModel {
    pub fn load(
        cfg: FamilyConfig,
        src: &mut dyn WeightSource,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let lin = |src: &mut dyn WeightSource, name: &str, bias: bool| -> Result<Linear> {
            let w = load_weight(src, &format!("{name}.weight"), dtype)?;
            let b = load_bias(src, name, bias, dtype)?;
            Ok(Linear {
                w: w.into_mat()?,
                b,
            })
        };
        let proj = |src: &mut dyn WeightSource, names: &[String], bias: bool| -> Result<Proj> {
            let mut ws = Vec::with_capacity(names.len());
            let mut bs = Vec::with_capacity(names.len());
            for name in names {
                ws.push(load_weight(src, &format!("{name}.weight"), dtype)?);
                bs.push(load_bias(src, name, bias, dtype)?);
            }
            let sizes: Vec<usize> = ws.iter().map(|w| w.rows()).collect();
            let fused_b = if bs.iter().all(|b| b.is_some()) {
                let v: Vec<Tensor> = bs.iter().flatten().cloned().collect();
                Some(Some(Tensor::cat(&v, 0)?))
            } else if bs.iter().all(|b| b.is_none()) {
                Some(None)
            } else {
                None
            };
            match (fused_b, Weight::fuse(&ws, device)?) {
                (Some(b), Some(w)) => Ok(Proj::Fused(
                    Linear {
                        w: w.into_mat()?,
                        b,
                    },
                    sizes,
                )),
                _ => Ok(Proj::Split(
                    ws.into_iter()
                        .zip(bs)
                        .map(|(w, b)| {
                            Ok(Linear {
                                w: w.into_mat()?,
                                b,
                            })
                        })
                        .collect::<Result<_>>()?,
                )),
            }
        };
        let norm = |src: &mut dyn WeightSource, name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::new(
                src.vector(&format!("{name}.weight"), dtype)?,
                cfg.eps,
            ))
        };
        let opt_norm = |src: &mut dyn WeightSource, name: &str| -> Result<Option<RmsNorm>> {
            if src.has(&format!("{name}.weight")) {
                Ok(Some(norm(src, name)?))
            } else {
                Ok(None)
            }
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("blk.{i}");
            let is_sliding = cfg.arch == Arch::Gemma3 && (i + 1) % cfg.sliding_pattern.max(1) != 0;
            let window = if is_sliding { cfg.sliding_window } else { None };
            layers.push(Layer {
                attn_norm: norm(src, &format!("{p}.attn_norm"))?,
                qkv: proj(
                    src,
                    &[
                        format!("{p}.attn_q"),
                        format!("{p}.attn_k"),
                        format!("{p}.attn_v"),
                    ],
                    true,
                )?,
                o: lin(src, &format!("{p}.attn_output"), false)?,
                q_norm: opt_norm(src, &format!("{p}.attn_q_norm"))?,
                k_norm: opt_norm(src, &format!("{p}.attn_k_norm"))?,
                post_attn_norm: opt_norm(src, &format!("{p}.post_attention_norm"))?,
                ffn_norm: norm(src, &format!("{p}.ffn_norm"))?,
                gate_up: proj(
                    src,
                    &[format!("{p}.ffn_gate"), format!("{p}.ffn_up")],
                    false,
                )?,
                down: lin(src, &format!("{p}.ffn_down"), false)?,
                post_ffn_norm: opt_norm(src, &format!("{p}.post_ffw_norm"))?,
                window,
                rope_base: if is_sliding {
                    cfg.rope_local_base
                } else {
                    cfg.rope_base
                },
            });
        }
        let norm_out = norm(src, "output_norm")?;
        let (embed, tied) = match load_weight(src, "token_embd.weight", dtype)? {
            Weight::Dense(t) => (Embedding::Dense(t.clone()), Weight::Dense(t)),
            Weight::Quant(q) => (Embedding::Quantized(q.clone()), Weight::Quant(q)),
        };
        let head = if src.has("output.weight") {
            load_weight(src, "output.weight", dtype)?
        } else {
            tied
        };
        Ok(Self {
            cfg,
            embed,
            layers,
            norm: norm_out,
            lm_head: Linear {
                w: head.into_mat()?,
                b: None,
            },
            device: device.clone(),
            dtype,
            rope: Mutex::new(Vec::new()),
            pool: None,
            #[cfg(feature = "cuda")]
            graph: None,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> SeqCache {
        if let Some(p) = &self.pool {
            let idx = p.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
            if let Some(idx) = idx {
                return SeqCache {
                    layers: vec![],
                    len: 0,
                    slot: Some(Slot {
                        idx,
                        free: p.free.clone(),
                    }),
                };
            }
        }
        // no pool, or all slots taken: a growable cache of its own (correct, slower on GPU)
        SeqCache {
            layers: (0..self.cfg.layers)
                .map(|_| KvCache::new(1, KV_CHUNK))
                .collect(),
            len: 0,
            slot: None,
        }
    }

    /// Preallocates a [`KvPool`] of `slots` sequences × `cap` positions. Sequences created
    /// afterwards take a slot while one is free. Costs `slots * cap * kv_bytes_per_token`.
    pub fn enable_kv_pool(&mut self, slots: usize, cap: usize) -> Result<()> {
        let c = &self.cfg;
        let shape = (slots, c.kv_heads, cap, c.head_dim);
        let mut k = Vec::with_capacity(c.layers);
        let mut v = Vec::with_capacity(c.layers);
        for _ in 0..c.layers {
            k.push(Tensor::zeros(shape, self.dtype, &self.device)?);
            v.push(Tensor::zeros(shape, self.dtype, &self.device)?);
        }
        self.pool = Some(KvPool {
            slots,
            cap,
            k,
            v,
            free: Arc::new(Mutex::new((0..slots).rev().collect())),
        });
        #[cfg(feature = "cuda")]
        self.enable_graph();
        Ok(())
    }

    /// Appends one sequence's new keys/values (`[KV, T, d]`) at `p0` and returns its whole
    /// cache (`[KV, p0 + T, d]`, a view).
    fn append(
        &self,
        cache: &mut SeqCache,
        li: usize,
        p0: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        match (&cache.slot, &self.pool) {
            (Some(slot), Some(p)) => {
                let t = k.dim(1)?;
                if p0 + t > p.cap {
                    return Err(crate::error::EngineError::Device(format!(
                        "sequence of {} positions exceeds the KV pool's {}",
                        p0 + t,
                        p.cap
                    )));
                }
                let mut out = Vec::with_capacity(2);
                for (pool, x) in [(&p.k[li], k), (&p.v[li], v)] {
                    let row = pool.narrow(0, slot.idx, 1)?;
                    row.slice_set(&x.unsqueeze(0)?.contiguous()?, 2, p0)?;
                    out.push(row.squeeze(0)?.narrow(1, 0, p0 + t)?);
                }
                let v = out.pop().unwrap();
                Ok((out.pop().unwrap(), v))
            }
            _ => Ok(cache.layers[li].append(k, v)?),
        }
    }

    /// The pooled decode path applies when every item feeds one token from a pool slot.
    fn pooled_step(&self, items: &[BatchItem<'_>]) -> Result<Option<PooledStep>> {
        let Some(p) = &self.pool else {
            return Ok(None);
        };
        // one sequence: its own view of the slot is cheaper (fewer launches) than the
        // batched masked path
        if items.len() < 2 {
            return Ok(None);
        }
        let mut slots = Vec::with_capacity(items.len());
        for it in items {
            match &it.cache.slot {
                Some(s) if it.tokens.len() == 1 && it.cache.len < p.cap => {
                    slots.push((s.idx, it.cache.len))
                }
                _ => return Ok(None),
            }
        }
        let c = &self.cfg;
        let rows = slots.iter().map(|&(s, _)| s + 1).max().unwrap_or(1);
        let lmax = slots.iter().map(|&(_, pos)| pos + 1).max().unwrap_or(1);
        let n = slots.len();
        let mut scatter = Vec::with_capacity(n * c.kv_heads * c.head_dim);
        for &(s, pos) in &slots {
            for h in 0..c.kv_heads {
                let r = ((s * c.kv_heads + h) * p.cap + pos) as u32;
                scatter.extend(std::iter::repeat_n(r, c.head_dim));
            }
        }
        let scatter = Tensor::from_vec(scatter, (n * c.kv_heads, c.head_dim), &self.device)?;
        let packed = slots.iter().enumerate().all(|(i, &(s, _))| s == i);
        let ids: Vec<u32> = slots.iter().map(|&(s, _)| s as u32).collect();
        let slot_ids = Tensor::from_vec(ids, n, &self.device)?;
        let mut masks = Vec::new();
        for layer in &self.layers {
            if masks.iter().any(|(w, _)| *w == layer.window) {
                continue;
            }
            // rows without a sequence see position 0 only (finite softmax, result unused)
            let mut m = vec![f32::NEG_INFINITY; rows * lmax];
            for r in 0..rows {
                m[r * lmax] = 0.0;
            }
            for &(s, pos) in &slots {
                for j in 0..=pos {
                    let visible = layer.window.is_none_or(|w| pos - j < w);
                    m[s * lmax + j] = if visible { 0.0 } else { f32::NEG_INFINITY };
                }
            }
            let m = Tensor::from_vec(m, (rows, 1, 1, lmax), &self.device)?;
            masks.push((layer.window, m));
        }
        Ok(Some(PooledStep {
            rows,
            lmax,
            slot_ids,
            packed,
            scatter,
            masks,
        }))
    }

    /// Decode attention for all items at once over the pool (see [`KvPool`]).
    fn pooled_attention(
        &self,
        st: &PooledStep,
        li: usize,
        window: Option<usize>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let p = self.pool.as_ref().expect("pooled step without a pool");
        let n = q.dim(0)?;
        let flat = (p.slots * c.kv_heads * p.cap, c.head_dim);
        for (pool, x) in [(&p.k[li], k), (&p.v[li], v)] {
            let x = x.contiguous()?.reshape((n * c.kv_heads, c.head_dim))?;
            pool.reshape(flat)?.scatter_set(&st.scatter, &x, 0)?;
        }
        let g = c.heads / c.kv_heads;
        // queries placed at their slot's row: the pool needs no gather
        let q = q.reshape((n, c.heads * c.head_dim))?;
        let qs = if st.packed {
            q
        } else {
            Tensor::zeros((st.rows, c.heads * c.head_dim), q.dtype(), &self.device)?.index_add(
                &st.slot_ids,
                &q,
                0,
            )?
        }
        .reshape((st.rows, c.kv_heads, g, c.head_dim))?;
        let kk = p.k[li].narrow(0, 0, st.rows)?.narrow(2, 0, st.lmax)?;
        let vv = p.v[li].narrow(0, 0, st.rows)?.narrow(2, 0, st.lmax)?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let sc = (qs.matmul(&kk.t()?)? * scale)?.to_dtype(DType::F32)?; // [rows, KV, G, lmax]
        let mask = &st.masks.iter().find(|(w, _)| *w == window).unwrap().1;
        let pr = candle_nn::ops::softmax_last_dim(&sc.broadcast_add(mask)?)?.to_dtype(v.dtype())?;
        let o = pr.matmul(&vv)?.reshape((st.rows, c.heads * c.head_dim))?;
        Ok(if st.packed {
            o
        } else {
            o.index_select(&st.slot_ids, 0)?
        })
    }

    /// Rows one step can put through the CUDA graph (0 without one).
    pub fn graph_rows(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.graph {
            return g.lock().unwrap_or_else(|e| e.into_inner()).max_batch();
        }
        0
    }

    /// Bytes of KV cache one token of context costs.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.layers * self.cfg.kv_heads * self.cfg.head_dim * self.dtype.size_in_bytes()
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let x = match &self.embed {
            Embedding::Quantized(q) => q.embedding(ids)?,
            Embedding::Dense(w) => w.index_select(ids, 0)?,
        };
        let x = x.to_dtype(self.dtype)?;
        Ok(match self.cfg.embed_scale {
            Some(s) => (x * s)?,
            None => x,
        })
    }

    /// cos/sin tables `[n, 1, head_dim/2]` for the given absolute positions.
    fn rope_tables(&self, positions: &[usize], base: f32) -> Result<(Tensor, Tensor)> {
        let half = self.cfg.head_dim / 2;
        let n = positions.len();
        let need = positions.iter().max().map_or(0, |p| p + 1);
        let mut tables = self.rope.lock().unwrap_or_else(|e| e.into_inner());
        let idx = match tables.iter().position(|t| t.base == base) {
            Some(i) if tables[i].len >= need => i,
            found => {
                let len = need.next_power_of_two().max(256);
                let inv: Vec<f32> = (0..half)
                    .map(|i| 1f32 / base.powf((2 * i) as f32 / self.cfg.head_dim as f32))
                    .collect();
                let mut cos = Vec::with_capacity(len * half);
                let mut sin = Vec::with_capacity(len * half);
                for p in 0..len {
                    for &f in &inv {
                        let a = p as f32 * f;
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
                let t = RopeTable {
                    base,
                    len,
                    cos: Tensor::from_vec(cos, (len, half), &self.device)?.to_dtype(self.dtype)?,
                    sin: Tensor::from_vec(sin, (len, half), &self.device)?.to_dtype(self.dtype)?,
                };
                match found {
                    Some(i) => {
                        tables[i] = t;
                        i
                    }
                    None => {
                        tables.push(t);
                        tables.len() - 1
                    }
                }
            }
        };
        let t = &tables[idx];
        let p0 = positions.first().copied().unwrap_or(0);
        let (cos, sin) = if positions.iter().enumerate().all(|(i, &p)| p == p0 + i) {
            (t.cos.narrow(0, p0, n)?, t.sin.narrow(0, p0, n)?)
        } else {
            let ids: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
            let ids = Tensor::from_vec(ids, n, &self.device)?;
            (t.cos.index_select(&ids, 0)?, t.sin.index_select(&ids, 0)?)
        };
        Ok((cos.reshape((n, 1, half))?, sin.reshape((n, 1, half))?))
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(if self.cfg.rope_interleaved {
            candle_nn::rotary_emb::rope_i(x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(x, cos, sin)?
        })
    }

    /// Runs the new tokens of every item through the model, appends their keys and values
    /// to each item's cache, and returns the logits of each item's last token:
    /// `[items, vocab]`, f32.
    pub fn forward(&self, items: &mut [BatchItem<'_>]) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(rows) = self.graph_forward(items, &vec![false; items.len()])? {
            let mut out = Vec::with_capacity(rows.len() * self.cfg.vocab);
            for r in rows {
                match r {
                    RowOut::Logits(l) => out.extend_from_slice(&l),
                    RowOut::Picked { .. } => unreachable!("logits were asked for"),
                }
            }
            return Ok(Tensor::from_vec(
                out,
                (items.len(), self.cfg.vocab),
                &Device::Cpu,
            )?);
        }
        self.forward_candle(items)
    }

    /// [`Self::forward`] for the scheduler: an item marked in `greedy` may come back as its
    /// greedy pick alone (first token of largest logit, log-probability under the softmax)
    /// when the device can pick it, sparing the logits' download and scan.
    pub fn forward_rows(
        &self,
        items: &mut [BatchItem<'_>],
        greedy: &[bool],
    ) -> Result<Vec<RowOut>> {
        #[cfg(feature = "cuda")]
        if let Some(rows) = self.graph_forward(items, greedy)? {
            return Ok(rows);
        }
        let _ = greedy;
        let l = self.forward_candle(items)?.to_vec2::<f32>()?;
        Ok(l.into_iter().map(RowOut::Logits).collect())
    }

    /// [`Self::forward`] through Candle's operations.
    fn forward_candle(&self, items: &mut [BatchItem<'_>]) -> Result<Tensor> {
        let c = &self.cfg;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(items.len());
        for it in items.iter() {
            let start = ids.len();
            let p0 = it.cache.len;
            ids.extend_from_slice(it.tokens);
            positions.extend((0..it.tokens.len()).map(|i| p0 + i));
            spans.push((start, it.tokens.len(), p0));
        }
        let n = ids.len();
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.graph {
            // this forward writes to the KV pool outside the graph's steps
            g.lock().unwrap_or_else(|e| e.into_inner()).drop_ahead();
        }
        #[cfg(feature = "cuda")]
        let fast_rows = self.attention_rows_setup(items, &positions)?;
        #[cfg(not(feature = "cuda"))]
        let fast_rows: Option<Tensor> = None;
        let pooled = match fast_rows {
            Some(_) => None,
            None => self.pooled_step(items)?,
        };
        let ids_t = Tensor::from_vec(ids, n, &self.device)?;
        let t = profile::start();
        let mut x = self.embed(&ids_t)?; // [n, hidden]
        profile::stop("embed", t);
        let mut tables: Vec<(f32, Tensor, Tensor)> = Vec::new();
        for layer in &self.layers {
            if !tables.iter().any(|(b, _, _)| *b == layer.rope_base) {
                let (cs, sn) = self.rope_tables(&positions, layer.rope_base)?;
                tables.push((layer.rope_base, cs, sn));
            }
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let (_, cos, sin) = tables
                .iter()
                .find(|(b, _, _)| *b == layer.rope_base)
                .unwrap();
            let t = profile::start();
            let h = layer.attn_norm.forward(&x)?;
            profile::stop("attn_norm", t);
            let t = profile::start();
            let qkv = layer.qkv.forward(&h)?;
            profile::stop("qkv_matmul", t);
            #[cfg(feature = "cuda")]
            if let Some(rows) = &fast_rows {
                let t = profile::start();
                let attn = self.attention_by_rows(li, &qkv, rows)?;
                profile::stop("attention", t);
                x = self.layer_rest(layer, x, &attn)?;
                continue;
            }
            let t = profile::start();
            let q = qkv[0].reshape((n, c.heads, 1, c.head_dim))?;
            let k = qkv[1].reshape((n, c.kv_heads, 1, c.head_dim))?;
            let v = qkv[2].reshape((n, c.kv_heads, c.head_dim))?;
            let q = match &layer.q_norm {
                Some(nrm) => nrm.forward(&q.contiguous()?)?,
                None => q,
            };
            let k = match &layer.k_norm {
                Some(nrm) => nrm.forward(&k.contiguous()?)?,
                None => k,
            };
            let q = self.rope(&q.contiguous()?, cos, sin)?.squeeze(2)?; // [n, heads, d]
            let k = self.rope(&k.contiguous()?, cos, sin)?.squeeze(2)?; // [n, kv, d]
            profile::stop("qk_norm_rope", t);
            let t = profile::start();
            if let Some(st) = &pooled {
                let attn = self.pooled_attention(st, li, layer.window, &q, &k, &v)?;
                profile::stop("attention", t);
                x = self.layer_rest(layer, x, &attn)?;
                continue;
            }
            let mut caches = Vec::with_capacity(items.len());
            for (it, &(start, len, p0)) in items.iter_mut().zip(spans.iter()) {
                let ki = k.narrow(0, start, len)?.transpose(0, 1)?.contiguous()?; // [KV, T, d]
                let vi = v.narrow(0, start, len)?.transpose(0, 1)?.contiguous()?;
                caches.push(self.append(it.cache, li, p0, &ki, &vi)?); // [KV, L, d] each
            }
            // decoding items (one token) straight over their caches on the CPU, whatever else
            // is in the step, so a sequence's numbers do not depend on its neighbours
            let dec: Vec<usize> = (0..items.len()).filter(|&i| spans[i].1 == 1).collect();
            let dims = (c.heads, c.kv_heads, c.head_dim);
            let direct = match dec.is_empty() {
                true => None,
                false => cpu_decode_attention(dims, &q, &dec, &spans, &caches, layer.window)?,
            };
            let attn = match direct {
                Some(a) if dec.len() == items.len() => a,
                direct => {
                    let mut outs = Vec::with_capacity(items.len());
                    let mut next_dec = 0;
                    for (i, ((kc, vc), &(start, len, p0))) in caches.iter().zip(&spans).enumerate()
                    {
                        if let Some(a) = direct.as_ref().filter(|_| dec.get(next_dec) == Some(&i)) {
                            outs.push(a.narrow(0, next_dec, 1)?);
                            next_dec += 1;
                            continue;
                        }
                        let qi = q.narrow(0, start, len)?.transpose(0, 1)?.contiguous()?; // [H, T, d]
                        outs.push(self.attention(&qi, kc, vc, p0, layer.window)?);
                    }
                    if outs.len() == 1 {
                        outs.pop().unwrap()
                    } else {
                        Tensor::cat(&outs, 0)?
                    }
                }
            };
            profile::stop("attention", t);
            x = self.layer_rest(layer, x, &attn)?;
        }
        for (it, &(_, len, _)) in items.iter_mut().zip(spans.iter()) {
            it.cache.len += len;
        }
        let t = profile::start();
        let x = if spans.len() == 1 {
            x.narrow(0, n - 1, 1)?
        } else {
            let last: Vec<u32> = spans.iter().map(|&(s, l, _)| (s + l - 1) as u32).collect();
            let last = Tensor::from_vec(last, spans.len(), &self.device)?;
            x.index_select(&last, 0)?
        };
        let x = self.norm.forward(&x)?;
        let out = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        profile::stop("lm_head", t);
        Ok(out)
    }

    /// The rest of a layer after attention: output projection, residual, MLP, residual.
    fn layer_rest(&self, layer: &Layer, x: Tensor, attn: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        let t = profile::start();
        let mut a = layer.o.forward(attn)?;
        profile::stop("o_matmul", t);
        if let Some(nrm) = &layer.post_attn_norm {
            a = nrm.forward(&a)?;
        }
        let x = (x + a)?;
        let t = profile::start();
        let h = layer.ffn_norm.forward(&x)?;
        profile::stop("ffn_norm", t);
        let t = profile::start();
        let gu = layer.gate_up.forward(&h)?;
        let g = match c.activation {
            Activation::Silu => candle_nn::ops::silu(&gu[0])?,
            Activation::GeluTanh => gu[0].gelu()?,
        };
        profile::stop("gate_up_matmul_act", t);
        let t = profile::start();
        let gu = (g * &gu[1])?;
        let mut m = layer.down.forward(&gu)?;
        profile::stop("mul_down_matmul", t);
        if let Some(nrm) = &layer.post_ffn_norm {
            m = nrm.forward(&m)?;
        }
        Ok((x + m)?)
    }

    /// Attention of one sequence's `T` new queries (`[H, T, d]`) over its cache
    /// (`[KV, L, d]`, the new keys included). Query heads are grouped onto their KV head
    /// by a reshape, so GQA needs no copy of the cache.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        p0: usize,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (_, t, d) = q.dims3()?;
        let mut k = k.clone();
        let mut v = v.clone();
        let mut l = k.dim(1)?;
        let mut k0 = 0; // absolute position of the first key kept
        if let (Some(w), 1) = (window, t) {
            if l > w {
                k0 = l - w;
                k = k.narrow(1, k0, w)?;
                v = v.narrow(1, k0, w)?;
                l = w;
            }
        }
        let g = c.heads / c.kv_heads;
        let q = q.reshape((c.kv_heads, g * t, d))?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let mut s = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?; // [KV, G*T, L]
        if t > 1 {
            let mut mask = vec![0f32; t * l];
            for i in 0..t {
                let qp = p0 + i;
                for j in 0..l {
                    let kp = k0 + j;
                    let visible = kp <= qp && window.is_none_or(|w| qp - kp < w);
                    if !visible {
                        mask[i * l + j] = f32::NEG_INFINITY;
                    }
                }
            }
            let mask = Tensor::from_vec(mask, (t, l), &self.device)?;
            s = s
                .reshape((c.kv_heads, g, t, l))?
                .broadcast_add(&mask)?
                .reshape((c.kv_heads, g * t, l))?;
        }
        let p = candle_nn::ops::softmax_last_dim(&s)?.to_dtype(v.dtype())?;
        // The cache view is strided ([KV, L, d] of a longer buffer); matmul takes the
        // batch stride as is, so no copy of the values.
        let o = p.matmul(&v)?; // [KV, G*T, d]
        Ok(o.reshape((c.heads, t, d))?
            .transpose(0, 1)?
            .reshape((t, c.heads * d))?)
    }
}

#[cfg(feature = "cuda")]
impl FamilyModel {
    /// Sets up the CUDA-graph decoder when the model and the pool allow it; otherwise
    /// decode stays on the Candle path (the reason is logged).
    fn enable_graph(&mut self) {
        self.graph = None;
        let mode = std::env::var("LLORCH_CUDA_GRAPH").unwrap_or_default();
        if !self.device.is_cuda() || mode == "0" {
            return;
        }
        let made = self
            .graph_plan()
            .and_then(|plan| super::graph::GraphDecoder::new(plan, &self.device, mode == "eager"));
        match made {
            Ok(g) => {
                tracing::info!("decode steps run as CUDA graphs of fused kernels");
                self.graph = Some(Box::new(Mutex::new(g)));
            }
            Err(e) => tracing::info!(reason = %e, "decode steps stay on Candle's kernels"),
        }
    }

    /// For a Candle-path step of several sequences whose caches are all in the pool, where
    /// the graph decoder exists: each new token's (position, slot) and the count, on the device, for
    /// [`super::graph::GraphDecoder::attention_rows`]. `None` otherwise.
    fn attention_rows_setup(
        &self,
        items: &[BatchItem<'_>],
        positions: &[usize],
    ) -> Result<Option<Tensor>> {
        let (Some(_), Some(p)) = (&self.graph, &self.pool) else {
            return Ok(None);
        };
        // one sequence: Candle's attention is a few batched products over its chunk, fewer
        // launches and less work than a block per (head, token) here
        if items.len() < 2 {
            return Ok(None);
        }
        let n = positions.len();
        let mut rows = Vec::with_capacity(2 * n + 1);
        rows.extend(positions.iter().map(|&x| x as u32));
        for it in items {
            match &it.cache.slot {
                Some(s) if it.cache.len + it.tokens.len() <= p.cap => {
                    rows.extend(std::iter::repeat_n(s.idx as u32, it.tokens.len()))
                }
                _ => return Ok(None),
            }
        }
        rows.push(n as u32);
        Ok(Some(Tensor::from_vec(rows, 2 * n + 1, &self.device)?))
    }

    /// One layer's attention of a Candle-path step through the graph decoder's kernels.
    fn attention_by_rows(&self, li: usize, qkv: &[Tensor], rows: &Tensor) -> Result<Tensor> {
        let g = self
            .graph
            .as_ref()
            .expect("attention rows without a graph decoder");
        let qkv = if qkv.len() == 1 {
            qkv[0].contiguous()?
        } else {
            Tensor::cat(qkv, 1)?
        };
        let dec = g.lock().unwrap_or_else(|e| e.into_inner());
        dec.attention_rows(li, &qkv, rows)
    }

    /// What the graph decoder needs, or why it cannot run this model.
    fn graph_plan(&self) -> Result<super::graph::Plan> {
        use crate::error::EngineError;
        let c = &self.cfg;
        let no = |why: &str| EngineError::Device(format!("CUDA graph decode: {why}"));
        let q = |m: &Mat| -> Result<Arc<QTensor>> {
            match m {
                Mat::Candle(QMatMul::QTensor(q)) => Ok(q.clone()),
                _ => Err(no("dense or CPU weights")),
            }
        };
        let pool = self.pool.as_ref().ok_or_else(|| no("no KV pool"))?;
        if self.dtype != DType::F32 || c.activation != Activation::Silu || c.embed_scale.is_some() {
            return Err(no("needs f32 activations, SiLU and no embedding scale"));
        }
        let Embedding::Quantized(embed) = &self.embed else {
            return Err(no("dense embeddings"));
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            if l.q_norm.is_some()
                || l.k_norm.is_some()
                || l.post_attn_norm.is_some()
                || l.post_ffn_norm.is_some()
                || l.window.is_some()
                || l.rope_base != c.rope_base
                || l.o.b.is_some()
                || l.down.b.is_some()
            {
                return Err(no("layer structure beyond llama/qwen2"));
            }
            let qkv = match &l.qkv {
                Proj::Fused(lin, _) => vec![(q(&lin.w)?, lin.b.clone())],
                Proj::Split(ls) => ls
                    .iter()
                    .map(|lin| Ok((q(&lin.w)?, lin.b.clone())))
                    .collect::<Result<_>>()?,
            };
            let Proj::Fused(gu, _) = &l.gate_up else {
                return Err(no("gate and up projections of different types"));
            };
            if gu.b.is_some() {
                return Err(no("MLP biases"));
            }
            layers.push(super::graph::LayerPlan {
                attn_norm: l.attn_norm.weight().clone(),
                qkv,
                o: q(&l.o.w)?,
                ffn_norm: l.ffn_norm.weight().clone(),
                gate_up: q(&gu.w)?,
                down: q(&l.down.w)?,
            });
        }
        if self.lm_head.b.is_some() {
            return Err(no("output bias"));
        }
        Ok(super::graph::Plan {
            hidden: c.hidden,
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            intermediate: c.intermediate,
            vocab: c.vocab,
            eps: c.eps as f32,
            rope_base: c.rope_base,
            rope_interleaved: c.rope_interleaved,
            embed: embed.clone(),
            layers,
            out_norm: self.norm.weight().clone(),
            lm_head: q(&self.lm_head.w)?,
            kv: pool.k.iter().cloned().zip(pool.v.iter().cloned()).collect(),
            slots: pool.slots,
            cap: pool.cap,
        })
    }

    /// Items whose cache is in the pool go through the CUDA graph while its rows last (a
    /// row per new token: a decoding sequence takes one, a prompt chunk one per token); the
    /// rest of the step (longer chunks, caches outside the pool) through Candle. `None`
    /// when nothing fits.
    fn graph_forward(
        &self,
        items: &mut [BatchItem<'_>],
        greedy: &[bool],
    ) -> Result<Option<Vec<RowOut>>> {
        let (Some(g), Some(p)) = (&self.graph, &self.pool) else {
            return Ok(None);
        };
        let mut dec = g.lock().unwrap_or_else(|e| e.into_inner());
        let max = dec.max_batch();
        let mut rows = Vec::with_capacity(max);
        // each item's last row on the graph, if it went there; shortest items first, so
        // decoding sequences keep their rows when a prompt chunk would crowd them out
        let mut last: Vec<Option<usize>> = vec![None; items.len()];
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&k| items[k].tokens.len());
        let mut want_logits = false;
        for k in order {
            let it = &items[k];
            let t = it.tokens.len();
            if let Some(s) = &it.cache.slot {
                if t > 0 && it.cache.len + t <= p.cap && rows.len() + t <= max {
                    for (j, &tok) in it.tokens.iter().enumerate() {
                        rows.push((tok, it.cache.len + j, s.idx));
                    }
                    last[k] = Some(rows.len() - 1);
                    want_logits |= !greedy[k];
                }
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let t = profile::start();
        // the next step may go ahead when this one is the whole forward and all greedy
        let ahead = !want_logits && last.iter().all(Option::is_some);
        let out = dec.step(&rows, want_logits, ahead)?;
        drop(dec);
        profile::stop("cuda_graph_step", t);
        let mut rest: Vec<BatchItem<'_>> = Vec::new();
        for (it, l) in items.iter_mut().zip(&last) {
            if l.is_some() {
                it.cache.len += it.tokens.len();
            } else {
                rest.push(BatchItem {
                    cache: &mut *it.cache,
                    tokens: it.tokens,
                });
            }
        }
        let mut other = if rest.is_empty() {
            Vec::new()
        } else {
            self.forward_candle(&mut rest)?.to_vec2::<f32>()?
        }
        .into_iter();
        let v = self.cfg.vocab;
        let mut res = Vec::with_capacity(items.len());
        for (k, l) in last.iter().enumerate() {
            res.push(match (l, &out.logits) {
                (Some(r), _) if greedy[k] => {
                    let (id, logprob) = out.picks[*r];
                    RowOut::Picked { id, logprob }
                }
                (Some(r), Some(lg)) => RowOut::Logits(lg[r * v..(r + 1) * v].to_vec()),
                (Some(_), None) => unreachable!("logits are downloaded when an item needs them"),
                (None, _) => RowOut::Logits(other.next().expect("a Candle row per item left")),
            });
        }
        Ok(Some(res))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU decode attention against Candle's operations (the path it replaces), over
    /// a cache filled in two appends (a strided view of a longer buffer), with grouped
    /// query heads and peaked scores, with and without a sliding window.
    #[test]
    fn cpu_decode_attention_matches_candle_ops() {
        let dev = Device::Cpu;
        let (h, kvh, d, l) = (9usize, 3usize, 64usize, 11usize);
        let q = (Tensor::randn(0f32, 1.0, (2, h, d), &dev).unwrap() * 3.0).unwrap();
        let k = (Tensor::randn(0f32, 1.0, (kvh, l, d), &dev).unwrap() * 3.0).unwrap();
        let v = Tensor::randn(0f32, 1.0, (kvh, l, d), &dev).unwrap();
        let mut cache = KvCache::new(1, 256);
        let part = |t: &Tensor, a, n| t.narrow(1, a, n).unwrap().contiguous().unwrap();
        cache.append(&part(&k, 0, 6), &part(&v, 0, 6)).unwrap();
        let kv = cache.append(&part(&k, 6, 5), &part(&v, 6, 5)).unwrap();
        assert_eq!(
            kv.0.stride(),
            &[256 * d, d, 1],
            "a view of the longer buffer"
        );
        for window in [None, Some(4)] {
            // item 0 is a prefill (not computed here), item 1 decodes with q's row 1
            let spans = [(0, 0, 0), (1, 1, l - 1)];
            let caches = [kv.clone(), kv.clone()];
            let got = cpu_decode_attention((h, kvh, d), &q, &[1], &spans, &caches, window)
                .unwrap()
                .expect("f32 on the CPU takes the direct path");
            let first = window.map_or(0, |w| l - w);
            let (kk, vv) = (part(&k, first, l - first), part(&v, first, l - first));
            let qq = q
                .narrow(0, 1, 1)
                .unwrap()
                .reshape((kvh, h / kvh, d))
                .unwrap();
            let s = (qq.matmul(&kk.t().unwrap()).unwrap() * (1.0 / (d as f64).sqrt())).unwrap();
            let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
            let want = p.matmul(&vv).unwrap().reshape((1, h * d)).unwrap();
            let diff = (got - want).unwrap().abs().unwrap();
            let diff = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "window {window:?}: max |diff| {diff}");
        }
    }
}
