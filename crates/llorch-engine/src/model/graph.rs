//! Steps on CUDA as one replayed CUDA graph of our own fused kernels (`decode.cu`).
//!
//! Why: through Candle a decode step of a 22-layer model is ~450 operations at ~8-10 us of
//! host time each, so the GPU idles ~95% of the time (`bench/results/gpu-h100/`). Here a
//! step is 5 kernels per layer (RMS-normed quantized matrix-vector products with fused
//! bias / residual / SwiGLU, and one RoPE + KV write + attention kernel) over buffers
//! allocated once; tokens, positions, KV slots and the row count are read from device
//! memory, so each bucket (1, 2, 4, 8, 16, 32 rows) is captured once and every later step
//! is one small upload, one graph launch and one download of each row's greedy pick (the
//! logits too when a row samples).
//! A row is one new token: a decoding sequence's, or one of a prompt's (several rows of a
//! sequence at consecutive positions; then the keys and values of all rows are written
//! before attention, in a variant of the graph with a `kv_write` kernel).
//! A layer whose Q, K and V are of two types (Q4_K_M files keep about half the layers' V in
//! Q6_K) takes them as one product too (`mvx_*`), not one launch each: three dependent
//! launches cost ~5 us a layer more (H100, `bench/gpu/kernels.py ... vq6`).
//! Up to 8 rows the matrix products are warp-per-row integer dot products (`dp2a`) of the
//! weights' integers and the inputs rounded to 16 bits per 16 columns in shared memory,
//! scaled per 16 (relative error ~1e-5), on grids no larger than the GPU holds at once; they
//! apply the RMS norm before them themselves, and attention is split over chunks of
//! positions whose cached keys and values are copied ahead (a block per query head and
//! chunk up to 2 rows, per KV head and chunk from 3); from 16 on the products run on
//! the tensor cores (bf16 inputs, f32 sums; every weight read once for all rows) and
//! attention takes a block per KV head (its cache read once for the heads that share it).
//! [`GraphDecoder::attention_rows`] lends the attention kernels to Candle's path for prompt
//! chunks of several sequences.
//!
//! Applies to llama-family models whose KV caches live in the model's pool, with f32
//! activations and GGUF weights of the types the kernels read (Q4_0, Q4_1, Q5_0, Q8_0,
//! Q4_K, Q6_K); everything else (bf16 SafeTensors, Gemma 3, Qwen3's Q/K norms) stays on the
//! Candle path. `LLORCH_CUDA_GRAPH=0` turns it off. A step's kernels after the first are
//! launched with programmatic dependent launch (Hopper and later; a no-op before), so each
//! one's launch and weight loads overlap the tail of the one before (after a tensor-core
//! product, only at its end: measured faster, `MM` in `decode.cu`).
//! Greedy steps run one ahead: the next step is enqueued, fed this one's picks on the device,
//! before the host reads them ([`GraphDecoder::step`]; `LLORCH_DECODE_AHEAD=0` turns it off).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr,
    DriverError, LaunchConfig, PinnedHostSlice,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Storage, Tensor};

use super::buckets::{attention_for, Attention};
use crate::error::{EngineError, Result};

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/decode.fatbin"));

/// Largest batch a graph covers; the decoders of a bigger step beyond it take Candle's
/// pooled path.
pub const MAX_BATCH: usize = 32;
const BUCKETS: [usize; 6] = [1, 2, 4, 8, 16, 32];
/// Buckets from this size on use the tensor-core kernels (`mm_*`, `attention_group_*`).
const MM_FROM: usize = 16;
/// Warps (output rows at a time) per block of the matrix-vector kernels (`WARPS` in
/// decode.cu), warps and output rows per block of the tensor-core ones (`MM_WARPS`,
/// `MM_ROWS`), query heads per KV head that `attention_group` holds (`ATT_GMAX`), the
/// position chunks and their least size and the threads of `attention_split`
/// (`ATT_SPLITS`, `ATT_CHUNK`, `SPLIT_THREADS`).
const WARPS: usize = 16;
const MM_WARPS: usize = 8;
/// Warps per block of the tensor-core residual products (`MM_WARPS_R`).
const MM_WARPS_R: usize = 16;
const MM_ROWS: usize = 16;
const ATT_GMAX: usize = 8;
const ATT_SPLITS: usize = 16;
const ATT_CHUNK: usize = 32;
const SPLIT_THREADS: u32 = 128;
/// Threads of `attention_gqa` (`GQA_THREADS`), which buckets 4, 8 and 16 take: a block per
/// (KV head, chunk) reads the chunk once for its query heads. At 1 and 2 sequences the step
/// is faster with a block per query head (`attention_split`, `bench/gpu/kernels.py`: Q4_K
/// batch 1 0.635 vs 0.812 ms, batch 2 0.899 vs 0.974; batch 4 1.457 vs 1.372, batch 8 2.582
/// vs 2.217).
const GQA_THREADS: u32 = 256;
/// Dynamic shared memory a kernel may ask for: Hopper's 227 KiB per block less the kernels'
/// static arrays (~38 KiB) and a margin.
const SMEM_MAX: usize = 180 * 1024;
/// Shared memory of the matrix-vector kernels per sequence and 1024 columns of input: the
/// input rounded to 16-bit integers with its scales (`XQ_STEP` in decode.cu).
const XQ_STEP: usize = 2560;

/// Dynamic shared memory of a matrix-vector kernel: `nb` input rows of `k` columns rounded,
/// twice for a mixed product whose two types read them in different orders.
fn xq_bytes(k: usize, nb: usize, two_orders: bool) -> usize {
    (1 + two_orders as usize) * nb * k.div_ceil(1024) * XQ_STEP
}
const MODE_PLAIN: i32 = 0;
const MODE_RESID: i32 = 1;
const MODE_GLU: i32 = 2;

/// Floats of keys (and as many of values) that `attention_split` copies to shared memory
/// ahead (`ATT_PF`).
const ATT_PF: usize = 4096;

/// `attention_one` (the batch-1 bucket's attention, head size 64): positions a block copies
/// ahead (`ONE_CH`), its threads (`ONE_T`), the floats a cached row takes in its shared memory
/// (`ONE_DP`).
const ONE_CH: usize = 64;
const ONE_T: u32 = 512;
const ONE_DP: usize = 80;
/// SMs per KV head that the batch-1 bucket's QKV product leaves to `attention_one`'s blocks
/// (its chunks up to 640 positions), so they start beside it instead of after it.
const ONE_FREE: u32 = 10;

/// Dynamic shared memory of `attention_one` for `group` query heads per KV head: the copied
/// keys and values, each head's scores (`one_stride`: the longest chunk), the values' sums of
/// each of its 16 warps.
fn one_smem(cap: usize, group: usize) -> usize {
    let stride = ONE_CH.max(cap.div_ceil(ATT_SPLITS)).next_multiple_of(4);
    4 * (2 * ONE_CH * ONE_DP + group * stride + (ONE_T as usize / 32) * group * 64)
}

/// Dynamic shared memory of `attention_split` (`heads` 1) and `attention_gqa` (`heads`: the
/// query heads per KV head): a chunk's scores per head, then the keys and values it copies
/// ahead (`pf` floats of each) in rows padded by 4 floats.
fn split_smem(cap: usize, head_dim: usize, heads: usize, pf: usize) -> usize {
    let chunk = ATT_CHUNK.max(cap.div_ceil(ATT_SPLITS));
    4 * heads * chunk.next_multiple_of(4) + 2 * 4 * (pf / head_dim) * (head_dim + 4)
}

/// The weights of one layer as the kernels need them.
pub struct LayerPlan {
    pub attn_norm: Tensor,
    /// Q, K, V (fused or not), each with its bias.
    pub qkv: Vec<(Arc<QTensor>, Option<Tensor>)>,
    pub o: Arc<QTensor>,
    pub ffn_norm: Tensor,
    /// Gate and up stacked (`[2 * intermediate, hidden]`).
    pub gate_up: Arc<QTensor>,
    pub down: Arc<QTensor>,
}

/// Everything the decoder reads from the model, collected by `FamilyModel::graph_plan`.
pub struct Plan {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub eps: f32,
    pub rope_base: f32,
    pub rope_interleaved: bool,
    pub embed: Arc<QTensor>,
    pub layers: Vec<LayerPlan>,
    pub out_norm: Tensor,
    pub lm_head: Arc<QTensor>,
    /// The KV pool's per-layer keys and values, `[slots, kv_heads, cap, head_dim]` f32.
    pub kv: Vec<(Tensor, Tensor)>,
    pub slots: usize,
    pub cap: usize,
}

/// Matches `MvArgs` in decode.cu.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MvArgs {
    w: u64,
    x: u64,
    norm_next: u64,
    xn: u64,
    bias: u64,
    y: u64,
    part: u64,
    n: u64,
    row_bytes: u64,
    rows: i32,
    k: i32,
    ldy: i32,
    mode: i32,
    eps: f32,
    /// `norm_rows_f32`: blocks of the residual product before it (partial sums per row)
    parts: i32,
    /// `mv_*`: the weights of the RMS norm the kernel applies to `x` first (0: none)
    norm_in: u64,
}

/// A mixed QKV product's row ranges (`MvxArgs` in decode.cu after its `MvArgs`): the second
/// and third ranges' weights and bytes per row, where the first and second end, and which
/// ranges are of the kernel's second type (a bit each).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Segs {
    w1: u64,
    w2: u64,
    rb1: u64,
    rb2: u64,
    end0: i32,
    end1: i32,
    second: i32,
}

/// Matches `MvxArgs` in decode.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct MvxArgs {
    a: MvArgs,
    s: Segs,
}

/// The type pairs of the mixed QKV kernels (`mvx_<first>_<second>_p<rows>` in decode.cu):
/// Q4_K_M files keep some layers' V in Q6_K (or Q8_0 where a row is not whole 256-blocks),
/// files of the 32-wide types some in Q8_0.
const MIXED: [(&str, &str, &str); 5] = [
    ("q4_k", "q6_k", "q4_k_q6_k"),
    ("q4_k", "q8_0", "q4_k_q8_0"),
    ("q5_0", "q8_0", "q5_0_q8_0"),
    ("q4_0", "q8_0", "q4_0_q8_0"),
    ("q4_1", "q8_0", "q4_1_q8_0"),
];

/// Whether the kernels of types `a` and `b` read their inputs in different orders: then a
/// mixed kernel rounds its inputs twice (`Orders` in decode.cu).
fn two_orders(a: &str, b: &str) -> bool {
    a != b && (a.ends_with("_k") || b.ends_with("_k"))
}

/// A quantized matrix on the device: kernel family and geometry.
#[derive(Clone)]
struct Mat {
    /// The type's kernel name part; for a mixed QKV product both types' (`q4_k_q6_k`).
    tag: &'static str,
    /// A mixed QKV product (`mvx_*`; `ptr` and `row_bytes` are its first range's): its other
    /// ranges, and whether it rounds its inputs in two orders.
    mixed: Option<(Segs, bool)>,
    ptr: u64,
    rows: usize,
    k: usize,
    row_bytes: usize,
}

fn tag(dt: GgmlDType) -> Option<&'static str> {
    Some(match dt {
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q6K => "q6_k",
        _ => return None,
    })
}

fn drv(e: DriverError) -> EngineError {
    EngineError::Device(format!("CUDA: {e:?}"))
}

fn unsupported(what: String) -> EngineError {
    EngineError::Device(format!("CUDA graph decode: {what}"))
}

fn mat(q: &QTensor) -> Result<Mat> {
    let dt = q.dtype();
    let tag = tag(dt).ok_or_else(|| unsupported(format!("no kernel for {dt:?} weights")))?;
    let (rows, k) = q.shape().dims2()?;
    if !k.is_multiple_of(dt.block_size()) {
        return Err(unsupported(format!(
            "row of {k} is not whole {dt:?} blocks"
        )));
    }
    Ok(Mat {
        tag,
        mixed: None,
        ptr: q.device_ptr()? as u64,
        rows,
        k,
        row_bytes: k / dt.block_size() * dt.type_size(),
    })
}

/// A layer's Q, K and V as one mixed product where they are of the two types of a pair in
/// [`MIXED`] (else `None`): its geometry (rows: the whole QKV width) and row ranges, and the
/// three biases as one tensor (zeros for a matrix without) with its address.
#[allow(clippy::type_complexity)]
fn mixed_qkv(
    qkv: &[(Mat, u64, usize)],
    l: &LayerPlan,
    width: usize,
    stream: &CudaStream,
) -> Result<(Option<(Mat, u64)>, Option<Tensor>)> {
    let mut tags: Vec<&str> = qkv.iter().map(|(m, _, _)| m.tag).collect();
    tags.sort_unstable();
    tags.dedup();
    let pair = MIXED
        .iter()
        .find(|(a, b, _)| tags.len() == 2 && tags.contains(a) && tags.contains(b));
    let (Some(&(first, second, joined)), 2..=3) = (pair, qkv.len()) else {
        return Ok((None, None));
    };
    let (m0, m1) = (&qkv[0].0, &qkv[1].0);
    let mut segs = Segs {
        end0: m0.rows as i32,
        w1: m1.ptr,
        rb1: m1.row_bytes as u64,
        end1: (qkv[1].2 + m1.rows) as i32,
        ..Default::default()
    };
    if let Some((m2, _, _)) = qkv.get(2) {
        segs.w2 = m2.ptr;
        segs.rb2 = m2.row_bytes as u64;
    }
    segs.second = qkv
        .iter()
        .enumerate()
        .map(|(j, (m, _, _))| i32::from(m.tag == second) << j)
        .sum();
    let mat = Mat {
        tag: joined,
        mixed: Some((segs, two_orders(first, second))),
        rows: width,
        ..m0.clone()
    };
    let bias = match l.qkv.iter().find_map(|(_, b)| b.as_ref()) {
        Some(any) => {
            let parts = l
                .qkv
                .iter()
                .map(|(q, b)| match b {
                    Some(b) => Ok(b.clone()),
                    None => Tensor::zeros(q.shape().dims2()?.0, any.dtype(), any.device()),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&parts, 0)?.contiguous()?)
        }
        None => None,
    };
    let bias_ptr = match &bias {
        Some(b) => ptr(b, stream)?,
        None => 0,
    };
    Ok((Some((mat, bias_ptr)), bias))
}

/// Device address of a contiguous u32 tensor.
fn ptr_u32(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    let (st, layout) = t.storage_and_layout();
    match &*st {
        Storage::Cuda(cs) if t.is_contiguous() => {
            let s = cs.as_cuda_slice::<u32>()?;
            let (p, _sync) = s.device_ptr(stream);
            Ok(p + 4 * layout.start_offset() as u64)
        }
        _ => Err(unsupported(
            "index tensor is not contiguous on the GPU".into(),
        )),
    }
}

/// Device address of a contiguous f32 tensor (kept alive by the plan).
fn ptr(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    if !t.is_contiguous() || t.dtype() != candle_core::DType::F32 {
        return Err(unsupported(
            "norm, bias or KV tensor is not contiguous f32".into(),
        ));
    }
    let (st, layout) = t.storage_and_layout();
    match &*st {
        Storage::Cuda(cs) => {
            let s = cs.as_cuda_slice::<f32>()?;
            let (p, _sync) = s.device_ptr(stream);
            Ok(p + 4 * layout.start_offset() as u64)
        }
        _ => Err(unsupported("tensor is not on the GPU".into())),
    }
}

struct LayerDev {
    attn_norm: u64,
    /// (matrix, bias, first output column in the fused QKV row)
    qkv: Vec<(Mat, u64, usize)>,
    /// Q, K and V of two types as one product for the matrix-vector buckets (`MIXED`), with
    /// the three biases in one buffer.
    mixed: Option<(Mat, u64)>,
    o: Mat,
    ffn_norm: u64,
    gate_up: Mat,
    down: Mat,
    k: u64,
    v: u64,
}

/// The rows an attention launch reads: device addresses of the QKV rows (`ldq` floats
/// apart), of each row's position and slot and of the row count; the layer; the rows the
/// grid covers.
struct AttnRows {
    qkv: u64,
    ldq: i32,
    layer: usize,
    pos: u64,
    slot: u64,
    n: u64,
    count: usize,
}

/// A step launched before the call that needs it: see [`GraphDecoder::step`].
struct Ahead {
    /// Its rows (token, position, slot): each continues a row of the step before with that
    /// row's pick at the next position.
    rows: Vec<(u32, usize, usize)>,
    /// Which of [`GraphDecoder::host`] its picks are downloaded into.
    host: usize,
}

/// `advance_rows`' row map (`RowMap` in decode.cu).
#[repr(C)]
struct RowMap {
    row: [u8; MAX_BATCH],
}

/// What a step returns.
pub struct StepOut {
    /// Each row's greedy pick: the first token of largest logit and its log-probability.
    pub picks: Vec<(u32, f32)>,
    /// `[rows * vocab]` logits, when asked for.
    pub logits: Option<Vec<f32>>,
}

/// Buffers allocated once for [`MAX_BATCH`] rows.
struct Buffers {
    x: CudaSlice<f32>,
    xn: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    att: CudaSlice<f32>,
    act: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    part: CudaSlice<f32>,
    /// `attention_split`'s per-chunk results and a counter per (row, head)
    att_part: CudaSlice<f32>,
    att_counter: CudaSlice<u32>,
    /// tokens, positions, slots (`MAX_BATCH` each) and the batch size
    params: CudaSlice<i32>,
    inv_freq: CudaSlice<f32>,
    /// each row's greedy pick: token id and log-probability (f32 bits)
    picks: CudaSlice<i32>,
}

#[derive(Clone, Copy)]
struct Addrs {
    x: u64,
    xn: u64,
    qkv: u64,
    att: u64,
    act: u64,
    logits: u64,
    part: u64,
    att_part: u64,
    att_counter: u64,
    params: u64,
    inv_freq: u64,
    picks: u64,
}

pub struct GraphDecoder {
    /// Keeps the tensors whose addresses the graphs hold alive.
    plan: Plan,
    stream: Arc<CudaStream>,
    /// Candle's stream: our step waits for its queued work (prefill KV writes).
    candle: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    funcs: HashMap<String, CudaFunction>,
    /// Multiprocessors: with each kernel's occupancy, the most blocks resident at once.
    sms: u32,
    /// Largest matrix-vector bucket (1, 2, 4 or 8) whose inputs fit in shared memory.
    mv_max: usize,
    /// Largest bucket that launches a layer's Q, K and V of two types as one product
    /// (`LayerDev::mixed`); larger ones launch them one by one.
    mixed_max: usize,
    /// The mixed products' biases, concatenated (their addresses are in the graphs).
    _mixed_bias: Vec<Tensor>,
    /// Whether buckets 4, 8 and 16 take `attention_gqa` (at most `ATT_GMAX` query heads per
    /// KV head and its shared memory within bounds), else `attention_split` (4, 8) and
    /// `attention_group` (16).
    gqa: bool,
    /// Whether the batch-1 bucket takes `attention_one` (head size 64, at most `ATT_GMAX`
    /// query heads per KV head, its shared memory within bounds), else `attention_split`.
    one: bool,
    layers: Vec<LayerDev>,
    embed: Mat,
    lm_head: Mat,
    out_norm: u64,
    buf: Buffers,
    /// Device addresses of `buf`, taken once: during capture, asking a buffer for its
    /// address would enqueue a wait on an event from outside the graph (capture error).
    at: Addrs,
    /// Captured steps by (bucket, whether rows may extend the same sequence).
    graphs: HashMap<(usize, bool), CudaGraph>,
    /// `LLORCH_CUDA_GRAPH=eager`: launch the kernels without capturing (debugging).
    eager: bool,
    /// Largest bucket: [`MAX_BATCH`] where the tensor-core kernels apply, else `mv_max`.
    max_batch: usize,
    /// Page-locked copies of a step's picks with an event recorded after each download:
    /// two, so that a step launched ahead downloads into one while the host reads the other.
    host: [(PinnedHostSlice<i32>, CudaEvent); 2],
    /// The step launched ahead by the last call, if any.
    ahead: Option<Ahead>,
    /// `LLORCH_DECODE_AHEAD=0`: never launch a step ahead (to compare outputs and speed).
    no_ahead: bool,
}

// SAFETY: the graph and module handles are only used behind the model's Mutex, one thread
// at a time; CUDA allows using them from any thread when calls are serialized.
unsafe impl Send for GraphDecoder {}

/// A kernel's parameter list for [`GraphDecoder::launch`]: the address of each argument.
macro_rules! params {
    ($($a:expr),* $(,)?) => { [$(std::ptr::from_ref($a) as *mut std::ffi::c_void),*] };
}

fn dptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

impl GraphDecoder {
    pub fn new(plan: Plan, device: &Device, eager: bool) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            return Err(unsupported("not a CUDA device".into()));
        };
        if plan.head_dim != 64 && plan.head_dim != 128 {
            return Err(unsupported(format!("head_dim {}", plan.head_dim)));
        }
        let candle = dev.cuda_stream();
        let ctx = candle.context().clone();
        let stream = ctx.new_stream().map_err(drv)?;
        let module = ctx
            .load_module(Ptx::from_binary(FATBIN.to_vec()))
            .map_err(drv)?;
        let embed = mat(&plan.embed)?;
        let lm_head = mat(&plan.lm_head)?;
        let h = plan.hidden;
        let qkv_w = (plan.heads + 2 * plan.kv_heads) * plan.head_dim;
        let mut layers = Vec::with_capacity(plan.layers.len());
        let mut mixed_bias = Vec::new();
        for (l, (k, v)) in plan.layers.iter().zip(&plan.kv) {
            let mut qkv = Vec::new();
            let mut off = 0;
            for (q, b) in &l.qkv {
                let m = mat(q)?;
                let bias = match b {
                    Some(b) => ptr(b, &stream)?,
                    None => 0,
                };
                let rows = m.rows;
                qkv.push((m, bias, off));
                off += rows;
            }
            let gate_up = mat(&l.gate_up)?;
            let (o, down) = (mat(&l.o)?, mat(&l.down)?);
            let geometry_ok = off == qkv_w
                && qkv.iter().all(|(m, _, _)| m.k == h)
                && o.rows == h
                && o.k == plan.heads * plan.head_dim
                && gate_up.rows == 2 * plan.intermediate
                && gate_up.k == h
                && down.rows == h
                && down.k == plan.intermediate;
            if !geometry_ok {
                return Err(unsupported("unexpected projection shapes".into()));
            }
            let (mixed, bias) = mixed_qkv(&qkv, l, qkv_w, &stream)?;
            if let Some(b) = bias {
                mixed_bias.push(b);
            }
            layers.push(LayerDev {
                attn_norm: ptr(&l.attn_norm, &stream)?,
                qkv,
                mixed,
                o,
                ffn_norm: ptr(&l.ffn_norm, &stream)?,
                gate_up,
                down,
                k: ptr(k, &stream)?,
                v: ptr(v, &stream)?,
            });
        }
        // the matrix-vector kernels read the norms' weights 4 floats at a time
        let norms = layers.iter().flat_map(|l| [l.attn_norm, l.ffn_norm]);
        if norms
            .chain([ptr(&plan.out_norm, &stream)?])
            .any(|p| p % 16 != 0)
        {
            return Err(unsupported("norm weights not 16-byte aligned".into()));
        }
        if embed.k != h || lm_head.k != h || lm_head.rows != plan.vocab {
            return Err(unsupported("unexpected embedding or output shapes".into()));
        }
        let mut funcs = HashMap::new();
        let mut tags: Vec<&str> = vec![embed.tag, lm_head.tag];
        for l in &layers {
            tags.extend(l.qkv.iter().map(|(m, _, _)| m.tag));
            tags.extend([l.o.tag, l.gate_up.tag, l.down.tag]);
        }
        tags.sort_unstable();
        tags.dedup();
        // attention keeps the scores of every position in shared memory, one row per query
        // head of the block (past 48 KiB a kernel must opt in; Hopper has ~227 KiB, less
        // the kernels' static arrays); longer pools keep Candle
        let group = plan.heads / plan.kv_heads;
        if 4 * plan.cap > SMEM_MAX {
            return Err(unsupported(format!("{} positions per sequence", plan.cap)));
        }
        // the tensor-core kernels take 64-column groups and at most ATT_GMAX heads per KV head
        let mm_ok = group <= ATT_GMAX
            && 4 * group * plan.cap <= SMEM_MAX
            && layers.iter().all(|l| {
                l.qkv.iter().all(|(m, _, _)| m.k % 64 == 0)
                    && [&l.o, &l.gate_up, &l.down].iter().all(|m| m.k % 64 == 0)
            })
            && lm_head.k.is_multiple_of(64);
        if !mm_ok {
            tracing::info!(
                "CUDA graph decode: batches over 8 take Candle (no tensor-core kernels for this shape)"
            );
        }
        // the matrix-vector kernels keep their input rows in shared memory, rounded
        let k_max = layers
            .iter()
            .flat_map(|l| {
                let qkv = l.qkv.iter().map(|(m, _, _)| m.k);
                qkv.chain([l.o.k, l.gate_up.k, l.down.k])
            })
            .chain([lm_head.k])
            .max()
            .unwrap_or(0);
        let mv_smem = |b: usize| xq_bytes(k_max, b, false);
        let Some(mv_max) = [8, 4, 2, 1].into_iter().find(|&b| mv_smem(b) <= SMEM_MAX) else {
            return Err(unsupported(format!(
                "rows of {} columns",
                k_max.div_ceil(1024) * 1024
            )));
        };
        // the mixed QKV kernels: their input (hidden columns) rounded once or twice
        let mixed_smem = |b: usize, two: bool| xq_bytes(h, b, two);
        let mut pairs: Vec<(&str, bool)> = layers
            .iter()
            .filter_map(|l| l.mixed.as_ref())
            .filter_map(|(m, _)| Some((m.tag, m.mixed?.1)))
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        let mixed_max = BUCKETS
            .into_iter()
            .filter(|&b| {
                b <= mv_max && pairs.iter().all(|&(_, two)| mixed_smem(b, two) <= SMEM_MAX)
            })
            .max()
            .unwrap_or(0);
        let gqa =
            group <= ATT_GMAX && split_smem(plan.cap, plan.head_dim, group, ATT_PF) <= SMEM_MAX;
        let one = plan.head_dim == 64 && group <= ATT_GMAX && one_smem(plan.cap, group) <= SMEM_MAX;
        let mut names = vec![
            format!("attention_head_{}", plan.head_dim),
            format!("attention_split_{}", plan.head_dim),
            format!("attention_split_small_{}", plan.head_dim),
            format!("attention_gqa_{}", plan.head_dim),
            format!("kv_write_{}", plan.head_dim),
            "greedy_rows".into(),
            "advance_rows".into(),
        ];
        if mm_ok {
            names.push(format!("attention_group_{}", plan.head_dim));
        }
        if one {
            names.push(format!("attention_one_64_g{group}"));
        }
        for t in tags {
            names.push(format!("embed_{t}"));
            for b in BUCKETS {
                let kind = if b >= MM_FROM { "mm" } else { "mv" };
                if b <= mv_max || (b >= MM_FROM && mm_ok) {
                    names.extend(["p", "r", "g"].map(|m| format!("{kind}_{t}_{m}{b}")));
                }
            }
        }
        if mm_ok {
            names.push("norm_rows_f32".into());
        }
        for (pair, _) in &pairs {
            for b in BUCKETS.into_iter().filter(|&b| b <= mixed_max) {
                names.push(format!("mvx_{pair}_p{b}"));
            }
        }
        for name in names {
            let f = module.load_function(&name).map_err(drv)?;
            funcs.insert(name, f);
        }
        for (kernel, bytes) in [
            ("head", 4 * plan.cap),
            ("group", 4 * group * plan.cap),
            ("split", split_smem(plan.cap, plan.head_dim, 1, ATT_PF)),
            (
                "split_small",
                split_smem(plan.cap, plan.head_dim, 1, ATT_PF / 2),
            ),
            (
                "gqa",
                split_smem(plan.cap, plan.head_dim, group, ATT_PF).min(SMEM_MAX),
            ),
        ] {
            if let Some(f) = funcs.get(&format!("attention_{kernel}_{}", plan.head_dim)) {
                f.set_attribute(
                    sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .map_err(drv)?;
            }
        }
        if let Some(f) = funcs.get(&format!("attention_one_64_g{group}")) {
            f.set_attribute(
                sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                one_smem(plan.cap, group) as i32,
            )
            .map_err(drv)?;
        }
        for b in BUCKETS.into_iter().filter(|&b| b <= mv_max) {
            for (_, f) in funcs
                .iter()
                .filter(|(n, _)| n.starts_with("mv_") && n.ends_with(&b.to_string()))
            {
                f.set_attribute(
                    sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    mv_smem(b) as i32,
                )
                .map_err(drv)?;
            }
        }
        for (pair, two) in &pairs {
            for b in BUCKETS.into_iter().filter(|&b| b <= mixed_max) {
                funcs[&format!("mvx_{pair}_p{b}")]
                    .set_attribute(
                        sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        mixed_smem(b, *two) as i32,
                    )
                    .map_err(drv)?;
            }
        }
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv)? as u32;
        let nb = MAX_BATCH;
        let half = plan.head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1f32 / plan.rope_base.powf((2 * i) as f32 / plan.head_dim as f32))
            .collect();
        let z = |n: usize| stream.alloc_zeros::<f32>(n).map_err(drv);
        let mut inv_freq = z(half)?;
        stream.memcpy_htod(&inv, &mut inv_freq).map_err(drv)?;
        let buf = Buffers {
            x: z(nb * h)?,
            xn: z(nb * h)?,
            qkv: z(nb * qkv_w)?,
            att: z(nb * plan.heads * plan.head_dim)?,
            act: z(nb * plan.intermediate)?,
            logits: z(nb * plan.vocab)?,
            part: z(nb * h)?,
            att_part: z(nb * plan.heads * ATT_SPLITS * (plan.head_dim + 2))?,
            att_counter: stream.alloc_zeros::<u32>(nb * plan.heads).map_err(drv)?,
            params: stream.alloc_zeros::<i32>(3 * nb + 1).map_err(drv)?,
            inv_freq,
            picks: stream.alloc_zeros::<i32>(2 * nb).map_err(drv)?,
        };
        let at = Addrs {
            x: dptr(&buf.x, &stream),
            xn: dptr(&buf.xn, &stream),
            qkv: dptr(&buf.qkv, &stream),
            att: dptr(&buf.att, &stream),
            act: dptr(&buf.act, &stream),
            logits: dptr(&buf.logits, &stream),
            part: dptr(&buf.part, &stream),
            att_part: dptr(&buf.att_part, &stream),
            att_counter: dptr(&buf.att_counter, &stream),
            params: dptr(&buf.params, &stream),
            inv_freq: dptr(&buf.inv_freq, &stream),
            picks: dptr(&buf.picks, &stream),
        };
        let pinned = || -> Result<(PinnedHostSlice<i32>, CudaEvent)> {
            // SAFETY: written by a download before every read. Not write-combined: the host
            // reads it.
            let h = unsafe { ctx.alloc_pinned_with_flags::<i32>(2 * nb, 0) }.map_err(drv)?;
            Ok((h, ctx.new_event(None).map_err(drv)?))
        };
        let host = [pinned()?, pinned()?];
        stream.synchronize().map_err(drv)?;
        let out_norm = ptr(&plan.out_norm, &stream)?;
        Ok(Self {
            plan,
            stream,
            candle,
            _module: module,
            funcs,
            sms,
            mv_max,
            mixed_max,
            _mixed_bias: mixed_bias,
            gqa,
            one,
            layers,
            embed,
            lm_head,
            out_norm,
            buf,
            at,
            graphs: HashMap::new(),
            eager,
            max_batch: if mm_ok { MAX_BATCH } else { mv_max },
            host,
            ahead: None,
            no_ahead: std::env::var("LLORCH_DECODE_AHEAD").is_ok_and(|v| v == "0"),
        })
    }

    /// Attention of one layer for a step on Candle's path (prompt chunks longer than the
    /// graph's rows): `qkv` is `[n, (heads + 2 kv_heads) * head_dim]` f32 before RoPE,
    /// `rows` (u32 on the device) holds each row's position, then each row's pool slot,
    /// then `n`. Keys and values go to the pool, then each row attends to its sequence's
    /// positions up to its own, with the same kernels as the graph. Launched on Candle's
    /// stream, in order with its operations. Through Candle this was a dozen operations
    /// per sequence and layer (~0.8 ms a layer for a dozen prompts, launch-bound).
    pub fn attention_rows(&self, layer: usize, qkv: &Tensor, rows: &Tensor) -> Result<Tensor> {
        let p = &self.plan;
        let (n, width) = qkv.dims2()?;
        if width != (p.heads + 2 * p.kv_heads) * p.head_dim || rows.elem_count() != 2 * n + 1 {
            return Err(unsupported("attention rows of unexpected shapes".into()));
        }
        let s = &self.candle;
        let out = Tensor::zeros(
            (n, p.heads * p.head_dim),
            candle_core::DType::F32,
            qkv.device(),
        )?;
        let (q, o, r) = (ptr(qkv, s)?, ptr(&out, s)?, ptr_u32(rows, s)?);
        let rows = AttnRows {
            qkv: q,
            ldq: width as i32,
            layer,
            pos: r,
            slot: r + 4 * n as u64,
            n: r + 8 * n as u64,
            count: n,
        };
        self.kv_write(s, &rows, false)?;
        let f = &self.funcs[&format!("attention_head_{}", p.head_dim)];
        let cfg = LaunchConfig {
            grid_dim: (p.heads as u32, n as u32, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 4 * p.cap as u32,
        };
        self.attention(s, f, &rows, o, 0, cfg, false, false)?;
        Ok(out)
    }

    /// Launches `f` on `s` with `params` (see [`params!`]). With `pdl` (programmatic
    /// dependent launch: a step's kernels after its first) the kernel may start while the
    /// one before it finishes: every kernel waits for its predecessor (`pdl_wait` in
    /// decode.cu) before reading what it wrote, so its launch and its weight loads overlap
    /// the previous kernel's tail.
    ///
    /// # Safety
    /// `params` must match the kernel's parameters in number, order and type, and every
    /// address among them must hold what the kernel reads and writes for `cfg`'s grid.
    unsafe fn launch(
        &self,
        s: &CudaStream,
        f: &CudaFunction,
        cfg: LaunchConfig,
        pdl: bool,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<()> {
        s.context().bind_to_thread().map_err(drv)?;
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue {
                programmaticStreamSerializationAllowed: 1,
            },
        };
        let lc = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: s.cu_stream(),
            attrs: &mut attr,
            numAttrs: pdl as u32,
        };
        // SAFETY: the caller vouches for the parameters; `lc` and `attr` outlive the call.
        unsafe {
            sys::cuLaunchKernelEx(
                &lc,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(drv)
    }

    /// Writes each row's RoPE'd key and its value to the KV pool (`kv_write_*`).
    fn kv_write(&self, s: &CudaStream, r: &AttnRows, pdl: bool) -> Result<()> {
        let p = &self.plan;
        let (heads, kv_heads, cap) = (p.heads as i32, p.kv_heads as i32, p.cap as i32);
        let interleaved = p.rope_interleaved as i32;
        let f = &self.funcs[&format!("kv_write_{}", p.head_dim)];
        let l = &self.layers[r.layer];
        let cfg = LaunchConfig {
            grid_dim: (p.kv_heads as u32, r.count as u32, 1),
            block_dim: (p.head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut a = params![
            &r.qkv,
            &r.ldq,
            &l.k,
            &l.v,
            &heads,
            &kv_heads,
            &cap,
            &self.at.inv_freq,
            &interleaved,
            &r.pos,
            &r.slot,
            &r.n
        ];
        // SAFETY: the kernel's parameters; positions are < cap and slots < the pool's slots
        // (checked by the callers); `qkv` holds `count` rows of `ldq`.
        unsafe { self.launch(s, f, cfg, pdl, &mut a) }
    }

    /// One attention kernel (`attention_head_*`, `attention_group_*`, or with `split`
    /// `attention_split_*` / `attention_gqa_*`) over `r`'s rows into `out`
    /// (`[rows, heads * head_dim]`); `write_kv` 0 when `kv_write` ran before it; `pdl` within
    /// a step (see `launch`).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        s: &CudaStream,
        f: &CudaFunction,
        r: &AttnRows,
        out: u64,
        write_kv: i32,
        cfg: LaunchConfig,
        split: bool,
        pdl: bool,
    ) -> Result<()> {
        let p = &self.plan;
        let (heads, kv_heads, cap) = (p.heads as i32, p.kv_heads as i32, p.cap as i32);
        let interleaved = p.rope_interleaved as i32;
        let scale = 1f32 / (p.head_dim as f32).sqrt();
        let l = &self.layers[r.layer];
        let mut a = params![
            &r.qkv,
            &r.ldq,
            &out,
            &l.k,
            &l.v,
            &heads,
            &kv_heads,
            &cap,
            &self.at.inv_freq,
            &interleaved,
            &r.pos,
            &r.slot,
            &r.n,
            &scale,
            &write_kv,
            &self.at.att_part,
            &self.at.att_counter
        ];
        // the split kernel takes its chunk results' buffer and counters as well
        let used = if split { a.len() } else { a.len() - 2 };
        // SAFETY: the kernel's parameters, as for `kv_write`; `out` holds the grid's rows of
        // heads * head_dim; `att_part`/`att_counter` hold MAX_BATCH rows of every head.
        unsafe { self.launch(s, f, cfg, pdl, &mut a[..used]) }
    }

    /// Largest number of sequences one step can take.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// One matrix product launch: `mv_*` kernels with a warp per output row at a time
    /// (SwiGLU: its gate and up rows) and at most the blocks the GPU holds at once, or from
    /// [`MM_FROM`] sequences on `mm_*` with `MM_ROWS` per block.
    /// `reserve`: SMs the grid leaves free for the next kernel's blocks.
    fn mv(
        &self,
        label: &'static str,
        nb: usize,
        m: &Mat,
        mut a: MvArgs,
        reserve: u32,
    ) -> Result<()> {
        let t = crate::profile::start();
        let mode = match a.mode {
            MODE_PLAIN => "p",
            MODE_RESID => "r",
            _ => "g",
        };
        let (kind, rows_per_block, threads) = if nb >= MM_FROM {
            let warps = if a.mode == MODE_RESID {
                MM_WARPS_R
            } else {
                MM_WARPS
            };
            ("mm", MM_ROWS, warps * 32)
        } else {
            ("mv", WARPS, WARPS * 32)
        };
        let name = match m.mixed {
            Some(_) => format!("mvx_{}_p{nb}", m.tag),
            None => format!("{kind}_{}_{mode}{nb}", m.tag),
        };
        let f = &self.funcs[&name];
        a.w = m.ptr;
        a.row_bytes = m.row_bytes as u64;
        a.k = m.k as i32;
        let out_rows = if a.mode == MODE_GLU {
            m.rows / 2
        } else {
            m.rows
        };
        if a.rows == 0 {
            a.rows = out_rows as i32;
        }
        let mut blocks = (a.rows as usize).div_ceil(rows_per_block) as u32;
        let mut smem = 0;
        if kind == "mv" {
            smem = xq_bytes(m.k, nb, m.mixed.is_some_and(|(_, two)| two)) as u32;
            let per_sm = f
                .occupancy_max_active_blocks_per_multiprocessor(threads as u32, smem as usize, None)
                .map_err(drv)?;
            blocks = blocks.min(per_sm.max(1) * self.sms.saturating_sub(reserve).max(1));
        }
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: the kernel takes one `MvArgs`; every pointer in it addresses a live buffer
        // of the sizes the kernel reads (checked shapes in `new`; `part` holds a sum per
        // block and row); rows beyond the step's batch size are never touched. A mixed
        // product's (`MvxArgs`) ranges address the live matrices `mixed_qkv` took them from.
        match m.mixed {
            Some((s, _)) => {
                unsafe { self.launch(&self.stream, f, cfg, true, &mut params![&MvxArgs { a, s }]) }?
            }
            None => unsafe { self.launch(&self.stream, f, cfg, true, &mut params![&a]) }?,
        }
        if kind == "mm" && a.mode == MODE_RESID {
            // the normed copy for the next reader, a block per (sequence, 256 columns)
            a.parts = blocks as i32;
            let cfg = LaunchConfig {
                grid_dim: (nb as u32, (a.rows as u32).div_ceil(256), 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let f = &self.funcs["norm_rows_f32"];
            // SAFETY: as above; `part` holds `parts` sums for each of the step's rows.
            unsafe { self.launch(&self.stream, f, cfg, true, &mut params![&a]) }?;
        }
        self.timed(label, t)
    }

    /// With `llorch bench --profile` and eager launches: waits for the kernel and books its
    /// time (launch included) under `label`, to see where a step's GPU time goes.
    fn timed(&self, label: &'static str, t: Option<std::time::Instant>) -> Result<()> {
        if self.eager && t.is_some() {
            self.stream.synchronize().map_err(drv)?;
            crate::profile::stop(label, t);
        }
        Ok(())
    }

    /// Enqueues one whole step for a batch bucket of `nb` rows. With `prefill`, rows may
    /// extend the same sequence (consecutive prompt positions): keys and values are written
    /// to the cache for all rows before attention reads them.
    fn enqueue(&self, nb: usize, prefill: bool) -> Result<()> {
        let p = &self.plan;
        let s = &self.stream;
        let a = self.at;
        let params = a.params;
        let (tok, pos, slot, n) = (
            params,
            params + 4 * MAX_BATCH as u64,
            params + 8 * MAX_BATCH as u64,
            params + 12 * MAX_BATCH as u64,
        );
        let (x, qkv, att, act) = (a.x, a.qkv, a.att, a.act);
        let (xn, part) = (a.xn, a.part);
        let qkv_w = ((p.heads + 2 * p.kv_heads) * p.head_dim) as i32;

        let t = crate::profile::start();
        let f = &self.funcs[&format!("embed_{}", self.embed.tag)];
        let (row_bytes, hidden) = (self.embed.row_bytes as u64, p.hidden as i32);
        let cfg = LaunchConfig {
            grid_dim: (nb as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = params![
            &self.embed.ptr,
            &row_bytes,
            &hidden,
            &tok,
            &n,
            &x,
            &xn,
            &self.layers[0].attn_norm,
            &p.eps
        ];
        // SAFETY: the kernel's parameters; `x`/`xn` hold MAX_BATCH rows; token ids are
        // checked against the vocab before they are uploaded. The step's first kernel: an
        // ordinary launch.
        unsafe { self.launch(s, f, cfg, false, &mut args) }?;
        self.timed("gpu_embed", t)?;

        let base = MvArgs {
            n,
            eps: p.eps,
            ..Default::default()
        };
        // the bucket's attention kernel (`buckets::attention_for`: measured bucket by bucket)
        let kind = attention_for(nb, self.gqa, self.one);
        let split = kind.chunked();
        let group = p.heads / p.kv_heads;
        let (att_f, att_grid, att_threads, att_smem) = match kind {
            Attention::One => (
                &self.funcs[&format!("attention_one_64_g{group}")],
                (
                    p.kv_heads as u32,
                    p.cap.div_ceil(ONE_CH).min(ATT_SPLITS) as u32,
                    1,
                ),
                ONE_T,
                one_smem(p.cap, group),
            ),
            Attention::Gqa => (
                &self.funcs[&format!("attention_gqa_{}", p.head_dim)],
                (ATT_SPLITS as u32, p.kv_heads as u32, nb as u32),
                GQA_THREADS,
                split_smem(p.cap, p.head_dim, group, ATT_PF),
            ),
            Attention::SplitSmall => (
                &self.funcs[&format!("attention_split_small_{}", p.head_dim)],
                (p.heads as u32, ATT_SPLITS as u32, nb as u32),
                p.head_dim.max(64) as u32,
                split_smem(p.cap, p.head_dim, 1, ATT_PF / 2),
            ),
            Attention::Split => (
                &self.funcs[&format!("attention_split_{}", p.head_dim)],
                (p.heads as u32, ATT_SPLITS as u32, nb as u32),
                SPLIT_THREADS,
                split_smem(p.cap, p.head_dim, 1, ATT_PF),
            ),
            Attention::Group => {
                let f = &self.funcs[&format!("attention_group_{}", p.head_dim)];
                (f, (p.kv_heads as u32, nb as u32, 1), 256, 4 * group * p.cap)
            }
        };
        let write_kv = (!prefill) as i32;
        // `attention_one`'s blocks get SMs of their own beside the QKV product
        let reserve = if kind == Attention::One {
            (p.kv_heads as u32 * ONE_FREE).min(self.sms / 3)
        } else {
            0
        };
        // up to 8 sequences the products that read the residual stream norm it themselves
        // (`norm_in`); the tensor-core ones read the normed copy `xn` that the residual
        // products before them write (`norm_next`)
        let mv = nb < MM_FROM;
        let normed = |norm: u64| {
            if mv {
                (x, norm)
            } else {
                (xn, 0)
            }
        };
        for (li, l) in self.layers.iter().enumerate() {
            // the norm that reads the residual stream after this layer
            let next_norm = match self.layers.get(li + 1) {
                Some(nl) => nl.attn_norm,
                None => self.out_norm,
            };
            let (qkv_x, qkv_norm) = normed(l.attn_norm);
            let qkv_args = MvArgs {
                x: qkv_x,
                norm_in: qkv_norm,
                ldy: qkv_w,
                mode: MODE_PLAIN,
                ..base
            };
            match &l.mixed {
                Some((m, bias)) if nb <= self.mixed_max => {
                    let a = MvArgs {
                        bias: *bias,
                        y: qkv,
                        ..qkv_args
                    };
                    self.mv("gpu_qkv", nb, m, a, reserve)?;
                }
                _ => {
                    for (m, bias, off) in &l.qkv {
                        let a = MvArgs {
                            bias: *bias,
                            y: qkv + 4 * *off as u64,
                            ..qkv_args
                        };
                        self.mv("gpu_qkv", nb, m, a, reserve)?;
                    }
                }
            }
            let t = crate::profile::start();
            let rows = AttnRows {
                qkv,
                ldq: qkv_w,
                layer: li,
                pos,
                slot,
                n,
                count: nb,
            };
            if prefill {
                self.kv_write(s, &rows, true)?;
            }
            let cfg = LaunchConfig {
                grid_dim: att_grid,
                block_dim: (att_threads, 1, 1),
                shared_mem_bytes: att_smem as u32,
            };
            self.attention(s, att_f, &rows, att, write_kv, cfg, split, true)?;
            self.timed("gpu_attention", t)?;
            let resid = |norm_next: u64| MvArgs {
                y: x,
                ldy: hidden,
                mode: MODE_RESID,
                part,
                norm_next,
                xn,
                ..base
            };
            self.mv(
                "gpu_o_proj",
                nb,
                &l.o,
                MvArgs {
                    x: att,
                    ..resid(l.ffn_norm)
                },
                0,
            )?;
            let (ffn_x, ffn_norm) = normed(l.ffn_norm);
            self.mv(
                "gpu_gate_up_swiglu",
                nb,
                &l.gate_up,
                MvArgs {
                    x: ffn_x,
                    norm_in: ffn_norm,
                    y: act,
                    ldy: p.intermediate as i32,
                    mode: MODE_GLU,
                    ..base
                },
                0,
            )?;
            self.mv(
                "gpu_down",
                nb,
                &l.down,
                MvArgs {
                    x: act,
                    ..resid(next_norm)
                },
                0,
            )?;
        }
        let (head_x, head_norm) = normed(self.out_norm);
        self.mv(
            "gpu_lm_head",
            nb,
            &self.lm_head,
            MvArgs {
                x: head_x,
                norm_in: head_norm,
                y: a.logits,
                ldy: p.vocab as i32,
                mode: MODE_PLAIN,
                ..base
            },
            0,
        )?;
        let t = crate::profile::start();
        let vocab = p.vocab as i32;
        let cfg = LaunchConfig {
            grid_dim: (nb as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = &self.funcs["greedy_rows"];
        // SAFETY: the kernel's parameters; `logits` holds MAX_BATCH rows of `vocab`, `picks`
        // two values per row.
        unsafe {
            self.launch(
                s,
                f,
                cfg,
                true,
                &mut params![&a.logits, &vocab, &n, &a.picks],
            )
        }?;
        self.timed("gpu_greedy", t)
    }

    fn capture(&self, nb: usize, prefill: bool) -> Result<CudaGraph> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(drv)?;
        let queued = self.enqueue(nb, prefill);
        let g = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags_enum(0))
            .map_err(drv)?;
        queued?;
        g.ok_or_else(|| unsupported("empty capture".into()))
    }

    /// One step over `(token, position, slot)` rows: a decoding sequence's next token, or
    /// prompt tokens of a sequence at consecutive positions (rows of one sequence in
    /// position order). Returns each row's greedy pick and, with `logits`, all rows'
    /// logits (`[n * vocab]`).
    ///
    /// With `ahead` (the caller samples every row greedily and nothing else touches the KV
    /// pool before its next call), when every row is its sequence's only one, the next step
    /// is launched before this one's picks are read: its rows are these rows' continuations,
    /// fed their picks on the device (`advance_rows`). The host's work between two steps
    /// (sampling, detokenizing, streaming: ~50 us a token) then overlaps the GPU's next step
    /// instead of leaving the GPU idle. A later call takes the picks of rows that match a
    /// row launched ahead (same token, position and slot, its slot's only row) from that step
    /// and runs the others; a step launched ahead that no call matches is wasted work, and
    /// its cache writes lie beyond each sequence's end (or are overwritten by the sequence
    /// that takes the slot next, in stream order; [`Self::drop_ahead`] orders Candle's path).
    pub fn step(
        &mut self,
        items: &[(u32, usize, usize)],
        logits: bool,
        ahead: bool,
    ) -> Result<StepOut> {
        let n = items.len();
        if n == 0 || n > self.max_batch {
            return Err(unsupported(format!("batch of {n}")));
        }
        let p = &self.plan;
        for &(tok, pos, slot) in items {
            if tok as usize >= p.vocab || pos >= p.cap || slot >= p.slots {
                return Err(unsupported(format!(
                    "token {tok} / position {pos} / slot {slot} out of range"
                )));
            }
        }
        // rows the step launched ahead computed: (row there) per row here
        let pending = self.ahead.take();
        let from_ahead: Vec<Option<usize>> = match &pending {
            Some(a) if !logits => super::ahead::match_rows(&a.rows, items),
            _ => vec![None; n],
        };
        let covered = from_ahead.iter().flatten().count();
        let can_ahead =
            ahead && !self.no_ahead && !logits && super::ahead::can_continue(items, p.cap);
        if let (Some(a), true) = (&pending, covered == n) {
            // every row was computed ahead: launch the next before reading these
            let h = 1 - a.host;
            let next = if can_ahead {
                let mut map = RowMap {
                    row: [0; MAX_BATCH],
                };
                for (i, j) in from_ahead.iter().enumerate() {
                    map.row[i] = j.expect("every row covered") as u8;
                }
                self.launch_ahead(n, map, h)?;
                true
            } else {
                false
            };
            let got = self.read_picks(a.host, a.rows.len())?;
            let picks: Vec<(u32, f32)> = from_ahead.iter().map(|j| got[j.unwrap()]).collect();
            if next {
                self.set_ahead(items, &picks, h);
            }
            return Ok(StepOut {
                picks,
                logits: None,
            });
        }
        let early: Vec<Option<(u32, f32)>> = match &pending {
            Some(a) if covered > 0 => {
                let got = self.read_picks(a.host, a.rows.len())?;
                from_ahead.iter().map(|j| j.map(|j| got[j])).collect()
            }
            _ => vec![None; n],
        };
        let rows: Vec<(u32, usize, usize)> = items
            .iter()
            .zip(&early)
            .filter(|(_, e)| e.is_none())
            .map(|(r, _)| *r)
            .collect();
        self.launch_rows(&rows)?;
        let m = rows.len();
        if covered == 0 && can_ahead {
            self.stream
                .memcpy_dtoh(&self.buf.picks.slice(..2 * m), &mut self.host[0].0)
                .map_err(drv)?;
            self.host[0].1.record(&self.stream).map_err(drv)?;
            let mut map = RowMap {
                row: [0; MAX_BATCH],
            };
            for (i, r) in map.row.iter_mut().enumerate().take(n) {
                *r = i as u8;
            }
            self.launch_ahead(n, map, 1)?;
            let picks = self.read_picks(0, n)?;
            self.set_ahead(items, &picks, 1);
            return Ok(StepOut {
                picks,
                logits: None,
            });
        }
        let mut got = vec![0i32; 2 * m];
        self.stream
            .memcpy_dtoh(&self.buf.picks.slice(..2 * m), &mut got)
            .map_err(drv)?;
        let v = self.plan.vocab;
        let lg = if logits {
            let mut out = vec![0f32; m * v];
            self.stream
                .memcpy_dtoh(&self.buf.logits.slice(..m * v), &mut out)
                .map_err(drv)?;
            Some(out)
        } else {
            None
        };
        self.stream.synchronize().map_err(drv)?;
        let mut ran = got
            .chunks_exact(2)
            .map(|c| (c[0] as u32, f32::from_bits(c[1] as u32)));
        let picks = early
            .iter()
            .map(|e| e.unwrap_or_else(|| ran.next().expect("a pick per row run")))
            .collect();
        // logits only run with no rows taken from ahead (`from_ahead` is empty then)
        Ok(StepOut { picks, logits: lg })
    }

    /// Forgets the step launched ahead: Candle's path is about to write to the KV pool
    /// (a slot may have changed hands, so its rows may no longer continue what it
    /// computed). Candle's stream already waits for it ([`Self::launch_ahead`]).
    pub fn drop_ahead(&mut self) {
        self.ahead = None;
    }

    /// Uploads `rows` and launches their step (captured on a bucket's first use).
    fn launch_rows(&mut self, rows: &[(u32, usize, usize)]) -> Result<()> {
        let n = rows.len();
        let mut params = vec![0i32; 3 * MAX_BATCH + 1];
        let mut seen = vec![false; self.plan.slots];
        let mut prefill = false;
        for (i, &(tok, pos, slot)) in rows.iter().enumerate() {
            prefill |= std::mem::replace(&mut seen[slot], true);
            params[i] = tok as i32;
            params[MAX_BATCH + i] = pos as i32;
            params[2 * MAX_BATCH + i] = slot as i32;
        }
        params[3 * MAX_BATCH] = n as i32;
        self.stream.join(&self.candle).map_err(drv)?;
        self.stream
            .memcpy_htod(&params, &mut self.buf.params)
            .map_err(drv)?;
        self.launch_bucket(n, prefill)
    }

    /// Launches the step of `n` rows whose parameters are on the device.
    fn launch_bucket(&mut self, n: usize, prefill: bool) -> Result<()> {
        let nb = *BUCKETS
            .iter()
            .find(|&&b| b >= n && (b <= self.mv_max || b >= MM_FROM))
            .unwrap_or(&MAX_BATCH);
        if self.eager {
            return self.enqueue(nb, prefill);
        }
        if !self.graphs.contains_key(&(nb, prefill)) {
            match self.capture(nb, prefill) {
                Ok(g) => {
                    tracing::debug!(batch = nb, prefill, "captured a CUDA graph of a step");
                    self.graphs.insert((nb, prefill), g);
                }
                Err(e) => {
                    // the same kernels still run, launched one by one
                    tracing::warn!(error = %e, "CUDA graph capture failed; launching eagerly");
                    self.eager = true;
                }
            }
        }
        match self.graphs.get(&(nb, prefill)) {
            Some(g) if !self.eager => g.launch().map_err(drv),
            _ => self.enqueue(nb, prefill),
        }
    }

    /// Enqueues the step after the one just enqueued: row i continues that step's row
    /// `map.row[i]` (`advance_rows`), picks downloaded into `host[h]`. Candle's stream
    /// waits for it.
    fn launch_ahead(&mut self, n: usize, map: RowMap, h: usize) -> Result<()> {
        let f = &self.funcs["advance_rows"];
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (stride, rows) = (MAX_BATCH as i32, n as i32);
        let a = self.at;
        // SAFETY: `advance_rows(int* params, int stride, const int* picks, RowMap map, int
        // n)`: `params` holds 3 * MAX_BATCH + 1 ints, `picks` 2 * MAX_BATCH, map < n_before.
        unsafe {
            self.launch(
                &self.stream,
                f,
                cfg,
                false,
                &mut params![&a.params, &stride, &a.picks, &map, &rows],
            )
        }?;
        self.launch_bucket(n, false)?;
        self.stream
            .memcpy_dtoh(&self.buf.picks.slice(..2 * n), &mut self.host[h].0)
            .map_err(drv)?;
        self.host[h].1.record(&self.stream).map_err(drv)?;
        self.candle.join(&self.stream).map_err(drv)
    }

    /// Records the step just launched ahead: `items` continued with their `picks`.
    fn set_ahead(&mut self, items: &[(u32, usize, usize)], picks: &[(u32, f32)], h: usize) {
        let rows = super::ahead::continued(items, picks);
        self.ahead = Some(Ahead { rows, host: h });
    }

    /// Waits for the picks downloaded into `host[h]` and reads the first `n`.
    fn read_picks(&self, h: usize, n: usize) -> Result<Vec<(u32, f32)>> {
        let (pinned, done) = &self.host[h];
        done.synchronize().map_err(drv)?;
        let got = pinned.as_slice().map_err(drv)?;
        Ok(got[..2 * n]
            .chunks_exact(2)
            .map(|c| (c[0] as u32, f32::from_bits(c[1] as u32)))
            .collect())
    }
}
