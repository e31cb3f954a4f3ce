"""Microbenchmark of the CUDA-graph decode kernels (crates/llorch-engine/src/model/decode.cu)
on the GPU machine, without the Rust build: compiles variants of decode.cu with nvcc there,
feeds them a TinyLlama-1.1B-shaped step (22 layers, hidden 2048, intermediate 5632, 32 heads,
4 KV heads, vocab 32000; random Q4_K or Q6_K blocks with finite scales, a distinct weight
buffer per layer so L2 does not hold them), and reports

- per kernel: GPU time (median over replays of a captured graph of 22 launches, one per
  layer's weights), bytes of weights it reads and the bandwidth that makes;
- per step: the whole decode step (embedding, 22 x [QKV, attention, O, gate/up, down],
  LM head, greedy picks) captured as one graph, as the engine runs it: ms per step, tok/s, GB/s;
- correctness: each variant's logits against the first variant's (same inputs), rel. L2,
  and its greedy picks (token and log-probability bits; `picks!` when they differ).

  python3 bench/gpu/kernels.py NAME=FILE.cu[:NVCC_FLAGS] ... [--batch 1,8] [--pos 600]

The first variant is the reference. Kernel names: `mv_<type>_<p|r|g><batch>` (mode as a
template parameter) or, for older files, `mv_<type>_<batch>`. Pseudo-flags after the
file: `mm` (tensor-core kernels from batch 16, or 8 in files that have them), `pdl` (programmatic dependent launch) and
`persist` (matrix-vector grids capped at what the GPU holds at once): graph.rs uses all
three; `half` caps them at half of that (tried: slower); `gqa` gives every batch up to 8
`attention_gqa` (graph.rs: from 3 sequences on); `mega` runs batches of 1-4 as one persistent
kernel (`bench/gpu/experiments/persistent-step.patch`) and `pair` fuses two products a kernel
(`experiments/pair-kernels.patch`), `smemNN` stages the products' weights in NN KiB of shared
memory before the wait (`experiments/smem-staging.patch`), `l2pfN` makes each product prefetch
the weights of the product N after it into L2 (`experiments/l2-prefetch.patch`; with
`experiments/l2-ahead.patch` applied, `-DPF_ROWS=N -DPF_AT=0|1` has each warp prefetch its own
later rows after / before the wait), `hc` has
split attention poll per-head counters of QKV rows instead of waiting
(`experiments/qkv-head-counters.patch`, with `-DHC2=1` its second form), `fuseN` runs batch
1's QKV product and attention as one kernel per KV head in clusters of N blocks
(`experiments/qkv-attention-cluster.patch`; `nostage`: its weight rows read from global memory,
`-DFUSED_PROBE=1|2`: timing probes), `stream` runs batch 1's layers as one persistent kernel
streaming weights into shared memory (`experiments/stream_step.cu`), `mlp` batch 1's gate/up,
SwiGLU and down as one kernel split over the intermediate columns (`experiments/mlp_fused.cu`,
`-DMLP_NORED|NODOWN|NOSLAB`: timing probes): all tried and slower. `attcl` runs batches 1-2's
attention as a cluster of `-DATT_CL=N` blocks per (sequence, head) (`experiments/attention_cluster.cu`:
faster only at short contexts; `--cap 4096 --pos 2000` measures long ones). `one` runs batch 1's
attention as `attention_one_64` (graph.rs's batch-1 kernel since the thirteenth session) and `freeN`
launches the QKV product on N SMs fewer (graph.rs: 10 a KV head), so its blocks start beside it;
`--same-weights` makes every layer multiply layer 0's matrices (a probe: weights from L2). `qkv2` /
`qkv3` launch the QKV product as 2 / 3 products of its row ranges (a probe: what a launch costs);
`vq6` gives the layers llama.cpp's Q4_K_M keeps at more bits (`MORE_BITS`) a Q6_K V matrix of
their own, launched after Q and K as the engine did before the fourteenth session, and with `mixk`
one `mvx_<type>_q6_k` launch for all three, as graph.rs now does. `q6planar` repacks the Q6_K
matrices into aligned planes for `experiments/q6k-planar.patch` (build with `-DQ6P=1`); `--pad16`
pads every weight row to 16 bytes. `--trace` saves one step's per-block timeline from a file made by
`experiments/trace.py make`. `-DATT_SPLITS=N` sizes the attention grids, `-DMM_WARPS_R=N` / `-DMM_WARPS=N` the tensor-core residual / other products' blocks
(16 for the others does not compile as it is: SwiGLU's 32-sequence reduction would take 64 KB of
shared memory; `experiments/mm-wide-blocks.patch`: `-DMM_RB_P|R|G=N` their output rows a block;
`-DMM_INT=0`: Q4_K products on bf16-dequantized weights, as before the ninth session). The step ends with `greedy_rows`
where the file has it; its picks are compared with the first variant's too. Variants
must take the current
`MvArgs`; files with `XQ_STEP` / `ATT_PF` get the shared memory those ask for. `--once` launches one step per variant without graphs, for a profiler (ncu).
`--prebuilt DIR` takes DIR/NAME.cubin instead of compiling variant NAME on the GPU machine (build
them elsewhere with `nvcc --cubin -O3 -arch=sm_90 FLAGS -o DIR/NAME.cubin FILE.cu`: ~1 minute a
variant there otherwise).
"""
import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys

import cupy as cp
import numpy as np

L, H, I, HEADS, KVH, HD, VOCAB = 22, 2048, 5632, 32, 4, 64, 32000
QKV = (HEADS + 2 * KVH) * HD
CAP, EPS = 1024, 1e-5
MAXB = 32
SAME = False  # `--same-weights`: every layer multiplies layer 0's matrices (probe: weights from L2)
PAD16 = False  # `--pad16`: rows padded to 16 bytes (for `experiments/q6k-planar.patch`'s aligned loads)
# block size, bytes per block, where its f16 scale(s) sit
TYPES = {"q4_k": (256, 144, 0, 4), "q6_k": (256, 210, 208, 210), "q8_0": (32, 34, 0, 2),
         "q4_0": (32, 18, 0, 2), "q4_1": (32, 20, 0, 4), "q5_0": (32, 22, 0, 2)}

cuda = ctypes.CDLL("libcuda.so.1")


def check(r, what):
    if r != 0:
        raise RuntimeError(f"{what}: CUDA error {r}")


def rand_blocks(qt, rows, k, rng):
    """Random quantized rows of `k` columns with finite, model-like scales (`--pad16`: each
    row padded to a multiple of 16 bytes)."""
    bs, ts, s0, s1 = TYPES[qt]
    nb = rows * k // bs
    raw = cp.asarray(rng.integers(0, 256, size=nb * ts, dtype=np.uint8)).reshape(nb, ts)
    sc = rng.uniform(0.0005, 0.004, size=(nb, (s1 - s0) // 2)).astype(np.float16)
    raw[:, s0:s1] = cp.asarray(sc).view(cp.uint8).reshape(nb, s1 - s0)
    rb = k // bs * ts
    if PAD16 and rb % 16:
        padded = cp.zeros((rows, -(-rb // 16) * 16), dtype=cp.uint8)
        padded[:, :rb] = raw.reshape(rows, rb)
        return padded.reshape(-1), padded.shape[1]
    return raw.reshape(-1), rb


# decode.cu's `MvArgs`
MV_FIELDS = [(f, ctypes.c_uint64) for f in ["w", "x", "norm_next", "xn", "bias", "y", "part", "n", "row_bytes"]] + \
            [("rows", ctypes.c_int), ("k", ctypes.c_int), ("ldy", ctypes.c_int), ("mode", ctypes.c_int),
             ("eps", ctypes.c_float), ("parts", ctypes.c_int), ("norm_in", ctypes.c_uint64)]


class Mv(ctypes.Structure):
    """`MvArgs`, with the fields some experiments' kernels read after it."""
    _fields_ = MV_FIELDS + [("pf", ctypes.c_uint64), ("pf_bytes", ctypes.c_uint64), ("ready", ctypes.c_uint64)]


class MvX(ctypes.Structure):
    """decode.cu's `MvxArgs`: `MvArgs` and the mixed products' row ranges (`mvx_*`)."""
    _fields_ = MV_FIELDS + [("seg_w1", ctypes.c_uint64), ("seg_w2", ctypes.c_uint64), ("seg_rb1", ctypes.c_uint64),
                            ("seg_rb2", ctypes.c_uint64), ("seg_end0", ctypes.c_int), ("seg_end1", ctypes.c_int),
                            ("seg_second", ctypes.c_int)]


# llama.cpp's Q4_K_M gives these layers' V (and down) matrices Q6_K (`use_more_bits`)
MORE_BITS = [i for i in range(L) if i < L // 8 or i >= 7 * L // 8 or (i - L // 8) % 3 == 2]


def define_of(name, text, flags, default):
    """A size the kernels take from `#define NAME N`: -DNAME=N in the variant's flags, else the
    file's own #define, else `default` (files from before it existed)."""
    flag = next((f.split("=", 1)[1] for f in flags if f.startswith(f"-D{name}=")), None)
    m = re.search(rf"^#define {name} (\d+)", text, re.M)
    return int(flag if flag is not None else m.group(1) if m else default)


class Variant:
    def __init__(self, name, src, flags, out_dir, prebuilt=None):
        self.name = name
        # pseudo-flags: `mm`: batches of 8 and more take the tensor-core kernels; `pdl`:
        # launches with programmatic dependent launch (as graph.rs does)
        # `persist`: matrix-vector grids capped at what the GPU holds at once (occupancy)
        self.mm = "mm" in flags
        self.pdl = "pdl" in flags
        self.persist = "persist" in flags
        # `half`: grids capped at half of that, so the next kernel's blocks fit beside them
        self.half = "half" in flags
        # `mega`: batches of 1-4 as one persistent kernel a step (`step_<type>_<nb>_<hd>`)
        self.mega = "mega" in flags
        # `gqa`: small batches' attention a block per (KV head, chunk), `attention_gqa_<hd>`
        self.gqa = "gqa" in flags
        # `gqaall`: with `gqa`, `attention_gqa` at every batch (graph.rs before the tenth
        # session: from 16 on a block per (KV head, sequence), `attention_group`)
        self.gqaall = "gqaall" in flags
        # `gqasN`: with `gqaall`, N chunks at most from 16 sequences on (the grid's x; a
        # decode.cu whose attention_gqa sizes chunks by it)
        self.gqas = next((int(f[4:]) for f in flags if re.fullmatch(r"gqas\d+", f)), 0)
        self.hc = "hc" in flags  # experiments/qkv-head-counters.patch: attention polls per-head counters
        self.hc2 = "-DHC2=1" in flags  # counters per query and KV head and layer, zeroed at the step's start
        # `pair`: output projection + gate/up and down + next QKV (or LM head) as one kernel
        # each, with a grid barrier between (`mv2_<type>_<rg|rp><nb>`)
        self.pair = "pair" in flags
        # `fuseN`: batch 1's QKV product and attention as one kernel per KV head, a cluster
        # of N blocks (`qkv_att_<hd>_s<steps>_<k|l>`)
        self.fuse = next((int(f[4:]) for f in flags if re.fullmatch(r"fuse\d+", f)), 0)
        self.nostage = "nostage" in flags
        # `stream`: batch 1's layers as one persistent kernel streaming each block's rows of
        # the weights into shared memory a layer ahead (`experiments/stream_step.cu`, Q4_K)
        self.stream = "stream" in flags
        # `mlp`: batch 1's gate/up, SwiGLU and down as one kernel split over the intermediate
        # columns (`experiments/mlp_fused.cu`, Q4_K; partial sums added with float atomics)
        self.mlp = "mlp" in flags
        # `attcl`: batches 1-2 attention as a cluster of ATT_CL blocks per (sequence, head),
        # chunks combined over distributed shared memory (`experiments/attention_cluster.cu`)
        self.attcl = "attcl" in flags
        # `one`: batch 1's attention as `attention_one_64` (with `freeN`: on the SMs the QKV
        # product leaves free, as graph.rs launches it)
        self.one = "one" in flags
        # `freeN`: the QKV product's grid leaves N SMs free, so the attention blocks after it start on
        # them (and copy their keys and values) while it runs
        self.free = next((int(f[4:]) for f in flags if re.fullmatch(r"free\d+", f)), 0)
        # `qkvN`: the matrix-vector QKV product as N launches (2: Q and K, then V; 3: Q, K, V),
        # as the engine launches a layer whose Q, K and V have different types
        self.qkv_parts = next((int(f[3:]) for f in flags if re.fullmatch(r"qkv[23]", f)), 1)
        # `vq6`: in the layers of MORE_BITS (as in a Q4_K_M file) V is a Q6_K matrix of its own,
        # its QKV product three launches (Q, K, V) up to 8 rows, as the engine launched them
        # before `mvx_*`; with `mixk`, one `mvx_<type>_q6_k_p<nb>` launch
        self.vq6 = "vq6" in flags
        # `q6planar`: the matrix-vector products read Q6_K matrices repacked into planes
        # (`Model.planar`), for `experiments/q6k-planar.patch` built with -DQ6P=1
        self.q6planar = "q6planar" in flags
        self.mixk = "mixk" in flags
        # `smemNN`: matrix-vector kernels that copy their rows' weights into NN KiB of shared
        # memory before the wait (`mvs_<type>_<mode><nb>`, a block per SM)
        self.smem = next((int(f[4:]) for f in flags if re.fullmatch(r"smem\d+", f)), 0)
        # `l2pfN`: each matrix-vector product prefetches the weights of the product N after
        # it into L2 (at most `l2capMM` MB of them, default 32; whole steps only)
        self.l2pf = next((int(f[4:]) for f in flags if re.fullmatch(r"l2pf\d+", f)), 0)
        self.l2cap = next((int(f[5:]) for f in flags if re.fullmatch(r"l2cap\d+", f)), 32) << 20
        flags = [f for f in flags if f not in ("mm", "pdl", "persist", "half", "mega", "gqa", "gqaall", "pair", "hc", "nostage", "stream", "mlp", "attcl", "one", "vq6", "mixk", "q6planar")
                 and not re.fullmatch(r"(smem|l2pf|l2cap|fuse|gqas|free|qkv)\d+", f)]
        cubin = os.path.join(out_dir, f"{name}.cubin")
        cmd = ["nvcc", "--cubin", "-O3", "-arch=sm_90", "-Xptxas", "-v", *flags, "-o", cubin, src]
        if prebuilt and os.path.exists(os.path.join(prebuilt, f"{name}.cubin")):
            # built elsewhere by the same command (`--prebuilt`): the GPU machine's time is scarce
            cubin = os.path.join(prebuilt, f"{name}.cubin")
            self.ptxas = f"prebuilt: {cubin}"
        else:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"nvcc failed for {name}:\n{r.stderr}")
            self.ptxas = r.stderr
        self.mod = cp.cuda.function.Module()
        self.mod.load_file(cubin)
        self.new = self._has("mv_q4_k_p1")
        self.mm_from = 8 if self._has("mm_q4_k_p8") else 16
        # this round's kernels: a warp per SwiGLU row pair, attention split over positions
        self.split = self._has(f"attention_split_{HD}")
        # matrix-vector kernels that round their inputs into shared memory (bytes per
        # sequence and 1024-column step)
        text = open(src).read()
        # an experiment file that includes decode.cu takes its sizes from it
        for inc in re.findall(r'^#include "([^"]+\.cu)"', text, re.M):
            text += open(os.path.join(os.path.dirname(src), inc)).read()
        self.xq_step = define_of("XQ_STEP", text, [], 0)
        # attention_split copying keys and values ahead into shared memory (floats of each)
        self.att_pf = define_of("ATT_PF", text, flags, 0)
        self.att_chunk = define_of("ATT_CHUNK", text, flags, 32)
        self.splits = int(next((f[13:] for f in flags if f.startswith("-DATT_SPLITS=")), "16"))
        self.split_threads = int(next((f[16:] for f in flags if f.startswith("-DSPLIT_THREADS=")), "128"))
        self.wpr = int(next((f[6:] for f in flags if f.startswith("-DWPR=")), "1"))
        self.warps = define_of("WARPS", text, flags, 8)
        # warps per block of the tensor-core kernels: plain, residual, SwiGLU
        mw = define_of("MM_WARPS", text, flags, 8)
        self.mm_warps = [mw, define_of("MM_WARPS_R", text, flags, mw), mw]
        # their output rows per block, where the file lets them vary
        # (`experiments/mm-wide-blocks.patch`: -DMM_RB_P= / _R= / _G=)
        self.mm_rows = [define_of(f"MM_RB_{md}", text, flags, 16) for md in "PRG"]
        self.gqa_threads = define_of("GQA_THREADS", text, flags, 256)
        self.att_cl = define_of("ATT_CL", text, flags, 4)
        self.cl_pf = define_of("CL_PF", text, flags, 320)
        self.cl_threads = define_of("CL_THREADS", text, flags, 128)

    def _has(self, fn):
        try:
            self.mod.get_function(fn)
            return True
        except Exception:
            return False

    def mv(self, qt, mode, nb):
        """(function, rows of output per block, threads per block)"""
        m = "prg"[mode]
        if self.mm and nb >= self.mm_from:
            return self.mod.get_function(f"mm_{qt}_{m}{nb}"), self.mm_rows[mode], 32 * self.mm_warps[mode]
        if self.split:
            return self.mod.get_function(f"mv_{qt}_{m}{nb}"), self.warps, self.warps * 32
        if self.new:
            wr = self.wpr * (2 if mode == 2 else 1)
            return self.mod.get_function(f"mv_{qt}_{m}{nb}"), self.warps // wr, self.warps * 32
        return self.mod.get_function(f"mv_{qt}_{nb}"), 8, 256


class LayerW(ctypes.Structure):
    _fields_ = [(f, ctypes.c_uint64) for f in ["qkv", "qkv_bias", "o", "gate_up", "down", "attn_norm", "ffn_norm",
                                              "k", "v"]]


class StepArgs(ctypes.Structure):
    _fields_ = [(f, ctypes.c_uint64) for f in ["layers", "lm_head", "out_norm", "x", "qkv", "att", "act", "logits",
                                              "att_part", "att_counter", "bar", "pos", "slot", "n", "inv_freq",
                                              "rb_qkv", "rb_o", "rb_gate_up", "rb_down", "rb_lm"]] + \
               [(f, ctypes.c_int) for f in ["n_layers", "hidden", "heads", "kv_heads", "cap", "inter", "vocab",
                                            "interleaved"]] + \
               [("eps", ctypes.c_float), ("scale", ctypes.c_float), ("att_smem_off", ctypes.c_int)]


class LaunchAttr(ctypes.Structure):  # CUlaunchAttribute: id, padding, 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_int * 16)]


class LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(LaunchAttr)), ("nattrs", ctypes.c_uint)]


CLUSTER = {}  # function address -> blocks per thread-block cluster along x (`fuse`)


class QkvSeg(ctypes.Structure):  # decode.cu `QkvSeg`
    _fields_ = [("w", ctypes.c_uint64), ("bias", ctypes.c_uint64), ("row_bytes", ctypes.c_uint64),
                ("rows", ctypes.c_int), ("qt", ctypes.c_int), ("off", ctypes.c_int), ("pad", ctypes.c_int)]


class FusedArgs(ctypes.Structure):  # decode.cu `FusedArgs`
    _fields_ = [("seg", QkvSeg * 3)] + \
               [(f, ctypes.c_uint64) for f in ["x", "norm_in", "n", "out", "kc", "vc", "inv_freq", "pos", "slot"]] + \
               [(f, ctypes.c_int) for f in ["nseg", "k", "heads", "kv_heads", "cap", "interleaved"]] + \
               [("eps", ctypes.c_float), ("scale", ctypes.c_float), ("wsm_bytes", ctypes.c_int), ("pad", ctypes.c_int)]


QT_ID = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q8_0": 8, "q4_k": 12, "q6_k": 14}


def launch(fn, grid, block, smem, stream, args, pdl=False):
    if fn is None:  # a memset: args = [device address, 32-bit words]
        check(cuda.cuMemsetD32Async(ctypes.c_uint64(args[0]), ctypes.c_uint(0), ctypes.c_size_t(args[1]),
                                    ctypes.c_void_p(stream.ptr)), "cuMemsetD32Async")
        return
    arr = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in args])
    if not pdl and fn.ptr not in CLUSTER:
        check(cuda.cuLaunchKernel(ctypes.c_void_p(fn.ptr), *grid, *block, smem, ctypes.c_void_p(stream.ptr), arr,
                                  None), "cuLaunchKernel")
        return
    attrs = (LaunchAttr * 2)()
    attrs[0].id = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attrs[0].value[0] = int(pdl)
    na = 1
    if fn.ptr in CLUSTER:
        attrs[1].id = 4  # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        attrs[1].value[0], attrs[1].value[1], attrs[1].value[2] = CLUSTER[fn.ptr], 1, 1
        na = 2
    cfg = LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), smem, ctypes.c_void_p(stream.ptr),
                       ctypes.cast(attrs, ctypes.POINTER(LaunchAttr)), na)
    check(cuda.cuLaunchKernelEx(ctypes.byref(cfg), ctypes.c_void_p(fn.ptr), arr, None), "cuLaunchKernelEx")


class Model:
    """Device buffers of one synthetic TinyLlama-shaped step."""

    def __init__(self, qt, pos, seed=1):
        rng = np.random.default_rng(seed)
        self.qt = qt
        self.layers = []
        for li in range(L):
            lay = {}
            for name, rows, k in [("qkv", QKV, H), ("o", H, HEADS * HD), ("gate_up", 2 * I, H), ("down", H, I)]:
                lay[name] = self.layers[0][name] if SAME and li else rand_blocks(qt, rows, k, rng)
            lay["attn_norm"] = cp.asarray(rng.uniform(0.5, 1.5, H).astype(np.float32))
            lay["ffn_norm"] = cp.asarray(rng.uniform(0.5, 1.5, H).astype(np.float32))
            if CAP == 1024:
                kv = rng.standard_normal((2, MAXB * KVH * CAP * HD)).astype(np.float32)
                lay["k"], lay["v"] = cp.asarray(kv[0]), cp.asarray(kv[1])
            else:  # `--cap`: drawn on the GPU (the host's generator takes minutes at 4096)
                cp.random.seed(int(rng.integers(1 << 31)))
                lay["k"], lay["v"] = (cp.random.standard_normal(MAXB * KVH * CAP * HD, dtype=cp.float32)
                                      for _ in range(2))
            self.layers.append(lay)
        # V of the MORE_BITS layers as Q6_K (variants with `vq6`), from a generator of its own
        # so that the other weights stay those of earlier runs
        rng6 = np.random.default_rng(seed + 1000)
        for li in MORE_BITS:
            self.layers[li]["v6"] = rand_blocks("q6_k", KVH * HD, H, rng6)
        self.embed = rand_blocks(qt, VOCAB, H, rng)
        self.lm_head = rand_blocks(qt, VOCAB, H, rng)
        self.out_norm = cp.asarray(rng.uniform(0.5, 1.5, H).astype(np.float32))
        f = lambda n: cp.zeros(n, dtype=cp.float32)
        self.x, self.xn, self.qkv, self.att = f(MAXB * H), f(MAXB * H), f(MAXB * QKV), f(MAXB * H)
        self.act, self.logits, self.part = f(MAXB * I), f(MAXB * VOCAB), f(MAXB * H * 8)
        self.att_part = f(MAXB * HEADS * 16 * (HD + 2))
        self.att_counter = cp.zeros(MAXB * HEADS, dtype=cp.uint32)
        self.head_ready = cp.zeros(L * MAXB * (HEADS + KVH), dtype=cp.uint32)
        self.picks = cp.zeros(2 * MAXB, dtype=cp.int32)
        self.bar = cp.zeros(64, dtype=cp.uint32)
        p = np.zeros(3 * MAXB + 1, dtype=np.int32)
        p[:MAXB] = rng.integers(0, VOCAB, MAXB)
        p[MAXB:2 * MAXB] = pos + np.arange(MAXB)
        p[2 * MAXB:3 * MAXB] = np.arange(MAXB)
        self.params = cp.asarray(p)
        self.inv_freq = cp.asarray((1.0 / 10000 ** (np.arange(0, HD, 2) / HD)).astype(np.float32))
        self._planar = {}

    def planar(self, buf, rb, rows, k):
        """Q6_K rows as `experiments/q6k-planar.patch` reads them: per row the blocks' low bits
        (128 B each), high bits (64), scales (16) and d (2) as four planes, padded to 16 bytes;
        made once per matrix."""
        key = buf.data.ptr
        if key not in self._planar:
            nsb = k // 256
            b = buf.reshape(rows, -1)[:, :nsb * 210].reshape(rows, nsb, 210)
            row = cp.concatenate([b[:, :, a:z].reshape(rows, -1) for a, z in [(0, 128), (128, 192), (192, 208),
                                                                              (208, 210)]], axis=1)
            out = cp.zeros((rows, -(-row.shape[1] // 16) * 16), dtype=cp.uint8)
            out[:, :row.shape[1]] = row
            self._planar[key] = (out.reshape(-1), out.shape[1])
        return self._planar[key]

    def bytes_of(self, name):
        return self.layers[0][name][0].nbytes


def p(a):
    return ctypes.c_uint64(a.data.ptr)


SMS = cp.cuda.Device().attributes["MultiProcessorCount"]


def resident_blocks(fn, threads, smem=0):
    """Blocks of `fn` the whole GPU holds at once."""
    nb = ctypes.c_int()
    check(cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(nb), ctypes.c_void_p(fn.ptr), threads,
                                                           ctypes.c_size_t(smem)), "occupancy")
    return nb.value * SMS


def mv_args(v, m, qt, mode, nb, wbuf, row_bytes, rows, k, x, y, ldy, norm_next=None, norm_in=None):
    """A matrix product; `norm_next`: the norm the residual kernels write the normed copy
    `xn` for, `norm_in`: the norm the kernel applies to its input itself (`x` then is the
    residual stream; variants whose kernels round their inputs, up to batch 4)."""
    fn, rpb, threads = v.mv(qt, mode, nb)
    if v.q6planar and qt == "q6_k" and not (v.mm and nb >= v.mm_from):
        wbuf, row_bytes = m.planar(wbuf, row_bytes, rows * (2 if mode == 2 else 1), k)
    if v.smem and not (v.mm and nb >= v.mm_from) and v._has(f"mvs_{qt}_{'prg'[mode]}{nb}"):
        fn = v.mod.get_function(f"mvs_{qt}_{'prg'[mode]}{nb}")
        if norm_in is not None:
            x = m.x
        a = Mv(w=wbuf.data.ptr, x=x.data.ptr, y=y.data.ptr, n=m.params.data.ptr + 4 * 3 * MAXB,
               row_bytes=row_bytes, rows=rows, k=k, ldy=ldy, mode=mode, eps=EPS, part=m.part.data.ptr,
               norm_next=0, xn=m.xn.data.ptr, norm_in=norm_in.data.ptr if norm_in is not None else 0)
        smem = nb * ((k + 1023) // 1024) * v.xq_step + v.smem * 1024
        check(cuda.cuFuncSetAttribute(ctypes.c_void_p(fn.ptr), 8, smem), "cuFuncSetAttribute")
        return fn, (SMS, 1, 1), (v.warps * 32, 1, 1), smem, [a]
    if v.xq_step and not (v.mm and nb >= v.mm_from):
        if norm_in is not None:
            x = m.x
        norm_next = None
    else:
        norm_in = None
    a = Mv(w=wbuf.data.ptr, x=x.data.ptr, y=y.data.ptr, n=m.params.data.ptr + 4 * 3 * MAXB,
           row_bytes=row_bytes, rows=rows, k=k, ldy=ldy, mode=mode, eps=EPS,
           part=m.part.data.ptr,
           norm_next=norm_next.data.ptr if norm_next is not None else 0, xn=m.xn.data.ptr,
           norm_in=norm_in.data.ptr if norm_in is not None else 0)
    a.wbytes = wbuf.nbytes  # for `l2pf`
    grid = (rows + rpb - 1) // rpb
    smem = 0
    if not (v.mm and nb >= v.mm_from):
        smem = nb * ((k + 1023) // 1024) * v.xq_step
        if smem > 48 * 1024:  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            check(cuda.cuFuncSetAttribute(ctypes.c_void_p(fn.ptr), 8, smem), "cuFuncSetAttribute")
        if v.persist:
            grid = min(grid, resident_blocks(fn, threads, smem) // (2 if v.half else 1))
    return fn, (grid, 1, 1), (threads, 1, 1), smem, [a]


def qkv_rows(v, m, qt, nb, lay, r0, r1, buf=None):
    """The QKV product's rows r0..r1 as a launch of their own: rows of the layer's QKV matrix,
    or `buf`, a matrix of those rows alone."""
    w, rb = buf or lay["qkv"]
    launch = mv_args(v, m, qt, 0, nb, w, rb, r1 - r0, H, m.xn, m.qkv, QKV, norm_in=lay["attn_norm"])
    if buf is None:
        launch[4][0].w += r0 * rb
    launch[4][0].y += 4 * r0
    return launch


def norm_after(v, nb, out):
    """The tensor-core residual kernels leave the normed copy to `norm_rows_f32` (if the
    variant has it): a block per (sequence, 256 columns)."""
    if not (v.mm and nb >= v.mm_from and v._has("norm_rows_f32")):
        return
    label, _fn, grid, _b, _s, args = out[-1]
    a = Mv.from_buffer_copy(args[0])
    a.parts = grid[0]
    out.append((label, v.mod.get_function("norm_rows_f32"), (nb, (a.rows + 255) // 256, 1), (256, 1, 1), 0,
                [a]))


def mega_launches(v, m, nb, fn):
    """A step as one persistent kernel: barrier counter zeroed, embedding, the step."""
    qt = m.qt
    lw = (LayerW * L)()
    for li, lay in enumerate(m.layers):
        lw[li] = LayerW(qkv=lay["qkv"][0].data.ptr, qkv_bias=0, o=lay["o"][0].data.ptr,
                        gate_up=lay["gate_up"][0].data.ptr, down=lay["down"][0].data.ptr,
                        attn_norm=lay["attn_norm"].data.ptr, ffn_norm=lay["ffn_norm"].data.ptr,
                        k=lay["k"].data.ptr, v=lay["v"].data.ptr)
    m.lw_dev = cp.asarray(np.frombuffer(bytes(lw), dtype=np.uint8))
    steps = (I + 1023) // 1024
    xq = nb * steps * v.xq_step
    chunk = max(32, -(-CAP // v.splits))
    att = 4 * (HEADS // KVH) * ((chunk + 3) & ~3) + 2 * 4 * (v.att_pf // HD) * (HD + 4)
    smem = xq + att
    check(cuda.cuFuncSetAttribute(ctypes.c_void_p(fn.ptr), 8, smem), "cuFuncSetAttribute")
    grid = resident_blocks(fn, 256, smem)
    pa = m.params.data.ptr
    a = StepArgs(layers=m.lw_dev.data.ptr, lm_head=m.lm_head[0].data.ptr, out_norm=m.out_norm.data.ptr,
                 x=m.x.data.ptr, qkv=m.qkv.data.ptr, att=m.att.data.ptr, act=m.act.data.ptr,
                 logits=m.logits.data.ptr, att_part=m.att_part.data.ptr, att_counter=m.att_counter.data.ptr,
                 bar=m.bar.data.ptr, pos=pa + 4 * MAXB, slot=pa + 8 * MAXB, n=pa + 12 * MAXB,
                 inv_freq=m.inv_freq.data.ptr, rb_qkv=m.layers[0]["qkv"][1], rb_o=m.layers[0]["o"][1],
                 rb_gate_up=m.layers[0]["gate_up"][1], rb_down=m.layers[0]["down"][1], rb_lm=m.lm_head[1],
                 n_layers=L, hidden=H, heads=HEADS, kv_heads=KVH, cap=CAP, inter=I, vocab=VOCAB, interleaved=0,
                 eps=EPS, scale=HD ** -0.5, att_smem_off=xq)
    n = ctypes.c_uint64(pa + 4 * 3 * MAXB)
    tok = ctypes.c_uint64(pa)
    emb = v.mod.get_function(f"embed_{qt}")
    return [("memset", None, None, None, None, [m.bar.data.ptr, 64]),
            ("embed", emb, (nb, 1, 1), (256, 1, 1), 0,
             [p(m.embed[0]), ctypes.c_uint64(m.embed[1]), ctypes.c_int(H), tok, n, p(m.x), p(m.xn),
              p(m.layers[0]["attn_norm"]), ctypes.c_float(EPS)]),
            ("step", fn, (grid, 1, 1), (256, 1, 1), smem, [a])]


class SLayer(ctypes.Structure):  # experiments/stream_step.cu `SLayer`
    _fields_ = [(f, ctypes.c_uint64) for f in ["qkv", "o", "gate_up", "down", "attn_norm", "ffn_norm", "k", "v"]]


class SArgs(ctypes.Structure):  # experiments/stream_step.cu `SArgs`
    _fields_ = [(f, ctypes.c_uint64) for f in ["layers", "x", "qkv", "att", "act", "att_part", "att_counter", "bar",
                                              "pos", "slot", "n", "inv_freq", "rb_qkv", "rb_o", "rb_gu",
                                              "rb_down"]] + \
               [(f, ctypes.c_int) for f in ["n_layers", "hidden", "heads", "kv_heads", "cap", "inter",
                                            "interleaved"]] + \
               [("eps", ctypes.c_float), ("scale", ctypes.c_float)] + \
               [(f, ctypes.c_int) for f in ["off_o", "off_gu", "off_down", "off_xq", "off_att"]]


def stream_launches(v, m, nb, fn):
    """Batch 1 with `stream`: barrier counter zeroed, embedding, the 22 layers as one
    persistent kernel (a block per SM), then the LM head and greedy kernels as usual."""
    qt = m.qt
    lw = (SLayer * L)()
    for li, lay in enumerate(m.layers):
        lw[li] = SLayer(qkv=lay["qkv"][0].data.ptr, o=lay["o"][0].data.ptr, gate_up=lay["gate_up"][0].data.ptr,
                        down=lay["down"][0].data.ptr, attn_norm=lay["attn_norm"].data.ptr,
                        ffn_norm=lay["ffn_norm"].data.ptr, k=lay["k"].data.ptr, v=lay["v"].data.ptr)
    m.slw_dev = cp.asarray(np.frombuffer(bytes(lw), dtype=np.uint8))
    rb = {k: m.layers[0][k][1] for k in ["qkv", "o", "gate_up", "down"]}
    rmax = lambda rows: -(-rows // SMS)
    off_o = rmax(QKV) * rb["qkv"]
    off_gu = off_o + rmax(H) * rb["o"]
    off_down = off_gu + 2 * rmax(I) * rb["gate_up"]
    off_xq = off_down + rmax(H) * rb["down"]
    off_att = off_xq + ((I + 1023) // 1024) * v.xq_step
    smem = off_att + 4 * (HEADS // KVH) * 64
    check(cuda.cuFuncSetAttribute(ctypes.c_void_p(fn.ptr), 8, smem), "cuFuncSetAttribute")
    if resident_blocks(fn, v.warps * 32, smem) < SMS:
        raise RuntimeError(f"stream kernel does not fit an SM ({smem} B of shared memory)")
    pa = m.params.data.ptr
    a = SArgs(layers=m.slw_dev.data.ptr, x=m.x.data.ptr, qkv=m.qkv.data.ptr, att=m.att.data.ptr,
              act=m.act.data.ptr, att_part=m.att_part.data.ptr, att_counter=m.att_counter.data.ptr,
              bar=m.bar.data.ptr, pos=pa + 4 * MAXB, slot=pa + 8 * MAXB, n=pa + 12 * MAXB,
              inv_freq=m.inv_freq.data.ptr, rb_qkv=rb["qkv"], rb_o=rb["o"], rb_gu=rb["gate_up"],
              rb_down=rb["down"], n_layers=L, hidden=H, heads=HEADS, kv_heads=KVH, cap=CAP, inter=I,
              interleaved=0, eps=EPS, scale=HD ** -0.5, off_o=off_o, off_gu=off_gu, off_down=off_down,
              off_xq=off_xq, off_att=off_att)
    n = ctypes.c_uint64(pa + 4 * 3 * MAXB)
    tok = ctypes.c_uint64(pa)
    out = [("memset", None, None, None, None, [m.bar.data.ptr, 64]),
           ("embed", v.mod.get_function(f"embed_{qt}"), (nb, 1, 1), (256, 1, 1), 0,
            [p(m.embed[0]), ctypes.c_uint64(m.embed[1]), ctypes.c_int(H), tok, n, p(m.x), p(m.xn),
             p(m.layers[0]["attn_norm"]), ctypes.c_float(EPS)]),
           ("layers", fn, (SMS, 1, 1), (v.warps * 32, 1, 1), smem, [a]),
           ("lm_head", *mv_args(v, m, qt, 0, nb, *m.lm_head, VOCAB, H, m.xn, m.logits, VOCAB,
                                norm_in=m.out_norm))]
    if v._has("greedy_rows"):
        out.append(("greedy", v.mod.get_function("greedy_rows"), (nb, 1, 1), (1024, 1, 1), 0,
                    [p(m.logits), ctypes.c_int(VOCAB), n, p(m.picks)]))
    return out


class MlpArgs(ctypes.Structure):  # experiments/mlp_fused.cu `MlpArgs`
    _fields_ = [("down", ctypes.c_uint64), ("down_row_bytes", ctypes.c_uint64), ("read", ctypes.c_uint64),
                ("gu", Mv)]


def mlp_launch(v, m, lay, li):
    """Batch 1's MLP of layer `li` as one kernel (`mlp`): a block per SM, the down product's
    runs for the block's columns in shared memory; `read` is the layer's counter in `bar`."""
    fn = v.mod.get_function(f"mlp_{m.qt}_1")
    gu = mv_args(v, m, m.qt, 2, 1, *lay["gate_up"], I, H, m.xn, m.act, I, norm_in=lay["ffn_norm"])[4][0]
    smem = ((H + 1023) // 1024) * v.xq_step + 5 * H * 16  # MLP_SLOTS runs of 16 bytes a down row
    check(cuda.cuFuncSetAttribute(ctypes.c_void_p(fn.ptr), 8, smem), "cuFuncSetAttribute")
    if resident_blocks(fn, v.warps * 32, smem) < SMS:
        raise RuntimeError(f"mlp kernel does not fit an SM ({smem} B of shared memory)")
    a = MlpArgs(down=lay["down"][0].data.ptr, down_row_bytes=lay["down"][1], read=m.bar.data.ptr + 4 * li, gu=gu)
    return fn, (SMS, 1, 1), (v.warps * 32, 1, 1), smem, [a]


def step_launches(v, m, nb, only=None):
    """The step's launches as (label, fn, grid, block, smem, args)."""
    qt, out = m.qt, []
    if v.stream and nb == 1 and v._has(f"sstep_{qt}_{HD}"):
        out = stream_launches(v, m, nb, v.mod.get_function(f"sstep_{qt}_{HD}"))
        return [o for o in out if only is None or o[0] == only]
    if v.mega and v._has(f"step_{qt}_{nb}_{HD}"):
        out = mega_launches(v, m, nb, v.mod.get_function(f"step_{qt}_{nb}_{HD}"))
        return [o for o in out if only is None or o[0] == only]
    n = ctypes.c_uint64(m.params.data.ptr + 4 * 3 * MAXB)
    tok, pos, slot = (ctypes.c_uint64(m.params.data.ptr + 4 * MAXB * j) for j in range(3))
    emb = v.mod.get_function(f"embed_{qt}")
    out.append(("embed", emb, (nb, 1, 1), (256, 1, 1), 0,
                [p(m.embed[0]), ctypes.c_uint64(m.embed[1]), ctypes.c_int(H), tok, n, p(m.x), p(m.xn),
                 p(m.layers[0]["attn_norm"]), ctypes.c_float(EPS)]))
    att_extra = []
    if not v.new:
        att, geo = v.mod.get_function(f"attention_{HD}"), ((HEADS, nb, 1), (1024, 1, 1), 4 * CAP)
    elif (nb < v.mm_from or v.gqaall) and v.gqa:  # a block per (KV head, chunk of positions)
        splits = v.gqas if v.gqas and nb >= v.mm_from else v.splits
        chunk = max(v.att_chunk, -(-CAP // splits))
        smem = 4 * (HEADS // KVH) * ((chunk + 3) & ~3) + 2 * (v.att_pf // HD) * (HD + 4) * 4
        att, geo = v.mod.get_function(f"attention_gqa_{HD}"), ((splits, KVH, nb), (v.gqa_threads, 1, 1), smem)
        check(cuda.cuFuncSetAttribute(ctypes.c_void_p(att.ptr), 8, smem), "cuFuncSetAttribute")
        att_extra = [p(m.att_part), p(m.att_counter)]
    elif v.one and nb == 1 and v._has(f"attention_one_{HD}_g{HEADS // KVH}"):  # a block per (KV head, chunk), 512 threads
        ps = (max(64, -(-CAP // v.splits)) + 3) & ~3  # `one_stride`
        smem = 4 * (2 * 64 * 80 + 8 * ps + 16 * 8 * HD)
        att, geo = v.mod.get_function(f"attention_one_{HD}_g{HEADS // KVH}"), ((KVH, min(-(-CAP // 64), v.splits), 1), (512, 1, 1), smem)
        check(cuda.cuFuncSetAttribute(ctypes.c_void_p(att.ptr), 8, smem), "cuFuncSetAttribute")
        att_extra = [p(m.att_part), p(m.att_counter)]
    elif v.attcl and nb <= 2 and v._has(f"attention_cl_{HD}"):  # a cluster per (query head, sequence)
        smem = 2 * v.cl_pf * (HD + 4) * 4 + 4 * -(-CAP // v.att_cl)
        att, geo = v.mod.get_function(f"attention_cl_{HD}"), ((v.att_cl, HEADS, nb), (v.cl_threads, 1, 1), smem)
        check(cuda.cuFuncSetAttribute(ctypes.c_void_p(att.ptr), 8, smem), "cuFuncSetAttribute")
        CLUSTER[att.ptr] = v.att_cl
    elif nb < v.mm_from and v.split:  # a block per (query head, chunk of positions)
        smem = 4 * CAP + 2 * (v.att_pf // HD) * (HD + 4) * 4
        att, geo = v.mod.get_function(f"attention_split_{HD}"), ((HEADS, v.splits, nb), (v.split_threads, 1, 1), smem)
        check(cuda.cuFuncSetAttribute(ctypes.c_void_p(att.ptr), 8, smem), "cuFuncSetAttribute")
        att_extra = [p(m.att_part), p(m.att_counter)]
    elif nb <= 4:  # a block per query head
        att, geo = v.mod.get_function(f"attention_head_{HD}"), ((HEADS, nb, 1), (1024, 1, 1), 4 * CAP)
    else:  # a block per KV head: its keys and values read once for the group
        att, geo = v.mod.get_function(f"attention_group_{HD}"), ((KVH, nb, 1), (256, 1, 1), 4 * CAP * HEADS // KVH)
        check(cuda.cuFuncSetAttribute(ctypes.c_void_p(att.ptr), 8, geo[2]), "cuFuncSetAttribute")
    if v.pair and nb < v.mm_from and v._has(f"mv2_{qt}_rg{nb}"):
        return pair_launches(v, m, nb, out, att, geo, att_extra, pos, slot, n, only)
    if v.hc2:
        out.insert(0, ("memset", None, None, None, None, [m.head_ready.data.ptr, m.head_ready.size]))
    mlp = v.mlp and nb == 1 and v._has(f"mlp_{qt}_1")
    if mlp:  # the layers' `read` counters
        out.insert(0, ("memset", None, None, None, None, [m.bar.data.ptr, 64]))
    fused = v.fuse and nb == 1 and v._has(f"qkv_att_{HD}_s2_k")
    for li, lay in enumerate(m.layers):
        nxt = m.layers[li + 1]["attn_norm"] if li + 1 < L else m.out_norm
        if fused:
            out.append(("qkv", *fused_launch(v, m, lay)))
            out.append(("o", *mv_args(v, m, qt, 1, nb, *lay["o"], H, HEADS * HD, m.att, m.x, H, lay["ffn_norm"])))
            out.append(("gate_up", *mv_args(v, m, qt, 2, nb, *lay["gate_up"], I, H, m.xn, m.act, I,
                                            norm_in=lay["ffn_norm"])))
            out.append(("down", *mv_args(v, m, qt, 1, nb, *lay["down"], H, I, m.act, m.x, H, nxt)))
            continue
        hc = v.hc and att_extra and not v.gqa
        q = mv_args(v, m, qt, 0, nb, *lay["qkv"], QKV, H, m.xn, m.qkv, QKV, norm_in=lay["attn_norm"])
        hc_buf = m.head_ready.data.ptr + (4 * li * MAXB * (HEADS + KVH) if v.hc2 else 0)
        if hc:
            q[4][0].ready = hc_buf
        parts = [q]
        mv_path = not (v.mm and nb >= v.mm_from)
        if v.vq6 and "v6" in lay and mv_path:
            qk = (HEADS + KVH) * HD
            fx = f"mvx_{qt}_q6_k_p{nb}"
            if v.mixk and v._has(fx):
                fn = v.mod.get_function(fx)
                smem = 2 * nb * ((H + 1023) // 1024) * v.xq_step
                check(cuda.cuFuncSetAttribute(ctypes.c_void_p(fn.ptr), 8, smem), "cuFuncSetAttribute")
                a = MvX()  # the whole QKV product's `MvArgs`, then its ranges: Q and K, then V
                base = qkv_rows(v, m, qt, nb, lay, 0, QKV)[4][0]
                ctypes.memmove(ctypes.addressof(a), ctypes.addressof(base), MvX.seg_w1.offset)
                rb = lay["qkv"][1]
                a.seg_w1, a.seg_rb1, a.seg_end0, a.seg_end1 = a.w + HEADS * HD * rb, rb, HEADS * HD, qk
                a.seg_w2, a.seg_rb2, a.seg_second = lay["v6"][0].data.ptr, lay["v6"][1], 4
                grid = min(-(-QKV // v.warps), resident_blocks(fn, v.warps * 32, smem))
                parts = [(fn, (grid, 1, 1), (v.warps * 32, 1, 1), smem, [a])]
            else:
                parts = [qkv_rows(v, m, qt, nb, lay, 0, HEADS * HD), qkv_rows(v, m, qt, nb, lay, HEADS * HD, qk),
                         qkv_rows(v, m, "q6_k", nb, lay, qk, QKV, lay["v6"])]
        elif v.qkv_parts > 1 and mv_path:
            # row ranges of the same matrix, each its own launch (as many blocks as alone)
            cuts = [0, HEADS * HD, (HEADS + KVH) * HD, QKV]
            if v.qkv_parts == 2:
                cuts = [0, (HEADS + KVH) * HD, QKV]
            parts = [qkv_rows(v, m, qt, nb, lay, r0, r1) for r0, r1 in zip(cuts, cuts[1:])]
        for q in parts:
            if v.free:
                q = (q[0], (min(q[1][0], SMS - v.free), 1, 1), *q[2:])
            out.append(("qkv", *q))
        out.append(("attention", att, *geo,
                    [p(m.qkv), ctypes.c_int(QKV), p(m.att), p(lay["k"]), p(lay["v"]), ctypes.c_int(HEADS),
                     ctypes.c_int(KVH), ctypes.c_int(CAP), p(m.inv_freq), ctypes.c_int(0), pos, slot, n,
                     ctypes.c_float(HD ** -0.5), ctypes.c_int(1)] + att_extra  # write_kv (ignored by older kernels)
                    + ([ctypes.c_uint64(hc_buf)] if hc else [])))
        out.append(("o", *mv_args(v, m, qt, 1, nb, *lay["o"], H, HEADS * HD, m.att, m.x, H, lay["ffn_norm"])))
        norm_after(v, nb, out)
        if mlp:
            out.append(("gate_up", *mlp_launch(v, m, lay, li)))
            continue
        out.append(("gate_up", *mv_args(v, m, qt, 2, nb, *lay["gate_up"], I, H, m.xn, m.act, I,
                                        norm_in=lay["ffn_norm"])))
        out.append(("down", *mv_args(v, m, qt, 1, nb, *lay["down"], H, I, m.act, m.x, H, nxt)))
        norm_after(v, nb, out)
    out.append(("lm_head", *mv_args(v, m, qt, 0, nb, *m.lm_head, VOCAB, H, m.xn, m.logits, VOCAB,
                                    norm_in=m.out_norm)))
    if v._has("greedy_rows"):  # the step's greedy picks, as graph.rs ends a step
        out.append(("greedy", v.mod.get_function("greedy_rows"), (nb, 1, 1), (1024, 1, 1), 0,
                    [p(m.logits), ctypes.c_int(VOCAB), n, p(m.picks)]))
    if v.l2pf and only is None and not (v.mm and nb >= v.mm_from):
        prods = [o[5][0] for o in out if o[0] in ("qkv", "o", "gate_up", "down", "lm_head")]
        for j, a in enumerate(prods[:-v.l2pf]):
            nxt = prods[j + v.l2pf]
            a.pf, a.pf_bytes = nxt.w, min(nxt.wbytes, v.l2cap)
    out = [o for o in out if only is None or o[0] == only]
    return out


def fused_launch(v, m, lay):
    """Batch 1's QKV product and attention of one layer as one clustered kernel (`fuse`)."""
    qt, c = m.qt, v.fuse
    steps = (H + 1023) // 1024
    fn = v.mod.get_function(f"qkv_att_{HD}_s{2 if steps <= 2 else 4}_{'k' if qt in ('q4_k', 'q6_k') else 'l'}")
    CLUSTER[fn.ptr] = c
    if c > 8:
        check(cuda.cuFuncSetAttribute(ctypes.c_void_p(fn.ptr), 14, 1), "non-portable cluster size")
    nch = -(-16 // c)
    chunk_max = max(32, -(-CAP // 16))
    smem = steps * v.xq_step + nch * 2 * 64 * (HD + 4) * 4 + 4 * ((chunk_max + 3) & ~3) * 4
    # the block's weight rows staged in shared memory (`nostage`: read from global memory)
    wsm = 0 if v.nostage else -(-(HEADS // KVH + 2) * HD // c) * lay["qkv"][1] + 48
    smem += wsm
    check(cuda.cuFuncSetAttribute(ctypes.c_void_p(fn.ptr), 8, smem), "cuFuncSetAttribute")
    a = FusedArgs()
    a.seg[0] = QkvSeg(w=lay["qkv"][0].data.ptr, bias=0, row_bytes=lay["qkv"][1], rows=QKV, qt=QT_ID[qt], off=0)
    pa = m.params.data.ptr
    a.x, a.norm_in, a.n, a.out = m.x.data.ptr, lay["attn_norm"].data.ptr, pa + 12 * MAXB, m.att.data.ptr
    a.kc, a.vc, a.inv_freq, a.pos, a.slot = lay["k"].data.ptr, lay["v"].data.ptr, m.inv_freq.data.ptr, \
        pa + 4 * MAXB, pa + 8 * MAXB
    a.nseg, a.k, a.heads, a.kv_heads, a.cap, a.interleaved, a.eps, a.scale = 1, H, HEADS, KVH, CAP, 0, EPS, HD ** -0.5
    a.wsm_bytes = wsm
    return fn, (c, KVH, 1), (v.warps * 32, 1, 1), smem, [a]


def pair_launches(v, m, nb, out, att, geo, att_extra, pos, slot, n, only):
    """The step with `pair`: the first QKV alone, then per layer attention, [output
    projection | gate/up], [down | next QKV or LM head]; barrier counters zeroed first."""
    qt = m.qt
    out.insert(0, ("memset", None, None, None, None, [m.bar.data.ptr, 64]))

    def qkv_of(li):
        return mv_args(v, m, qt, 0, nb, *m.layers[li]["qkv"], QKV, H, m.xn, m.qkv, QKV,
                       norm_in=m.layers[li]["attn_norm"])

    def fused(label, mode, first, second, slot_i):
        fn = v.mod.get_function(f"mv2_{qt}_{mode}{nb}")
        smem = max(first[3], second[3])
        check(cuda.cuFuncSetAttribute(ctypes.c_void_p(fn.ptr), 8, max(smem, 1)), "cuFuncSetAttribute")
        grid = resident_blocks(fn, 256, smem)
        return (label, fn, (grid, 1, 1), (256, 1, 1), smem,
                [first[4][0], second[4][0], ctypes.c_uint64(m.bar.data.ptr + 4 * slot_i)])

    out.append(("qkv", *qkv_of(0)))
    for li, lay in enumerate(m.layers):
        out.append(("attention", att, *geo,
                    [p(m.qkv), ctypes.c_int(QKV), p(m.att), p(lay["k"]), p(lay["v"]), ctypes.c_int(HEADS),
                     ctypes.c_int(KVH), ctypes.c_int(CAP), p(m.inv_freq), ctypes.c_int(0), pos, slot, n,
                     ctypes.c_float(HD ** -0.5), ctypes.c_int(1)] + att_extra))
        o = mv_args(v, m, qt, 1, nb, *lay["o"], H, HEADS * HD, m.att, m.x, H, lay["ffn_norm"])
        gu = mv_args(v, m, qt, 2, nb, *lay["gate_up"], I, H, m.xn, m.act, I, norm_in=lay["ffn_norm"])
        out.append(fused("o", "rg", o, gu, 2 * li))
        dn = mv_args(v, m, qt, 1, nb, *lay["down"], H, I, m.act, m.x, H, None)
        nxt = qkv_of(li + 1) if li + 1 < L else mv_args(v, m, qt, 0, nb, *m.lm_head, VOCAB, H, m.xn, m.logits,
                                                          VOCAB, norm_in=m.out_norm)
        out.append(fused("down", "rp", dn, nxt, 2 * li + 1))
    return [o for o in out if only is None or o[0] == only]


def capture(stream, launches, pdl=False):
    stream.begin_capture()
    for j, (_, fn, g, b, s, args) in enumerate(launches):
        launch(fn, g, b, s, stream, args, pdl and j > 0 and launches[j - 1][1] is not None)
    return stream.end_capture()


def time_graph(stream, graph, reps=30):
    graph.launch(stream)
    stream.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record(stream)
        graph.launch(stream)
        e1.record(stream)
        e1.synchronize()
        ts.append(cp.cuda.get_elapsed_time(e0, e1) / 1e3)
    return statistics.median(ts)


def save_trace(v, m, graph, stream, stem):
    """One replay of `graph` with the trace buffer emptied first (experiments/trace.py)."""
    try:
        n_ptr = v.mod.get_global_var("trace_n")
    except Exception:  # not a traced build
        return
    buf_ptr = v.mod.get_global_var("trace_buf")

    def dev(ptr, shape, dtype):  # get_global_var gives an address
        if not isinstance(ptr, int):
            return cp.ndarray(shape, dtype, ptr)
        mem = cp.cuda.UnownedMemory(ptr, int(np.prod(shape)) * np.dtype(dtype).itemsize, None)
        return cp.ndarray(shape, dtype, cp.cuda.MemoryPointer(mem, 0))

    dev(n_ptr, (1,), cp.uint32).fill(0)
    cp.cuda.runtime.deviceSynchronize()
    graph.launch(stream)
    stream.synchronize()
    n = min(int(dev(n_ptr, (1,), cp.uint32).get()[0]), 65536)
    recs = dev(buf_ptr, (n, 8), cp.uint64).get()
    names = {}
    for li, lay in enumerate(m.layers):
        for k in ["qkv", "o", "gate_up", "down"]:
            names[lay[k][0].data.ptr] = f"{k}{li}"
        names[lay["k"].data.ptr] = f"att{li}"
    names[m.lm_head[0].data.ptr] = "lm_head"
    np.save(stem + ".npy", recs)
    with open(stem + ".json", "w") as f:
        json.dump({str(k): v2 for k, v2 in names.items()}, f)


def main():
    global CAP, SAME, PAD16
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--batch", default="8,1,16,32")
    ap.add_argument("--types", default="q4_k")
    ap.add_argument("--pos", type=int, default=600)
    ap.add_argument("--cap", type=int, default=CAP, help="KV cache positions a sequence (positions past 1024)")
    ap.add_argument("--json", default="kernels.json", help="file name under --out")
    ap.add_argument("--no-kernels", action="store_true", help="only the whole step, no per-kernel times")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--trace", action="store_true",
                    help="variants built by experiments/trace.py: save one step's kernel timeline")
    ap.add_argument("--prebuilt", help="folder of NAME.cubin files to use instead of compiling those variants "
                    "(built elsewhere with the nvcc command of `Variant`)")
    ap.add_argument("--pad16", action="store_true",
                    help="pad every weight row to a multiple of 16 bytes (probe of Q6_K in aligned planes)")
    ap.add_argument("--same-weights", action="store_true",
                    help="probe: every layer multiplies layer 0's matrices (24.8 MB of Q4_K: they stay in the "
                    "50 MB L2), so the step shows what the kernels cost with weight reads nearly free")
    ap.add_argument("--once", action="store_true",
                    help="launch one step of each variant once, without graphs (for a profiler), and stop")
    args = ap.parse_args()
    CAP, SAME, PAD16 = args.cap, args.same_weights, args.pad16
    vs = []
    for spec in args.variants:
        name, rest = spec.split("=", 1)
        src, _, flags = rest.partition(":")
        vs.append(Variant(name, src, flags.split() if flags else [], args.out, args.prebuilt))
    stream = cp.cuda.Stream(non_blocking=True)
    if args.once:
        m = Model(args.types.split(",")[0], args.pos)
        nb = int(args.batch.split(",")[0])
        m.params[3 * MAXB] = nb
        for v in vs:
            with stream:
                for _, fn, g, b, s, a in step_launches(v, m, nb):
                    launch(fn, g, b, s, stream, a)
                stream.synchronize()
        return
    results = []
    for qt in args.types.split(","):
        m = Model(qt, args.pos)
        wbytes = {k: m.bytes_of(k) for k in ["qkv", "o", "gate_up", "down"]}
        step_bytes = L * sum(wbytes.values()) + m.lm_head[0].nbytes
        # reference: the first variant's logits of the first 8 sequences in a batch of 8
        # (a sequence's inputs do not depend on the batch it runs in)
        ref = None
        for nb in [int(b) for b in args.batch.split(",")]:
            first_bits = None
            for v in vs:
                with stream:
                    m.params[3 * MAXB] = nb
                    try:
                        ls = step_launches(v, m, nb)
                    except Exception as e:
                        print(f"{v.name} batch {nb}: skipped ({e})")
                        continue
                    g = capture(stream, ls, v.pdl)
                    m.logits.fill(cp.nan)  # nothing stale passes for this variant's output
                    g.launch(stream)
                    stream.synchronize()
                    logits = cp.asnumpy(m.logits[: nb * VOCAB]).astype(np.float64)
                    picks = cp.asnumpy(m.picks[: 2 * nb])
                    m.picks.fill(-1)
                    if ref is None:
                        if nb != 8:
                            sys.exit("put batch 8 first: it is the reference")
                        ref, ref_picks = logits, picks
                    if first_bits is None:
                        first_bits = logits
                    c = min(nb, 8) * VOCAB
                    err = float(np.linalg.norm(logits[:c] - ref[:c]) / max(np.linalg.norm(ref[:c]), 1e-30))
                    finite = bool(np.isfinite(logits).all())
                    t = time_graph(stream, g)
                    row = {"type": qt, "batch": nb, "variant": v.name, "step_ms": t * 1e3,
                           "tok_s": nb / t, "GBps": step_bytes / t / 1e9, "rel_l2_vs_first": err,
                           "finite": finite, "kernels_us": {},
                           "bitwise_as_first": bool(np.array_equal(logits, first_bits))}
                    if v._has("greedy_rows"):  # token and log-probability bits as the first's
                        row["picks_same"] = bool((picks[: 2 * min(nb, 8)] == ref_picks[: 2 * min(nb, 8)]).all())
                    # (hc: attention alone would wait for QKV rows forever)
                    for label in [] if args.no_kernels or v.hc else ["embed", "qkv", "attention", "o", "gate_up", "down", "lm_head", "greedy"]:
                        ls = step_launches(v, m, nb, only=label)
                        if not ls:
                            continue
                        ls = ls if len(ls) >= L else (ls * L)[:L]  # a layer's worth each
                        gk = capture(stream, ls, v.pdl)
                        tk = time_graph(stream, gk, reps=15) / L
                        row["kernels_us"][label] = round(tk * 1e6, 2)
                        if label in wbytes or label == "lm_head":
                            b = m.lm_head[0].nbytes if label == "lm_head" else wbytes[label]
                            row.setdefault("kernel_GBps", {})[label] = round(b / tk / 1e9, 1)
                    if args.trace:
                        save_trace(v, m, g, stream, os.path.join(args.out, f"trace-{v.name}-{qt}-{nb}"))
                    results.append(row)
                    print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, args.json), "w") as f:
        json.dump({"results": results, "ptxas": {v.name: v.ptxas[-4000:] for v in vs}}, f, indent=1)
    print("\ntype  batch variant          step_ms  tok/s   GB/s  relL2    " + " ".join(f"{k:>8}" for k in
          ["embed", "qkv", "attention", "o", "gate_up", "down", "lm_head", "greedy"]))
    for r in results:
        print(f"{r['type']:5} {r['batch']:5} {r['variant']:16} {r['step_ms']:7.3f} {r['tok_s']:7.0f} {r['GBps']:6.0f}"
              f"  {r['rel_l2_vs_first']:.1e}{'' if r['finite'] else ' NaN!'}{' =' if r['bitwise_as_first'] else ' !='}{'' if r.get('picks_same', True) else ' picks!'} "
              + " ".join(f"{r['kernels_us'].get(k, 0):8.2f}" for k in
                         ["embed", "qkv", "attention", "o", "gate_up", "down", "lm_head", "greedy"]))


if __name__ == "__main__":
    main()
