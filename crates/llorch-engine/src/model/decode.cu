// The decode step of the llama family as a handful of fused CUDA kernels (see graph.rs).
//
// Why: through Candle a decode step is ~450 small operations, each costing ~8-10 us of
// host time (launch, allocation, bookkeeping), so a 1B model decodes at <5% of what the
// GPU's memory bandwidth allows. Here a step is 5 kernels per layer over preallocated
// buffers, and every per-step input (tokens, positions, KV slots, batch size) is read from
// device memory, so the whole step is captured once as a CUDA graph and replayed.
//
// Layout: activations are f32, rows of `NB` sequences (the graph's batch bucket; rows at
// and above the step's real batch size `*n` are skipped). Weights stay in their GGUF
// blocks and every weight byte is read once per step for all sequences: up to 8 sequences
// a warp per output row multiplies the weights' integers by the inputs rounded to 16-bit
// integers per 16 columns (`dp2a`) and applies the block scales once per 16 (`matvec`:
// relative error ~1e-5, far under the CPU's 8-bit activations); from 16 on the tensor
// cores do, on split bf16 values (`matmul`). Attention for up to 8 sequences is split over
// chunks of positions (`attention_split` at 1 and 2, `attention_gqa` from 3: a block per
// KV head and chunk), from 16 a block per KV head.
// The RMS norms are fused: up to 8 sequences the products that read the residual stream
// norm it themselves (`quantize_x`); from 16 the residual products' blocks write partial
// sums of squares and the `norm_rows` kernel the normed copy `xn`.
// The kernels are launched with programmatic dependent launch (`pdl_wait`).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef unsigned int u32;

// Warps per block in the matrix-vector kernels: one block of 16 an SM rather than two of 8
// (the same warps): half the blocks read and round each input row after the wait (H100,
// Q4_K step: batch 4 1.42 -> 1.34 ms, batch 8 2.52 -> 2.25, batch 1 and 2 unchanged;
// `kernels-npre-log.txt`).
#ifndef WARPS
#define WARPS 16
#endif
#define MODE_PLAIN 0       // y = W x (+ bias)
#define MODE_RESID 1       // y += W x (`matmul`: and partial sums of squares for `norm_rows`)
#define MODE_GLU 2         // y = silu(W_gate x) * (W_up x); W is [gate; up], rows = |gate|

// GGML type ids
#define T_Q4_0 2
#define T_Q4_1 3
#define T_Q5_0 6
#define T_Q8_0 8
#define T_Q4_K 12
#define T_Q6_K 14

// Matches `MvArgs` in graph.rs field for field.
struct MvArgs {
    const uint8_t* w;         // weight blocks, row-major
    const float* x;           // input rows [NB, k], already RMS-normed where a norm precedes
    const float* norm_next;   // norm_rows: weight of the RMS norm that reads the output
    float* xn;                // norm_rows: the output rows normed by it [NB, rows]
    const float* bias;        // [rows] or null
    float* y;                 // output rows [NB, ldy]
    float* part;              // matmul MODE_RESID: per-block partial sums of squares [NB, gridDim.x]
    const int* n;             // rows in this step
    unsigned long long row_bytes;
    int rows;
    int k;
    int ldy;
    int mode;
    float eps;
    int parts;                // norm_rows: partial sums per row in `part` (the producer's blocks)
    const float* norm_in;     // matvec: weight of the RMS norm to apply to x first, or null
};

// `mvx_*`: a QKV product whose matrices are of two types (as in Q4_K_M files), one launch
// instead of one per matrix. Rows [0, end0) are `a.w`'s, [end0, end1) w1's, [end1, a.rows)
// w2's, each range with its own bytes per row (the first: `a.row_bytes`); bit j of
// `second`: range j is of the kernel's second type. Matches `MvxArgs` in graph.rs. (A struct
// of its own: grown by these fields, `MvArgs` changed the code of every other kernel.)
struct MvSegs {
    const uint8_t* w1;
    const uint8_t* w2;
    unsigned long long rb1;
    unsigned long long rb2;
    int end0;
    int end1;
    int second;
};
struct MvxArgs {
    MvArgs a;
    MvSegs s;
};

// Programmatic dependent launch (sm_90+, `graph.rs` launches the step's kernels with it):
// a kernel may start while the one before it finishes, and `pdl_wait` holds it until that
// one's writes are visible. Every kernel waits before touching what an earlier kernel
// writes (and before returning, so a kernel's end implies the end of all before it), then
// lets the next kernel start (the tensor-core products only at their end: `MM`). Without
// the launch attribute both are no-ops.
__device__ __forceinline__ void pdl_wait_only() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
    pdl_wait_only();
    pdl_launch();
}

__device__ __forceinline__ float ldh(const uint8_t* p) {
    return __half2float(*(const __half*)p);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ u32 ld16x2(const uint8_t* p) {  // 4 bytes, 2-byte aligned
    const uint16_t* q = (const uint16_t*)p;
    return (u32)q[0] | ((u32)q[1] << 16);
}

// The float of a small unsigned integer (< 2^23), exactly, by bit assembly: int-to-float
// conversion runs at a quarter of the FP32 rate, and the kernels convert every weight.
__device__ __forceinline__ float u2f(u32 v) { return __int_as_float(0x4B000000u | v) - 8388608.f; }

__device__ __forceinline__ u32 byte_of(const u32* s, int i) {
    return (s[i >> 2] >> (8 * (i & 3))) & 0xFF;
}

// Scale and min of Q4_K sub-block `jj` (0..7) from the 12 packed bytes.
__device__ __forceinline__ void q4k_scale(const u32* sc, int jj, float& s, float& m) {
    if (jj < 4) {
        s = byte_of(sc, jj) & 63;
        m = byte_of(sc, jj + 4) & 63;
    } else {
        s = (byte_of(sc, jj + 4) & 0xF) | ((byte_of(sc, jj - 4) >> 6) << 4);
        m = (byte_of(sc, jj + 4) >> 4) | ((byte_of(sc, jj) >> 6) << 4);
    }
}

// The bytes a lane needs for its 32 weights of one 1024-column step, as loaded: the
// matrix-vector kernels issue every load of a chunk of steps before dequantizing any, so a
// warp has all its weight bytes in flight at once (one memory round trip, not one a step).
struct Raw {
    u32 q[8];  // quants (Q6_K: low bits, then high bits; Q8_0: 32 bytes; Q4_K: 16 bytes,
               // then its 12 packed scale bytes)
    u32 h[3];  // f16 scale(s) (Q4_K, Q4_1: two), Q5_0's high bits, Q6_K's two int8 scales
};

// Whether the lane has weights in step `g` of a row of `k` columns.
template <int QT>
__device__ __forceinline__ bool lane_has(int k, int g, int lane) {
    if (QT == T_Q4_K || QT == T_Q6_K) return (4 * g + (lane >> 3)) * 256 < k;
    return (32 * g + lane) * 32 < k;
}

template <int QT>
__device__ __forceinline__ void raw_load(const uint8_t* row, int g, int lane, Raw& r) {
    if (QT == T_Q4_K) {
        const int sb = 4 * g + (lane >> 3), part = lane & 7;
        const uint8_t* b = row + (size_t)sb * 144;
        const uint4 q = *(const uint4*)(b + 16 + 32 * (part >> 1) + (part & 1) * 16);
        r.q[0] = q.x, r.q[1] = q.y, r.q[2] = q.z, r.q[3] = q.w;
        const uint4 hd = *(const uint4*)b;  // d, dmin, 12 scale bytes
        r.h[0] = hd.x;
        r.q[4] = hd.y, r.q[5] = hd.z, r.q[6] = hd.w;
    } else if (QT == T_Q6_K) {
        const int sb = 4 * g + (lane >> 3), part = lane & 7;
        const uint8_t* b = row + (size_t)sb * 210;
        const int nh = part >> 2, q = part & 3, lb = 16 * (q & 1), sel = q >> 1;
        // 210-byte blocks: the lane's 16-byte runs are 2-byte aligned in odd blocks, so it
        // loads the 20 aligned bytes around each run and shifts (5 loads, not 8)
        const int mis = (int)((uintptr_t)b & 3);  // 0 or 2
        const u32* ql = (const u32*)(b - mis + 64 * nh + 32 * sel + lb);
        const u32* qh = (const u32*)(b - mis + 128 + 32 * nh + lb);
        u32 wl[5], wh[5];
#pragma unroll
        for (int e = 0; e < 5; ++e) wl[e] = ql[e], wh[e] = qh[e];
        const u32 perm = mis ? 0x5432 : 0x3210;
#pragma unroll
        for (int e4 = 0; e4 < 4; ++e4)
            r.q[e4] = __byte_perm(wl[e4], wl[e4 + 1], perm), r.q[4 + e4] = __byte_perm(wh[e4], wh[e4 + 1], perm);
        const uint8_t* sc = b + 192 + 8 * nh;
        r.h[0] = *(const uint16_t*)(b + 208);
        r.h[1] = sc[(q & 1) + 2 * sel];
        r.h[2] = sc[(q & 1) + 4 + 2 * sel];
    } else {
        const int blk = 32 * g + lane;
        if (QT == T_Q8_0) {
            const uint8_t* b = row + (size_t)blk * 34;
            r.h[0] = *(const uint16_t*)b;
#pragma unroll
            for (int e4 = 0; e4 < 8; ++e4) r.q[e4] = ld16x2(b + 2 + 4 * e4);
        } else if (QT == T_Q4_0 || QT == T_Q5_0) {
            const uint8_t* b = row + (size_t)blk * (QT == T_Q4_0 ? 18 : 22);
            r.h[0] = *(const uint16_t*)b;
            if (QT == T_Q5_0) r.h[1] = ld16x2(b + 2);
#pragma unroll
            for (int e4 = 0; e4 < 4; ++e4) r.q[e4] = ld16x2(b + (QT == T_Q4_0 ? 2 : 6) + 4 * e4);
        } else {  // T_Q4_1
            const u32* b = (const u32*)(row + (size_t)blk * 20);  // 4-byte aligned
            r.h[0] = b[0];
#pragma unroll
            for (int e4 = 0; e4 < 4; ++e4) r.q[e4] = b[1 + e4];
        }
    }
}

__device__ __forceinline__ float h2f(u32 bits) { return __half2float(__ushort_as_half((unsigned short)bits)); }

// A warp covers 1024 columns of a row per step: each lane dequantizes 32 weights, 16 at
// columns c0.. and 16 at c0 + X.. (X: where the layout puts the high nibbles; 16 makes the
// 32 columns contiguous).
template <int QT> struct Layout { static constexpr int X = 16; };
template <> struct Layout<T_Q4_K> { static constexpr int X = 32; };
template <> struct Layout<T_Q6_K> { static constexpr int X = 64; };

// The first column of the lane's 32 in step `g` (its second 16 start X later).
template <int QT>
__device__ __forceinline__ int col0(int g, int lane) {
    if (QT == T_Q4_K || QT == T_Q6_K) {
        const int sb = 4 * g + (lane >> 3), part = lane & 7;
        if (QT == T_Q4_K) return sb * 256 + 64 * (part >> 1) + (part & 1) * 16;
        const int qq = part & 3;
        return sb * 256 + 128 * (part >> 2) + 32 * (qq >> 1) + 16 * (qq & 1);
    }
    return (32 * g + lane) * 32;
}

// The lane's 32 weights of step `g` as w = sc[h] * (b - Off) + mn[h] for the halves h (16
// weights each): b unsigned bytes, four to a word (b[0..3] the first half's columns in
// order, b[4..7] the second's), Off the format's fixed offset, so the products take the
// integers as they are and the scales apply once per 16. Four nibbles are masked at once.
template <int QT> struct HasMin { static constexpr bool v = QT == T_Q4_K || QT == T_Q4_1; };
template <int QT> struct Off { static constexpr int v = 0; };
template <> struct Off<T_Q6_K> { static constexpr int v = 32; };
template <> struct Off<T_Q8_0> { static constexpr int v = 128; };
template <> struct Off<T_Q4_0> { static constexpr int v = 8; };
template <> struct Off<T_Q5_0> { static constexpr int v = 16; };

// bits 0..3 of b to bit 4 of bytes 0..3
__device__ __forceinline__ u32 spread4(u32 b) { return ((b * 0x00204081u) & 0x01010101u) << 4; }

template <int QT>
__device__ __forceinline__ void unpack_q(const Raw& r, int lane, u32* b, float* sc, float* mn) {
    if (QT == T_Q4_K) {
        // the 6-bit scales and mins of sub-blocks 2j, 2j+1 (j = part / 2) as byte pairs,
        // without the branches of `q4k_scale` (its two cases split every warp)
        const int j = (lane & 7) >> 1, sh = 16 * (j & 1);
        const u32 w0 = (r.q[4] >> sh) & 0xFFFF, w1 = (r.q[5] >> sh) & 0xFFFF, w2 = (r.q[6] >> sh) & 0xFFFF;
        const u32 sp = j < 2 ? w0 & 0x3F3F : (w2 & 0x0F0F) | ((w0 >> 2) & 0x3030);
        const u32 mp = j < 2 ? w1 & 0x3F3F : ((w2 >> 4) & 0x0F0F) | ((w1 >> 2) & 0x3030);
        const float2 dm = __half22float2(*(const __half2*)&r.h[0]);
        sc[0] = dm.x * u2f(sp & 0xFF), sc[1] = dm.x * u2f(sp >> 8);
        mn[0] = -(dm.y * u2f(mp & 0xFF)), mn[1] = -(dm.y * u2f(mp >> 8));
#pragma unroll
        for (int e4 = 0; e4 < 4; ++e4) b[e4] = r.q[e4] & 0x0F0F0F0Fu, b[4 + e4] = (r.q[e4] >> 4) & 0x0F0F0F0Fu;
    } else if (QT == T_Q6_K) {
        const int sel = (lane & 3) >> 1;
        const float d = h2f(r.h[0]);
        sc[0] = d * (float)(int8_t)r.h[1];
        sc[1] = d * (float)(int8_t)r.h[2];
#pragma unroll
        for (int e4 = 0; e4 < 4; ++e4) {
            const u32 l4 = r.q[e4], h4 = r.q[4 + e4];
            b[e4] = (l4 & 0x0F0F0F0Fu) | (((h4 >> (2 * sel)) & 0x03030303u) << 4);
            b[4 + e4] = ((l4 >> 4) & 0x0F0F0F0Fu) | (((h4 >> (4 + 2 * sel)) & 0x03030303u) << 4);
        }
    } else if (QT == T_Q8_0) {
        sc[0] = sc[1] = h2f(r.h[0]);
#pragma unroll
        for (int e4 = 0; e4 < 8; ++e4) b[e4] = r.q[e4] ^ 0x80808080u;  // int8 + 128
    } else {
        if (QT == T_Q4_1) {
            const float2 dm = __half22float2(*(const __half2*)&r.h[0]);
            sc[0] = sc[1] = dm.x;
            mn[0] = mn[1] = dm.y;
        } else {
            sc[0] = sc[1] = h2f(r.h[0]);
        }
#pragma unroll
        for (int e4 = 0; e4 < 4; ++e4) {
            b[e4] = r.q[e4] & 0x0F0F0F0Fu, b[4 + e4] = (r.q[e4] >> 4) & 0x0F0F0F0Fu;
            if (QT == T_Q5_0) {
                b[e4] |= spread4((r.h[1] >> (4 * e4)) & 0xF);
                b[4 + e4] |= spread4((r.h[1] >> (16 + 4 * e4)) & 0xF);
            }
        }
    }
}

// Loads and dequantizes the lane's 32 weights of step `g` to floats (the embedding); false
// when its columns lie past the end of the row. A byte becomes a float by putting it under
// the exponent of 2^23 (one byte permute) and taking 2^23 plus the offset away.
template <int QT>
__device__ __forceinline__ bool load32(const uint8_t* row, int k, int g, int lane, float* w,
                                       int& c0) {
    if (!lane_has<QT>(k, g, lane)) return false;
    Raw r;
    raw_load<QT>(row, g, lane, r);
    u32 b[8];
    float sc[2], mn[2] = {0.f, 0.f};
    unpack_q<QT>(r, lane, b, sc, mn);
    const float off = 8388608.f + Off<QT>::v;
#pragma unroll
    for (int e4 = 0; e4 < 8; ++e4)
#pragma unroll
        for (int f = 0; f < 4; ++f) {
            const float q = __int_as_float(__byte_perm(b[e4], 0x4B000000u, 0x7540u | f)) - off;
            w[4 * e4 + f] = sc[e4 >> 2] * q + mn[e4 >> 2];
        }
    c0 = col0<QT>(g, lane);
    return true;
}

// The matrix-vector kernels take their inputs as 16-bit integers with a scale per 16
// columns (x ~ scale * xq, |xq| <= 32767: an error under 2^-16 of the 16 columns' largest),
// so a weight costs half a `dp2a` (two 16-bit by 8-bit products added into 32 bits,
// exactly) instead of a conversion and a float multiply-add, and half the shared-memory
// bytes. Each block rounds the input rows into shared memory in the order its lanes read
// them: per sequence and 1024-column step, the 32 lanes' 16-byte words (word v of lane L at
// (32 v + L) * 16: no bank conflicts), then each lane's (scale, sum of xq) for its halves.
#define XQ_STEP 2560  // bytes per sequence and step: 4 x 32 x 16 of xq, 32 x 16 of scales

__device__ __forceinline__ u32 pack16(int a, int b) { return (u32)(a & 0xFFFF) | ((u32)b << 16); }

// Whether products of types QT and QT2 read their inputs in the same order: the K types each
// have their own (`col0`), the 32-wide ones share one. A mixed product of two orders rounds
// its inputs twice, into two regions of shared memory.
template <int QT> struct IsK { static constexpr bool v = QT == T_Q4_K || QT == T_Q6_K; };
template <int QT, int QT2> struct Orders {
    static constexpr int v = QT == QT2 || (!IsK<QT>::v && !IsK<QT2>::v) ? 1 : 2;
};

// Item `rem` of a row's rounding (step, lane, half: 16 columns with one scale): whether the
// row has it and its first column.
template <int QT>
__device__ __forceinline__ bool item_col(int rem, int k, int& c) {
    const int g = rem >> 6, lane = (rem >> 1) & 31, h = rem & 1;
    if (!lane_has<QT>(k, g, lane)) return false;
    c = col0<QT>(g, lane) + h * Layout<QT>::X;
    return true;
}

__device__ __forceinline__ void load16(const float* p, float (&v)[16]) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const float4 q = *(const float4*)(p + 4 * e);
        v[4 * e] = q.x, v[4 * e + 1] = q.y, v[4 * e + 2] = q.z, v[4 * e + 3] = q.w;
    }
}

// The norm weights of the thread's first item, loaded before the wait: they are constant,
// and read after it every block's 8 KB of them queued behind the inputs at L2 (H100 batch
// 1: QKV 4.16 -> 3.89 us, gate/up 7.03 -> 6.66, LM head 16.0 -> 14.8; `kernels-npre-log.txt`).
// A thread's items are the same columns of successive rows when the block's threads are a
// multiple of the items per row (hidden 2048, 512 threads: 128); others load as before.
struct NormPre {
    float w[16];
    int rem;  // the item (order, step, lane, half) they are for, or -1
};
template <int QT, int QT2>
__device__ __forceinline__ void norm_pre(const MvArgs& a, int n, int ng, NormPre& p) {
    const int per = ng * 64;
    int c;
    p.rem = -1;
    if constexpr (Orders<QT, QT2>::v == 1) {
        const int rem = threadIdx.x % per;
        if (!a.norm_in || (int)threadIdx.x >= n * per || !item_col<QT>(rem, a.k, c)) return;
        p.rem = rem;
    } else {
        const int t = threadIdx.x, ord = t >= n * per, rem = (t - ord * n * per) % per;
        if (!a.norm_in || t >= 2 * n * per) return;
        if (!(ord ? item_col<QT2>(rem, a.k, c) : item_col<QT>(rem, a.k, c))) return;
        p.rem = ord * per + rem;
    }
    load16(a.norm_in + c, p.w);
}

// With `norm_in` the rows are RMS-normed: the norm's weights multiply x before rounding and
// the row's 1 / rms goes to `rs`, for the kernel to scale its sums with (the normed copy is
// never written: no extra pass over the rows, no last block that waits for the others).
// With two input orders (`Orders`) the rows are rounded in both: the second order's items
// follow the first's, into the region after the first's NB rows; sums of squares come from
// the first only.
template <int QT, int NB, int QT2>
__device__ void quantize_x(const MvArgs& a, int n, int ng, uint8_t* sm, float* rs, const NormPre& np) {
    const int per = ng * 64;  // (step, lane, half)
    constexpr int ORD = Orders<QT, QT2>::v;
    float ss[NB];  // this thread's sums of squares per row
#pragma unroll
    for (int i = 0; i < NB; ++i) ss[i] = 0.f;
    for (int idx = threadIdx.x; idx < ORD * n * per; idx += blockDim.x) {
        const int ord = ORD > 1 && idx >= n * per, j = idx - ord * n * per;
        const int i = j / per, rem = j - i * per, g = rem >> 6, lane = (rem >> 1) & 31, h = rem & 1;
        int c;
        if (!(ord ? item_col<QT2>(rem, a.k, c) : item_col<QT>(rem, a.k, c))) continue;
        float v[16];
        load16(a.x + (size_t)i * a.k + c, v);
        if (a.norm_in) {
            const float* gp = a.norm_in + c;
            float s2 = 0.f;
            const bool pre = ord * per + rem == np.rem;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float4 w = pre ? make_float4(np.w[4 * e], np.w[4 * e + 1], np.w[4 * e + 2], np.w[4 * e + 3])
                                     : *(const float4*)(gp + 4 * e);
                s2 += v[4 * e] * v[4 * e] + v[4 * e + 1] * v[4 * e + 1] + v[4 * e + 2] * v[4 * e + 2] +
                      v[4 * e + 3] * v[4 * e + 3];
                v[4 * e] *= w.x, v[4 * e + 1] *= w.y, v[4 * e + 2] *= w.z, v[4 * e + 3] *= w.w;
            }
#pragma unroll
            for (int ii = 0; ii < NB; ++ii)
                if (ii == i && !ord) ss[ii] += s2;
        }
        float m = 0.f;
#pragma unroll
        for (int e = 0; e < 16; ++e) m = fmaxf(m, fabsf(v[e]));
        const float inv = m > 0.f ? 32767.f / m : 0.f;
        int q[16], s = 0;
#pragma unroll
        for (int e = 0; e < 16; ++e) q[e] = __float2int_rn(v[e] * inv), s += q[e];
        uint8_t* base = sm + (size_t)((ord * NB + i) * ng + g) * XQ_STEP;
        *(uint4*)(base + ((2 * h) * 32 + lane) * 16) =
            make_uint4(pack16(q[0], q[1]), pack16(q[2], q[3]), pack16(q[4], q[5]), pack16(q[6], q[7]));
        *(uint4*)(base + ((2 * h + 1) * 32 + lane) * 16) =
            make_uint4(pack16(q[8], q[9]), pack16(q[10], q[11]), pack16(q[12], q[13]), pack16(q[14], q[15]));
        *(float2*)(base + 2048 + lane * 16 + h * 8) = make_float2(m / 32767.f, __int_as_float(s));
    }
    // the rows' sums of squares in a fixed order (deterministic)
    __shared__ float red[WARPS][NB];
    const int t = threadIdx.x;
    if (a.norm_in) {
#pragma unroll
        for (int i = 0; i < NB; ++i) {
            const float v = warp_sum(ss[i]);
            if ((t & 31) == 0) red[t >> 5][i] = v;
        }
    }
    __syncthreads();
    if (t < NB) {
        float v = 0.f;
        if (a.norm_in) {
#pragma unroll
            for (int w = 0; w < WARPS; ++w) v += red[w][t];
        }
        rs[t] = a.norm_in ? 1.f / sqrtf(v / (float)a.k + a.eps) : 1.f;
    }
    __syncthreads();
}

// d = c + x.lo * b.byte(0|2) + x.hi * b.byte(1|3): signed 16-bit x, unsigned 8-bit weights
__device__ __forceinline__ int dp2a_lo(u32 x, u32 b, int c) {
    int d;
    asm("dp2a.lo.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(x), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ int dp2a_hi(u32 x, u32 b, int c) {
    int d;
    asm("dp2a.hi.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(x), "r"(b), "r"(c));
    return d;
}

// Writes output (sequence i, row r) of a product whose sum is v (SwiGLU: v2 the up row's)
// as the mode says; returns what it wrote. With `pre`, `y0` is the residual y, read already.
template <int MODE>
__device__ __forceinline__ float store_out(const MvArgs& a, int i, int r, float v, float v2,
                                           bool pre = false, float y0 = 0.f) {
    float* yp = a.y + (size_t)i * a.ldy + r;
    float out;
    if (MODE == MODE_RESID) {
        out = (pre ? y0 : *yp) + v;
    } else if (MODE == MODE_GLU) {
        out = v / (1.f + expf(-v)) * v2;
    } else {
        out = a.bias ? v + a.bias[r] : v;
    }
    *yp = out;
    return out;
}

// A warp per output row at a time (SwiGLU: the gate row and its up row, which share the
// inputs), reading every weight once for all NB input rows. The grid is at most what the
// GPU holds at once (`graph.rs` sizes it by occupancy) and warps stride over the rows, so
// there are no waves of blocks: a warp's work is a sequence of units (a row's weights for
// U steps of 1024 columns), and the next unit's weight loads are issued before the current
// one is multiplied, so each warp keeps a unit of loads in flight all the time. These
// kernels are bound by memory latency, not bytes. The first unit's loads come before the
// wait on the previous kernel (programmatic dependent launch): they overlap its tail. The
// mode is a template parameter (registers: occupancy).
#ifndef UG
#define UG 3      // steps per unit (plain and residual products)
#endif
#ifndef UG_GLU
#define UG_GLU 2  // SwiGLU: two weight rows per warp, so fewer steps per unit
#endif

template <int QT, int U, int RW>
__device__ __forceinline__ void load_unit(const MvArgs& a, int r, int g0, int ng, int lane,
                                          Raw (&raw)[U][RW], bool (&has)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        has[u] = g0 + u < ng && lane_has<QT>(a.k, g0 + u, lane);
#pragma unroll
        for (int h = 0; h < RW; ++h)
            if (has[u]) raw_load<QT>(a.w + (size_t)(r + h * a.rows) * a.row_bytes, g0 + u, lane, raw[u][h]);
    }
}

// `mvx_*`: the unit of row `r` (one weight row: plain products only) from the row's range
// of weights; `sec`: whether the range is of the second type.
template <int QT, int QT2, int U>
__device__ __forceinline__ void load_unit_mixed(const MvArgs& a, const MvSegs& x, int r, int g0, int ng,
                                                int lane, Raw (&raw)[U][1], bool (&has)[U], bool& sec) {
    const int j = r < x.end0 ? 0 : r < x.end1 ? 1 : 2;
    const int r0 = j == 0 ? 0 : j == 1 ? x.end0 : x.end1;
    const uint8_t* w = j == 0 ? a.w : j == 1 ? x.w1 : x.w2;
    const unsigned long long rb = j == 0 ? a.row_bytes : j == 1 ? x.rb1 : x.rb2;
    const uint8_t* row = w + (size_t)(r - r0) * rb;
    sec = (x.second >> j) & 1;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        if (sec) {
            has[u] = g0 + u < ng && lane_has<QT2>(a.k, g0 + u, lane);
            if (has[u]) raw_load<QT2>(row, g0 + u, lane, raw[u][0]);
        } else {
            has[u] = g0 + u < ng && lane_has<QT>(a.k, g0 + u, lane);
            if (has[u]) raw_load<QT>(row, g0 + u, lane, raw[u][0]);
        }
    }
}

// Adds the lane's products of step `g` (its weights as loaded in `raw`, RW rows) with the
// n input rows rounded into `xq` to `acc`.
template <int QT, int NB, int RW>
__device__ __forceinline__ void mul_step(const Raw (&raw)[RW], int lane, const uint8_t* xq, int ng, int g, int n,
                                         float (&acc)[RW][NB]) {
    u32 b[RW][8];
    float sc[RW][2], mn[RW][2];
#pragma unroll
    for (int h = 0; h < RW; ++h) unpack_q<QT>(raw[h], lane, b[h], sc[h], mn[h]);
#pragma unroll
    for (int i = 0; i < NB; ++i) {
        if (i < n) {
            const uint8_t* base = xq + (size_t)(i * ng + g) * XQ_STEP;
            const float4 xs = *(const float4*)(base + 2048 + lane * 16);  // scale, sum per half
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const uint4 p0 = *(const uint4*)(base + ((2 * hf) * 32 + lane) * 16);
                const uint4 p1 = *(const uint4*)(base + ((2 * hf + 1) * 32 + lane) * 16);
                const u32 xw[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
                const int sx = __float_as_int(hf ? xs.w : xs.y);
#pragma unroll
                for (int h = 0; h < RW; ++h) {
                    int d = 0;
#pragma unroll
                    for (int e4 = 0; e4 < 4; ++e4)
                        d = dp2a_hi(xw[2 * e4 + 1], b[h][4 * hf + e4], dp2a_lo(xw[2 * e4], b[h][4 * hf + e4], d));
                    // the format's offset taken off in integers: exact
                    float v = sc[h][hf] * (float)(d - Off<QT>::v * sx);
                    if (HasMin<QT>::v) v += mn[h][hf] * (float)sx;
                    acc[h][i] += (hf ? xs.z : xs.x) * v;
                }
            }
        }
    }
}

// QT2 != QT: a mixed product (`mvx_*`, plain mode): each row range of its own weights and
// type (`sg`), the inputs rounded in both types' orders. (Others ignore `sg`; reading `a`
// through a template type instead changed their code: Q6_K batch 1 0.782 -> 0.810 ms.)
template <int QT, int NB, int MODE, int QT2 = QT>
__device__ void matvec(const MvArgs& a, const MvSegs& sg) {
    constexpr bool MIX = QT2 != QT;
    static_assert(!MIX || MODE == MODE_PLAIN, "mixed products are plain");
    constexpr int RW = MODE == MODE_GLU ? 2 : 1;  // weight rows per warp
    constexpr int U = MODE == MODE_GLU ? UG_GLU : UG;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int stride = gridDim.x * WARPS;
    const int ng = (a.k + 1023) / 1024;
    int r = blockIdx.x * WARPS + warp, g0 = 0;
    Raw raw[U][RW], nxt[U][RW];
    bool has[U], nhas[U], sec = false, nsec = false;
    // the row count comes from the host's upload, not from an earlier kernel: read before
    // the wait, it costs no round trip after it
    const int n = *a.n;
    if (r < a.rows) {
        if constexpr (MIX)
            load_unit_mixed<QT, QT2, U>(a, sg, r, 0, ng, lane, raw, has, sec);
        else
            load_unit<QT, U, RW>(a, r, 0, ng, lane, raw, has);
    }
    // Residual products: lane i's residual of sequence i at the warp's first row, read
    // before the wait too (one round trip less after it; a warp has one row at batch 1).
    // Its last writer is at least two kernels back (down: the output projection, output
    // projection: the previous layer's down), complete before the kernel before this one
    // passed its own wait, which is when this one could start; `__ldcg`: from L2, not from
    // an L1 line older than that write.
    float y0 = 0.f;
    const int r0 = r;
    if (MODE == MODE_RESID && r < a.rows && lane < n) y0 = __ldcg(a.y + (size_t)lane * a.ldy + r);
    NormPre np;
    norm_pre<QT, QT2>(a, n, ng, np);
    pdl_wait();
    // NB * ng * XQ_STEP bytes (graph.rs), twice for a mixed product of two input orders
    extern __shared__ __align__(16) uint8_t xq[];
    __shared__ float rs[NB];
    quantize_x<QT, NB, QT2>(a, n, ng, xq, rs, np);
    float acc[RW][NB];
#pragma unroll
    for (int h = 0; h < RW; ++h)
#pragma unroll
        for (int i = 0; i < NB; ++i) acc[h][i] = 0.f;
    while (r < a.rows) {
        // the next unit: the rest of this row, or the warp's next row
        const bool row_end = g0 + U >= ng;
        const int rn = row_end ? r + stride : r, gn = row_end ? 0 : g0 + U;
        if (rn < a.rows) {
            if constexpr (MIX)
                load_unit_mixed<QT, QT2, U>(a, sg, rn, gn, ng, lane, nxt, nhas, nsec);
            else
                load_unit<QT, U, RW>(a, rn, gn, ng, lane, nxt, nhas);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if constexpr (MIX) {
                if (has[u] && sec)
                    mul_step<QT2, NB, RW>(raw[u], lane, xq + (Orders<QT, QT2>::v > 1 ? (size_t)NB * ng * XQ_STEP : 0),
                                          ng, g0 + u, n, acc);
                else if (has[u])
                    mul_step<QT, NB, RW>(raw[u], lane, xq, ng, g0 + u, n, acc);
            } else {
                if (has[u]) mul_step<QT, NB, RW>(raw[u], lane, xq, ng, g0 + u, n, acc);
            }
        }
        if (row_end) {
#pragma unroll
            for (int i = 0; i < NB; ++i) {
                if (i < n) {
                    const float v = warp_sum(acc[0][i]) * rs[i];
                    const float v2 = RW > 1 ? warp_sum(acc[RW - 1][i]) * rs[i] : 0.f;
                    if (lane == i) store_out<MODE>(a, i, r, v, v2, r == r0, y0);
                }
#pragma unroll
                for (int h = 0; h < RW; ++h) acc[h][i] = 0.f;
            }
        }
        r = rn;
        g0 = gn;
        if constexpr (MIX) sec = nsec;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            has[u] = nhas[u];
#pragma unroll
            for (int h = 0; h < RW; ++h) raw[u][h] = nxt[u][h];
        }
    }
}

// ---- Batches of 8 to 32 sequences: tensor cores --------------------------------------
// Y[NB, rows] = X[NB, k] W^T with `mma.m16n8k16` (bf16 inputs, f32 sums): the sequences are
// the A operand (16 per tile, X rounded to bf16 on load), the weight rows the B operand
// (8 per tile, dequantized to bf16 in registers), so every weight byte is read once per
// step for all sequences. Not the exact product of the f32 path: inputs and weights are
// rounded to bf16 (f16 would be 8x more precise, but activations of real models exceed
// its range), unless MM_SPLIT (the default) adds the products of what the rounding left:
// then the error is near f32's. `bench/gpu/kernels.py` measures it against the f32 kernels.
//
// Within a 64-column group the order of columns inside the 16-wide k slices does not
// matter as long as A and B agree, so thread t of a quad takes 16 weights whose bytes are
// adjacent (`mm_group`) and reads the same columns of X, a float4 per slice and row.
// Slice s (0..3) of the group holds the thread's columns col(s, t) .. +3: the K types keep
// a byte's two nibbles 32 columns apart, the 32-column blocks 16 apart.
template <int QT>
__device__ __forceinline__ int mm_col(int s, int t) {
    return QT == T_Q4_K || QT == T_Q6_K ? (s >> 1) * 32 + (s & 1) * 4 + 8 * t
                                        : (s >> 1) * 32 + (s & 1) * 16 + 4 * t;
}

__device__ __forceinline__ u32 h2(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *(const u32*)&h;
}

// What bf16 rounding left of a pair packed by h2: with MM_SPLIT, a product is taken as
// hi*hi + hi*lo + lo*hi (three tensor-core products), about f32's precision.
__device__ __forceinline__ u32 h2lo(float a, float b, u32 hi) {
    const float2 f = __bfloat1622float2(*(const __nv_bfloat162*)&hi);
    return h2(a - f.x, b - f.y);
}
#ifndef MM_SPLIT
#define MM_SPLIT 1
#endif

// Thread t's weights of 64-column group G of a row, as bf16 pairs in B-fragment order:
// h[2s] = columns col(s,t), +1; h[2s+1] = col(s,t) + 2, +3.
template <int QT>
__device__ __forceinline__ void mm_group(const uint8_t* row, int G, int t, u32* h, u32* lo) {
    float v[16];  // v[4s + e]: column col(s, t) + e
    if (QT == T_Q4_K) {
        // bytes 8t..8t+7 of sub-block pair j: low nibbles are columns 8t.., high 32+8t..
        const uint8_t* b = row + (size_t)(G >> 2) * 144;
        const int j = G & 3;
        const float2 dm = __half22float2(*(const __half2*)b);
        u32 sc[3];
        sc[0] = ((const u32*)(b + 4))[0];
        sc[1] = ((const u32*)(b + 4))[1];
        sc[2] = ((const u32*)(b + 4))[2];
        float s0, m0, s1, m1;
        q4k_scale(sc, 2 * j, s0, m0);
        q4k_scale(sc, 2 * j + 1, s1, m1);
        const float d0 = dm.x * s0, n0 = dm.y * m0, d1 = dm.x * s1, n1 = dm.y * m1;
        const uint2 q = *(const uint2*)(b + 16 + 32 * j + 8 * t);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const u32 by = ((e < 4 ? q.x : q.y) >> (8 * (e & 3))) & 0xFF;
            v[e] = d0 * u2f(by & 0xF) - n0;        // slices 0, 1
            v[8 + e] = d1 * u2f(by >> 4) - n1;     // slices 2, 3
        }
    } else if (QT == T_Q6_K) {
        // group G is quarters (2(G&1), 2(G&1)+1) of half G/2 % 2 of super-block G/4; a
        // quarter's column l has its low bits in ql[l (+32 for odd quarters)] (high nibble
        // for quarters 2, 3) and its top two in qh[l]
        const uint8_t* b = row + (size_t)(G >> 2) * 210;
        const int nh = (G >> 1) & 1, qa = 2 * (G & 1);
        const float d = ldh(b + 208);
        const int8_t* sc = (const int8_t*)(b + 192 + 8 * nh);
        const uint8_t* ql = b + 64 * nh;
        const uint8_t* qh = b + 128 + 32 * nh;
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // slices 2h, 2h+1: quarter qa + h, columns l = 8t..8t+7
            const int q = qa + h;
            const u32 l0 = ld16x2(ql + 32 * (q & 1) + 8 * t), l1 = ld16x2(ql + 32 * (q & 1) + 8 * t + 4);
            const u32 h0 = ld16x2(qh + 8 * t), h1 = ld16x2(qh + 8 * t + 4);
            const float sd = d * (float)sc[(8 * t) / 16 + 2 * q];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const u32 lb = ((e < 4 ? l0 : l1) >> (8 * (e & 3))) & 0xFF;
                const u32 hb = ((e < 4 ? h0 : h1) >> (8 * (e & 3))) & 0xFF;
                const u32 x = ((lb >> (4 * (q >> 1))) & 0xF) | (((hb >> (2 * q)) & 3) << 4);
                v[8 * h + e] = sd * (u2f(x) - 32.f);
            }
        }
    } else {
        // two 32-column blocks, 2G (slices 0, 1) and 2G+1 (slices 2, 3): byte j holds
        // column j in its low nibble and j + 16 in its high one (Q8_0: column j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int blk = 2 * G + h;
            if (QT == T_Q8_0) {
                const uint8_t* b = row + (size_t)blk * 34;
                const float d = ldh(b);
                // columns 4t..4t+3 (slice 2h) and 16+4t.. (slice 2h+1)
                const u32 lo = ld16x2(b + 2 + 4 * t), hi = ld16x2(b + 2 + 16 + 4 * t);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    v[8 * h + e] = (u2f(((lo >> (8 * e)) & 0xFF) ^ 0x80) - 128.f) * d;
                    v[8 * h + 4 + e] = (u2f(((hi >> (8 * e)) & 0xFF) ^ 0x80) - 128.f) * d;
                }
            } else {
                const int bs = QT == T_Q4_0 ? 18 : QT == T_Q4_1 ? 20 : 22;
                const int hdr = QT == T_Q4_0 ? 2 : QT == T_Q4_1 ? 4 : 6;
                const uint8_t* b = row + (size_t)blk * bs;
                float d, mn = 0.f;
                if (QT == T_Q4_1) {
                    const float2 dm = __half22float2(*(const __half2*)b);
                    d = dm.x;
                    mn = dm.y;
                } else {
                    d = ldh(b);
                }
                const u32 qh = QT == T_Q5_0 ? ld16x2(b + 2) : 0;
                // bytes 4t..4t+3: columns 4t.. (low nibbles), 16+4t.. (high nibbles)
                const u32 q = ld16x2(b + hdr + 4 * t);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = 4 * t + e;
                    const u32 by = (q >> (8 * e)) & 0xFF;
                    u32 x0 = by & 0xF, x1 = by >> 4;
                    if (QT == T_Q5_0) {
                        x0 |= ((qh >> c) << 4) & 0x10;
                        x1 |= (qh >> (c + 12)) & 0x10;
                    }
                    const float off = QT == T_Q4_0 ? 8.f : QT == T_Q5_0 ? 16.f : 0.f;
                    v[8 * h + e] = QT == T_Q4_1 ? u2f(x0) * d + mn : (u2f(x0) - off) * d;
                    v[8 * h + 4 + e] = QT == T_Q4_1 ? u2f(x1) * d + mn : (u2f(x1) - off) * d;
                }
            }
        }
    }
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        h[2 * s] = h2(v[4 * s], v[4 * s + 1]);
        h[2 * s + 1] = h2(v[4 * s + 2], v[4 * s + 3]);
        if (MM_SPLIT) {
            lo[2 * s] = h2lo(v[4 * s], v[4 * s + 1], h[2 * s]);
            lo[2 * s + 1] = h2lo(v[4 * s + 2], v[4 * s + 3], h[2 * s + 1]);
        }
    }
}

__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#ifndef MM_WARPS
#define MM_WARPS 8  // warps per block, each summing every MM_WARPS-th 64-column group
#endif
// The same, residual products (output projection, down): their 2,048 rows make 128 blocks,
// fewer than the SMs, so with 8-warp blocks each SM held only 8 warps. H100, `kernels.py`
// Q4_K: 16 rows 2.86 -> 2.49 ms a step, 32 rows 3.57 -> 2.96 together with the SwiGLU bound
// below (`kernels-mmtune-log.txt`).
#ifndef MM_WARPS_R
#define MM_WARPS_R 16
#endif
template <int MODE> struct MmWarps { static constexpr int v = MODE == MODE_RESID ? MM_WARPS_R : MM_WARPS; };
#define MM_ROWS 16  // output rows per block (two 8-row tiles; SwiGLU: and their up rows)

#ifndef MM_INT
#define MM_INT 1
#endif
// MM_INT (Q4_K): the weights' 4-bit integers go to the tensor cores as they are (exact in
// bf16), the inputs as bf16 hi + lo halves: two products a slice instead of three, and no
// float dequantization. Each 32-column sub-block's sums are then scaled by its row's
// d * scale, and its minimum (dmin * min times the inputs' sum over the sub-block) taken off.
// H100, Q4_K step (`kernels.py`, `kernels-int-log.txt`): 16 sequences 2.571 -> 2.274 ms,
// 32: 2.959 -> 2.896; rel. L2 to the matrix-vector reference 4.9e-7 (5.6e-7 before).
// `-DMM_INT=0` keeps the bf16 dequantization for Q4_K too.

// two 4-bit integers of `word` (bytes b, b + 1; the low nibbles or, sh = 4, the high ones) as a
// bf16 pair: 0x4300 | q is 128 + q exactly, less 128 leaves q
template <int SEL>
__device__ __forceinline__ u32 q4_pair(u32 word, int sh) {
    const u32 p = (__byte_perm(word, 0, SEL) >> sh) & 0x000F000Fu;
    const u32 v = p | 0x43004300u;
    const __nv_bfloat162 r = __hsub2(*(const __nv_bfloat162*)&v, __floats2bfloat162_rn(128.f, 128.f));
    return *(const u32*)&r;
}

template <int QT, int NB, int MODE>
__device__ void matmul(const MvArgs& a) {
    constexpr bool glu = MODE == MODE_GLU;
    constexpr int NW = MmWarps<MODE>::v;
    constexpr int MT = (NB + 15) / 16;  // 16-sequence tiles
    constexpr int NT = glu ? 4 : 2;     // 8-row weight tiles
    const int n = *a.n;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int r0 = blockIdx.x * MM_ROWS;
    const uint8_t* rows[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int r = min(r0 + 8 * (j & 1) + g, a.rows - 1) + (j >> 1) * a.rows;
        rows[j] = a.w + (size_t)r * a.row_bytes;
    }
    float acc[MT][NT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.f;
    // split over the warps along k: short chains of dependent loads per warp, many in flight
    const int groups = a.k / 64;
    for (int G = warp; G < groups; G += NW) {
#if MM_INT
        if constexpr (QT == T_Q4_K) {
            const int jq = G & 3;  // sub-block pair of the super-block
            uint2 q[NT];           // bytes 8t..8t+7 of the pair's 32: low nibbles sub-block 2jq, high 2jq+1
#pragma unroll
            for (int j = 0; j < NT; ++j) q[j] = *(const uint2*)(rows[j] + (size_t)(G >> 2) * 144 + 16 + 32 * jq + 8 * t);
            float own_d[NT][2], own_n[NT][2];  // row g's d * scale and dmin * min, both sub-blocks
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const uint8_t* b = rows[j] + (size_t)(G >> 2) * 144;
                const float2 dm = __half22float2(*(const __half2*)b);
                u32 sc[3];
                sc[0] = ((const u32*)(b + 4))[0];
                sc[1] = ((const u32*)(b + 4))[1];
                sc[2] = ((const u32*)(b + 4))[2];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float sv, mv;
                    q4k_scale(sc, 2 * jq + h, sv, mv);
                    own_d[j][h] = dm.x * sv;
                    own_n[j][h] = dm.y * mv;
                }
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // sub-block 2jq + h: slices 2h, 2h + 1
                // this thread's sums are output rows 2t and 2t + 1 of each tile: their scales
                // from the lanes that read those rows (lane 4r reads row r of a tile)
                float ds[NT][2], dn[NT][2];
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        ds[j][e] = __shfl_sync(0xffffffffu, own_d[j][h], 4 * (2 * t + e));
                        dn[j][e] = __shfl_sync(0xffffffffu, own_n[j][h], 4 * (2 * t + e));
                    }
                float ac[MT][NT][4], xs[MT][2];
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    xs[m][0] = xs[m][1] = 0.f;
#pragma unroll
                    for (int j = 0; j < NT; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e) ac[m][j][e] = 0.f;
                }
#pragma unroll
                for (int s2 = 0; s2 < 2; ++s2) {
                    const int c = 64 * G + mm_col<QT>(2 * h + s2, t);
                    u32 b0[NT], b1[NT];
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        const u32 word = s2 ? q[j].y : q[j].x;
                        b0[j] = q4_pair<0x4140>(word, 4 * h);
                        b1[j] = q4_pair<0x4342>(word, 4 * h);
                    }
#pragma unroll
                    for (int m = 0; m < MT; ++m) {
                        const float4 x0 = *(const float4*)(a.x + (size_t)(16 * m + g) * a.k + c);
                        const float4 x1 = *(const float4*)(a.x + (size_t)(16 * m + g + 8) * a.k + c);
                        xs[m][0] += (x0.x + x0.y) + (x0.z + x0.w);
                        xs[m][1] += (x1.x + x1.y) + (x1.z + x1.w);
                        const u32 af[4] = {h2(x0.x, x0.y), h2(x1.x, x1.y), h2(x0.z, x0.w), h2(x1.z, x1.w)};
                        const u32 al[4] = {h2lo(x0.x, x0.y, af[0]), h2lo(x1.x, x1.y, af[1]),
                                           h2lo(x0.z, x0.w, af[2]), h2lo(x1.z, x1.w, af[3])};
#pragma unroll
                        for (int j = 0; j < NT; ++j) {
                            mma16816(ac[m][j], af, b0[j], b1[j]);
                            mma16816(ac[m][j], al, b0[j], b1[j]);
                        }
                    }
                }
#pragma unroll
                for (int m = 0; m < MT; ++m)
#pragma unroll
                    for (int u = 0; u < 2; ++u) {  // the sub-block's 32 columns: the quad's 4 threads
                        xs[m][u] += __shfl_xor_sync(0xffffffffu, xs[m][u], 1);
                        xs[m][u] += __shfl_xor_sync(0xffffffffu, xs[m][u], 2);
                    }
#pragma unroll
                for (int m = 0; m < MT; ++m)
#pragma unroll
                    for (int j = 0; j < NT; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            acc[m][j][e] += ds[j][e & 1] * ac[m][j][e] - dn[j][e & 1] * xs[m][e >> 1];
            }
        } else
#endif
        {
            u32 w[NT][8], wl[NT][MM_SPLIT ? 8 : 1];
#pragma unroll
            for (int j = 0; j < NT; ++j) mm_group<QT>(rows[j], G, t, w[j], wl[j]);
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                const int c = 64 * G + mm_col<QT>(s, t);
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    // sequences g and g + 8 of the tile; those past `n` read stale rows of the
                    // buffer, and their outputs are dropped
                    const float4 x0 = *(const float4*)(a.x + (size_t)(16 * m + g) * a.k + c);
                    const float4 x1 = *(const float4*)(a.x + (size_t)(16 * m + g + 8) * a.k + c);
                    const u32 af[4] = {h2(x0.x, x0.y), h2(x1.x, x1.y), h2(x0.z, x0.w), h2(x1.z, x1.w)};
#pragma unroll
                    for (int j = 0; j < NT; ++j) mma16816(acc[m][j], af, w[j][2 * s], w[j][2 * s + 1]);
                    if (MM_SPLIT) {
                        const u32 al[4] = {h2lo(x0.x, x0.y, af[0]), h2lo(x1.x, x1.y, af[1]),
                                           h2lo(x0.z, x0.w, af[2]), h2lo(x1.z, x1.w, af[3])};
#pragma unroll
                        for (int j = 0; j < NT; ++j) {
                            mma16816(acc[m][j], al, w[j][2 * s], w[j][2 * s + 1]);
                            mma16816(acc[m][j], af, wl[j][2 * s], wl[j][2 * s + 1]);
                        }
                    }
                }
            }
        }
    }
    // the warps' partial tiles, summed in a fixed order (deterministic)
    __shared__ float red[NW][MT * NT * 4][32];
    __shared__ float outs[32][MM_ROWS];  // RESID: outputs, for the sums of squares
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) red[warp][(m * NT + j) * 4 + e][lane] = acc[m][j][e];
    __syncthreads();
    // element q: lane ql of tile (m, j < 2), fragment entry e = sequence 16m + ql/4 (+8 for
    // e >= 2), output row r0 + 8j + 2(ql%4) + e%2
    for (int q = threadIdx.x; q < MT * 2 * 4 * 32; q += blockDim.x) {
        const int ql = q & 31, e = (q >> 5) & 3, m = q >> 8, j = (q >> 7) & 1;
        float v = 0.f, v2 = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            v += red[w][(m * NT + j) * 4 + e][ql];
            if (glu) v2 += red[w][(m * NT + j + 2) * 4 + e][ql];
        }
        const int i = 16 * m + (ql >> 2) + 8 * (e >> 1), rl = 8 * j + 2 * (ql & 3) + (e & 1);
        const int r = r0 + rl;
        const float out = i < n && r < a.rows ? store_out<MODE>(a, i, r, v, v2) : 0.f;
        if (MODE == MODE_RESID) outs[i][rl] = out;
    }
    if constexpr (MODE == MODE_RESID) {
        __syncthreads();
        const int tt = threadIdx.x;
        if (tt < n) {
            float v = 0.f;
#pragma unroll
            for (int rl = 0; rl < MM_ROWS; ++rl) v += outs[tt][rl] * outs[tt][rl];
            a.part[(size_t)tt * gridDim.x + blockIdx.x] = v;
        }
        // `norm_rows` follows: for up to 32 rows a last-block pass would write 32x the
        // normed values from a single block (measured ~50 us of a step's layer)
    }
}

// After a tensor-core residual product: each block of this grid (row i, a slice of its
// columns) sums row i's partial squares in a fixed order (every block the same way, so all
// agree bit for bit) and writes its slice of the normed copy `xn`.
__device__ void norm_rows(const MvArgs& a) {
    const int i = blockIdx.x;
    if (i >= *a.n) return;
    __shared__ float red[32];
    __shared__ float rs;
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    float s = 0.f;
    for (int b = t; b < a.parts; b += blockDim.x) s += a.part[(size_t)i * a.parts + b];
    s = warp_sum(s);
    if (lane == 0) red[warp] = s;
    __syncthreads();
    if (t == 0) {
        float v = 0.f;
        for (int w = 0; w < (int)blockDim.x / 32; ++w) v += red[w];
        rs = 1.f / sqrtf(v / (float)a.rows + a.eps);
    }
    __syncthreads();
    const int c = blockIdx.y * blockDim.x + t;
    if (c < a.rows) a.xn[(size_t)i * a.rows + c] = a.y[(size_t)i * a.ldy + c] * rs * a.norm_next[c];
}

// Token embeddings into the residual stream `x`, and their RMS-normed copy `xn` (by the
// first layer's attention norm `nw`).
template <int QT>
__device__ void embed(const uint8_t* table, unsigned long long row_bytes, int hidden,
                      const int* tok, const int* n, float* x, float* xn, const float* nw,
                      float eps) {
    const int i = blockIdx.x;
    if (i >= *n) return;
    const uint8_t* row = table + (size_t)tok[i] * row_bytes;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float ss = 0.f;
    constexpr int X = Layout<QT>::X;
    for (int g = warp; g < (hidden + 1023) / 1024; g += blockDim.x / 32) {
        float w[32];
        int c0;
        if (!load32<QT>(row, hidden, g, lane, w, c0)) continue;
#pragma unroll
        for (int e = 0; e < 16; ++e) {
            x[(size_t)i * hidden + c0 + e] = w[e];
            x[(size_t)i * hidden + c0 + X + e] = w[16 + e];
            ss += w[e] * w[e] + w[16 + e] * w[16 + e];
        }
    }
    __shared__ float red[32];
    __shared__ float rs;
    ss = warp_sum(ss);
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.f;
        for (int w = 0; w < (int)blockDim.x / 32; ++w) s += red[w];
        rs = 1.f / sqrtf(s / (float)hidden + eps);
    }
    __syncthreads();
    for (int c = threadIdx.x; c < hidden; c += blockDim.x)
        xn[(size_t)i * hidden + c] = x[(size_t)i * hidden + c] * rs * nw[c];
}

// RoPE of one (a, b) pair of a head vector. One function for every kernel that rotates
// keys, so a key cached by `kv_write` rounds exactly like one an attention kernel rotates.
__device__ __forceinline__ void rope_pair(const float* src, int a, int b, float sn, float cs,
                                          float* dst) {
    const float x0 = src[a] * cs - src[b] * sn, x1 = src[a] * sn + src[b] * cs;
    dst[a] = x0;
    dst[b] = x1;
}

// The score of query `qs` (shared memory) against key `kr`, before scaling.
template <int D>
__device__ __forceinline__ float key_dot(const float* qs, const float* kr) {
    float d = 0.f;
#pragma unroll
    for (int e = 0; e < D; e += 4) {
        const float4 kv = *(const float4*)(kr + e);
        d += qs[e] * kv.x + qs[e + 1] * kv.y + qs[e + 2] * kv.z + qs[e + 3] * kv.w;
    }
    return d;
}

// RoPE on the new keys and the keys/values written to each row's KV slot, before attention,
// for steps where several rows extend the same sequence (prompt tokens fed through the
// graph): each row's attention then reads the keys of the rows before it from the cache.
// A block per (KV head, row), D threads.
template <int D>
__device__ void kv_write(const float* qkv, int ldq, float* kc, float* vc, int heads,
                         int kv_heads, int cap, const float* inv_freq, int interleaved,
                         const int* pos_a, const int* slot_a, const int* n) {
    const int i = blockIdx.y;
    if (i >= *n) return;
    const int kvh = blockIdx.x, t = threadIdx.x, pos = pos_a[i], slot = slot_a[i];
    const float* row = qkv + (size_t)i * ldq;
    const size_t at = (((size_t)slot * kv_heads + kvh) * (size_t)cap + pos) * D;
    if (t < D / 2) {
        const int a = interleaved ? 2 * t : t;
        const int b = interleaved ? 2 * t + 1 : t + D / 2;
        float sn, cs;
        sincosf((float)pos * inv_freq[t], &sn, &cs);
        rope_pair(row + (heads + kvh) * D, a, b, sn, cs, kc + at);
    }
    if (t < D) vc[at + t] = row[(heads + kv_heads + kvh) * D + t];
}

// Decode attention for one (query head, sequence), for small batches (a block per query
// head keeps the GPU busy where a block per KV head would leave it idle): RoPE on the new query and key, the new
// key/value written to the sequence's KV slot (by the group's first head), then softmax
// over positions 0..=pos in two passes over a score row in shared memory (dynamic,
// `cap` floats): scores with one position per thread (many independent loads in flight),
// then values with threads over (position group, dimension). The new position is read
// from shared memory, so heads of the same group never wait on each other's writes.
template <int D>
__device__ void attention_head(const float* qkv, int ldq, float* out, float* kc, float* vc,
                          int heads, int kv_heads, int cap, const float* inv_freq,
                          int interleaved, const int* pos_a, const int* slot_a, const int* n,
                          float scale, int write_kv) {
    const int i = blockIdx.y;
    if (i >= *n) return;
    const int h = blockIdx.x, group = heads / kv_heads, kvh = h / group;
    const int pos = pos_a[i], slot = slot_a[i];
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, nw = blockDim.x / 32;
    extern __shared__ float sc[];
    __shared__ __align__(16) float qs[D];
    __shared__ __align__(16) float kn[D];
    __shared__ float vn[D];
    __shared__ float red[32];
    __shared__ float part[1024 / D][D];
    const float* q = qkv + (size_t)i * ldq + h * D;
    const float* k = qkv + (size_t)i * ldq + (heads + kvh) * D;
    const float* v = qkv + (size_t)i * ldq + (heads + kv_heads + kvh) * D;
    if (t < D / 2) {
        const int a = interleaved ? 2 * t : t;
        const int b = interleaved ? 2 * t + 1 : t + D / 2;
        float s, c;
        sincosf((float)pos * inv_freq[t], &s, &c);
        rope_pair(q, a, b, s, c, qs);
        rope_pair(k, a, b, s, c, kn);
    }
    if (t < D) vn[t] = v[t];
    __syncthreads();
    const size_t base = ((size_t)slot * kv_heads + kvh) * (size_t)cap * D;
    float* kb = kc + base;
    float* vb = vc + base;
    if (write_kv && h % group == 0 && t < D) {
        kb[(size_t)pos * D + t] = kn[t];
        vb[(size_t)pos * D + t] = vn[t];
    }
    // pass 1: scores and their maximum
    float mx = -INFINITY;
    for (int j = t; j <= pos; j += blockDim.x) {
        const float* kr = j == pos && write_kv ? kn : kb + (size_t)j * D;
        const float d = key_dot<D>(qs, kr) * scale;
        sc[j] = d;
        mx = fmaxf(mx, d);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    mx = red[0];
    for (int w = 1; w < nw; ++w) mx = fmaxf(mx, red[w]);
    __syncthreads();
    // probabilities (unnormalized) and their sum
    float sum = 0.f;
    for (int j = t; j <= pos; j += blockDim.x) {
        const float p = expf(sc[j] - mx);
        sc[j] = p;
        sum += p;
    }
    sum = warp_sum(sum);
    if (lane == 0) red[warp] = sum;
    __syncthreads();
    float den = 0.f;
    for (int w = 0; w < nw; ++w) den += red[w];
    // pass 2: values, threads over (position group, dimension)
    const int G = blockDim.x / D, gi = t / D, d = t % D;
    if (gi < G) {
        // eight independent loads in flight per thread: this loop is latency-bound
        float o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        int j = gi;
        for (; j + 7 * G < pos; j += 8 * G) {
#pragma unroll
            for (int u = 0; u < 8; ++u) o[u] += sc[j + u * G] * vb[(size_t)(j + u * G) * D + d];
        }
        for (; j < pos; j += G) o[0] += sc[j] * vb[(size_t)j * D + d];
        if (j == pos) o[1] += sc[pos] * vn[d];
        part[gi][d] = ((o[0] + o[1]) + (o[2] + o[3])) + ((o[4] + o[5]) + (o[6] + o[7]));
    }
    __syncthreads();
    if (t < D) {
        float s = 0.f;
        for (int g = 0; g < G; ++g) s += part[g][t];
        out[(size_t)i * heads * D + h * D + t] = s / den;
    }
}

// Decode attention for small batches, split over positions (flash-decoding): a block per
// (query head, chunk of positions, sequence). With a block per head, 32 blocks each
// walked a whole context in a few long chains of loads; here each block takes at most
// ATT_CHUNK... positions (more only past ATT_SPLITS chunks), writes its chunk's maximum,
// sum and unnormalized output to `part`, and the last of a head's blocks to finish
// (a counter per (sequence, head)) combines them in chunk order (deterministic). RoPE on
// the new query and key in every block; the new key/value go to the KV slot from the
// block of the group's first head that holds the last chunk. Threads: T, at least D
// (SPLIT_THREADS; `attention_split_small`, for two sequences: max(64, D) threads and half
// the copy-ahead, so more of the smaller blocks start while the QKV product runs:
// `kernels.py` Q4_K step at batch 2 0.901 -> 0.830 ms; at batch 1 no gain).
// The cached keys and values of a chunk (its first PFF / D positions, PFF = ATT_PF) do not depend on
// the kernels before (only the new position is written in this step), so in decode steps
// they are copied to shared memory (`cp.async`) before the wait on the previous kernel:
// the chunk's loads overlap the QKV product instead of following it.
#ifndef ATT_CHUNK
#define ATT_CHUNK 32
#endif
#ifndef ATT_SPLITS
#define ATT_SPLITS 16
#endif
#define SPLIT_THREADS 128
#ifndef ATT_PF
#define ATT_PF 4096  // floats of keys (and as many of values) a block copies ahead
#endif

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    const u32 d = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
}

// Chunk `sp` of a sequence's `len` positions for the split attention kernels: chunks of
// at least ATT_CHUNK positions, at most ATT_SPLITS of them (`S`), positions [j0, j1).
__device__ __forceinline__ void att_chunk(int len, int sp, int& chunk, int& S, int& j0, int& j1) {
    chunk = max(ATT_CHUNK, (len + ATT_SPLITS - 1) / ATT_SPLITS);
    S = (len + chunk - 1) / chunk, j0 = sp * chunk, j1 = min(len, j0 + chunk);
}

// Row `i`'s position, KV slot and the chunk `sp` of it a split attention block takes, or
// false (after the wait every block owes) when the row is not in this step or the chunk is
// past its positions. The step's rows, positions and slots come from the host, not from
// earlier kernels: read before the wait.
__device__ __forceinline__ bool att_block(const int* n, const int* pos_a, const int* slot_a, int i,
                                          int sp, int& pos, int& slot, int& chunk, int& S, int& j0,
                                          int& j1) {
    if (i >= *n) {
        pdl_wait();
        return false;
    }
    pos = pos_a[i], slot = slot_a[i];
    att_chunk(pos + 1, sp, chunk, S, j0, j1);
    if (sp >= S) {
        pdl_wait();
        return false;
    }
    return true;
}

// Copies `np` cached key and value rows from position j0 on to shared memory rows of D + 4
// floats (`cp.async` by the block's T threads, one commit group).
template <int D, int T>
__device__ __forceinline__ void copy_ahead(float* ks, float* vs, const float* kb, const float* vb, int j0,
                                           int np) {
    constexpr int DP = D + 4;
    for (int c = threadIdx.x; c < np * (D / 4); c += T) {
        const int j = c / (D / 4), e = 4 * (c % (D / 4));
        cp_async16(ks + j * DP + e, kb + (size_t)(j0 + j) * D + e);
        cp_async16(vs + j * DP + e, vb + (size_t)(j0 + j) * D + e);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
}

// Copies `n` floats from global memory (as written by other blocks) to shared memory in
// rounds of N loads a thread, each round's loads all issued before the first is used (one
// round trip to L2 a round, not one a float), then syncs the block.
template <int T, int N>
__device__ __forceinline__ void stage(float* dst, const float* src, int n) {
    for (int b = threadIdx.x; b < n; b += N * T) {
        float r[N];
#pragma unroll
        for (int k = 0; k < N; ++k) r[k] = b + k * T < n ? __ldcg(src + b + k * T) : 0.f;
#pragma unroll
        for (int k = 0; k < N; ++k)
            if (b + k * T < n) dst[b + k * T] = r[k];
    }
    __syncthreads();
}

// RoPE on row `row`'s query of head `h` into `qs` and, with `has_new`, on its key of KV head
// `kvh` into `kn`, its value into `vn` (the block's first D threads; sn, cs: the angle of
// thread t's pair at the row's position).
template <int D>
__device__ __forceinline__ void new_row(const float* row, int h, int heads, int kv_heads, int kvh, bool has_new,
                                        int interleaved, float sn, float cs, float* qs, float* kn, float* vn) {
    const int t = threadIdx.x;
    if (t < D / 2) {
        const int a = interleaved ? 2 * t : t;
        const int b = interleaved ? 2 * t + 1 : t + D / 2;
        rope_pair(row + h * D, a, b, sn, cs, qs);
        if (has_new) rope_pair(row + (heads + kvh) * D, a, b, sn, cs, kn);
    }
    if (has_new && t < D) vn[t] = row[(heads + kv_heads + kvh) * D + t];
}

// One query's attention over positions [j0, j1) by the block's T threads: the keys and
// values of the first `np` from shared memory (`ks`, `vs`: rows of D + 4 floats), the new
// position's (`pos`, decode steps) from `kn`, `vn`, the rest from the cache rows `kb`, `vb`;
// the scores go to `sc`. Returns thread t's (< D) output summed over the chunk, not yet
// divided by `den`; `mx`: the chunk's largest score, `den`: its sum of exponentials.
template <int D, int T>
__device__ __forceinline__ float attend_chunk(const float* qs, const float* kn, const float* vn, const float* ks,
                                              const float* vs, const float* kb, const float* vb, int j0, int j1,
                                              int np, int pos, int write_kv, float scale, float* sc, float& mx,
                                              float& den) {
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    constexpr int NW = T / 32, DP = D + 4, DQ = D / 4, PG = T / DQ;
    __shared__ float red[NW];
    __shared__ __align__(16) float po[PG][D];
    // scores, one position per thread
    mx = -INFINITY;
    for (int j = j0 + t; j < j1; j += T) {
        const float* kr = j == pos && write_kv ? kn : j - j0 < np ? ks + (j - j0) * DP : kb + (size_t)j * D;
        const float d = key_dot<D>(qs, kr) * scale;
        sc[j - j0] = d;
        mx = fmaxf(mx, d);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    mx = red[0];
#pragma unroll
    for (int w = 1; w < NW; ++w) mx = fmaxf(mx, red[w]);
    __syncthreads();
    float sum = 0.f;
    for (int j = t; j < j1 - j0; j += T) {
        const float p = expf(sc[j] - mx);
        sc[j] = p;
        sum += p;
    }
    sum = warp_sum(sum);
    if (lane == 0) red[warp] = sum;
    __syncthreads();  // also publishes sc
    den = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) den += red[w];
    // values: threads over (position group, 4 dimensions), eight 16-byte loads in flight
    const int gi = t / DQ, dq = t % DQ;
    float o[4] = {0.f, 0.f, 0.f, 0.f};
    for (int jb = j0 + gi; jb < j1; jb += 8 * PG) {
        float4 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int j = jb + u * PG;
            const float* vr = j == pos && write_kv ? vn : j - j0 < np ? vs + (j - j0) * DP : vb + (size_t)j * D;
            v[u] = j < j1 ? *(const float4*)(vr + 4 * dq) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int j = jb + u * PG;
            const float p = j < j1 ? sc[j - j0] : 0.f;
            o[0] += p * v[u].x;
            o[1] += p * v[u].y;
            o[2] += p * v[u].z;
            o[3] += p * v[u].w;
        }
    }
    *(float4*)&po[gi][4 * dq] = make_float4(o[0], o[1], o[2], o[3]);
    __syncthreads();
    float v = 0.f;
    if (t < D) {
#pragma unroll
        for (int g = 0; g < PG; ++g) v += po[g][t];
    }
    return v;
}

// Whether this block is the last of `S` to arrive at `cnt` (after the block's writes); the
// last one then sees every other block's writes from before its arrival. Thread 0 adds with
// acquire-release semantics after the block's barrier: one round trip to L2 where a fence by
// every thread and then a plain add took two (H100, `kernels.py` Q4_K step, logits bitwise as
// before: `attention_split` at 2 rows 0.845 -> 0.837 ms, at 8 rows 2.221 -> 2.167; 1 row and
// `attention_gqa` at 4 and 8 level; `kernels-one-log.txt`).
__device__ __forceinline__ bool last_to_arrive(u32* cnt, u32 S) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 old;
        asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(cnt) : "memory");
        last = old == S - 1;
    }
    __syncthreads();
    return last;
}

template <int D, int T, int PFF>
__device__ void attention_split(const float* qkv, int ldq, float* out, float* kc, float* vc,
                                int heads, int kv_heads, int cap, const float* inv_freq,
                                int interleaved, const int* pos_a, const int* slot_a,
                                const int* n, float scale, int write_kv, float* part,
                                u32* counter) {
    const int i = blockIdx.z, h = blockIdx.x, sp = blockIdx.y, group = heads / kv_heads, kvh = h / group;
    int pos, slot, chunk, S, j0, j1;
    if (!att_block(n, pos_a, slot_a, i, sp, pos, slot, chunk, S, j0, j1)) return;
    const int len = pos + 1;
    const int t = threadIdx.x;
    constexpr int PF = PFF / D, DP = D + 4;  // padded rows: no bank conflicts
    extern __shared__ __align__(16) float sc[];  // [chunk, rounded up to 4], then K, V [PF][DP]
    float* ks = sc + ((chunk + 3) & ~3);
    float* vs = ks + PF * DP;
    const size_t base = ((size_t)slot * kv_heads + kvh) * (size_t)cap * D;
    float* kb = kc + base;
    float* vb = vc + base;
    // decode steps: positions before `pos` only (the new one comes from the QKV row)
    const int np = write_kv ? max(0, min(min(j1, pos) - j0, PF)) : 0;
    copy_ahead<D, T>(ks, vs, kb, vb, j0, np);
    float sn = 0.f, cs = 1.f;  // the RoPE angle of this thread's pair needs only `pos`
    if (t < D / 2) sincosf((float)pos * inv_freq[t], &sn, &cs);
    pdl_wait();
    __shared__ __align__(16) float qs[D];
    __shared__ __align__(16) float kn[D];
    __shared__ __align__(16) float vn[D];
    const bool has_new = j1 == len;  // this chunk holds the new position
    new_row<D>(qkv + (size_t)i * ldq, h, heads, kv_heads, kvh, has_new, interleaved, sn, cs, qs, kn, vn);
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    if (write_kv && has_new && h % group == 0 && t < D) {
        kb[(size_t)pos * D + t] = kn[t];
        vb[(size_t)pos * D + t] = vn[t];
    }
    float mx, den;
    const float ov = attend_chunk<D, T>(qs, kn, vn, ks, vs, kb, vb, j0, j1, np, pos, write_kv, scale, sc, mx, den);
    float* dst = out + (size_t)i * heads * D + h * D;
    if (S == 1) {
        if (t < D) dst[t] = ov / den;
        return;
    }
    // this chunk's (max, sum, output) for the combining block
    float* mine = part + (((size_t)i * heads + h) * ATT_SPLITS + sp) * (D + 2);
    if (t < D) mine[2 + t] = ov;
    if (t == 0) mine[0] = mx, mine[1] = den;
    u32* cnt = counter + (size_t)i * heads + h;
    if (!last_to_arrive(cnt, (u32)S)) return;
    // The chunks' results, staged in shared memory by independent loads (the copied keys
    // and values are no longer needed): read in the combining loop, each load waited for
    // before the next, they were a chain of round trips to L2 (kernels.py, batch 1: the
    // kernel 7.1 -> 6.6 us, `kernels-combine-log.txt`).
    static_assert(ATT_SPLITS * (D + 2) <= 2 * (PFF / D) * DP, "chunk results fit where K, V were");
    const float* all = part + ((size_t)i * heads + h) * ATT_SPLITS * (D + 2);
    stage<T, 16>(ks, all, S * (D + 2));
    float m = -INFINITY;
    for (int s2 = 0; s2 < S; ++s2) m = fmaxf(m, ks[s2 * (D + 2)]);
    if (t < D) {
        float l = 0.f, v = 0.f;
        for (int s2 = 0; s2 < S; ++s2) {
            const float* c = ks + s2 * (D + 2);
            const float f = expf(c[0] - m);
            l += c[1] * f;
            v += c[2 + t] * f;
        }
        dst[t] = v / l;
    }
    if (t == 0) *cnt = 0;
}

// RoPE on the new queries of the `group` heads that share KV head `kvh` (into qs) and,
// with `key`, on its new key (into kn), by the block's T threads.
template <int D, int T>
__device__ __forceinline__ void rope_group(const float* row, int heads, int kvh, int group, int pos,
                                           const float* inv_freq, int interleaved, bool key,
                                           float (*qs)[D], float* kn) {
    for (int u = threadIdx.x; u < (group + 1) * (D / 2); u += T) {
        const int hh = u / (D / 2), p = u % (D / 2);  // hh == group: the new key
        if (hh == group && !key) continue;
        const int a = interleaved ? 2 * p : p;
        const int b = interleaved ? 2 * p + 1 : p + D / 2;
        float sn, cs;
        sincosf((float)pos * inv_freq[p], &sn, &cs);
        rope_pair(hh < group ? row + (kvh * group + hh) * D : row + (heads + kvh) * D, a, b, sn, cs,
                  hh < group ? qs[hh] : kn);
    }
}

// Decode attention for small batches, grouped: a block per (sequence, KV head, chunk of
// positions) does every query head that shares the KV head (a warp per head), so each
// cached key and value is read once per group, not once per query head as in
// `attention_split` (8x fewer bytes for TinyLlama's 8 heads per KV head), over 8x fewer
// blocks. Chunks as in `attention_split`; the cached rows of the chunk are copied to shared
// memory before the wait on the QKV product; the last of a (sequence, KV head)'s chunks to
// finish combines them in chunk order (deterministic). Threads: GQA_THREADS (128 was slower:
// two heads a warp). Used from 3 sequences on (buckets 4, 8): at 1 and 2 the whole step is
// faster with `attention_split`, whose smaller blocks fit beside the QKV product's and start
// early.
#ifndef GQA_THREADS
#define GQA_THREADS 256
#endif
#define ATT_GMAX 8  // query heads per KV head at most (attention_gqa, attention_group)
template <int D>
__device__ void attention_gqa(const float* qkv, int ldq, float* out, float* kc, float* vc,
                              int heads, int kv_heads, int cap, const float* inv_freq,
                              int interleaved, const int* pos_a, const int* slot_a, const int* n,
                              float scale, int write_kv, float* part, u32* counter) {
    // the prologue of `att_block`, written out: with the helper ptxas allocates this kernel
    // differently (74 registers instead of 64) and its batch-8 step took 2.29 instead of
    // 2.15 ms on the H100 (`kernels-review-log.txt`)
    const int sp = blockIdx.x, kvh = blockIdx.y, i = blockIdx.z;
    if (i >= *n) {
        pdl_wait();
        return;
    }
    const int group = heads / kv_heads;
    const int pos = pos_a[i], slot = slot_a[i], len = pos + 1;
    int chunk, S, j0, j1;
    att_chunk(len, sp, chunk, S, j0, j1);
    if (sp >= S) {
        pdl_wait();
        return;
    }
    constexpr int DP = D + 4, NW = GQA_THREADS / 32, E = D / 32;  // E: dimensions per lane
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int cp4 = (chunk + 3) & ~3;
    extern __shared__ __align__(16) float sm[];  // scores [group][cp4], then K, V [PF][DP]
    float* ks = sm + group * cp4;
    float* vs = ks + (ATT_PF / D) * DP;
    const size_t base = ((size_t)slot * kv_heads + kvh) * (size_t)cap * D;
    float* kb = kc + base;
    float* vb = vc + base;
    // decode steps: positions before `pos` only (the new one comes from the QKV row)
    const int np = write_kv ? max(0, min(min(j1, pos) - j0, ATT_PF / D)) : 0;
    copy_ahead<D, GQA_THREADS>(ks, vs, kb, vb, j0, np);
    pdl_wait();
    __shared__ __align__(16) float qs[ATT_GMAX][D];
    __shared__ __align__(16) float kn[D];
    __shared__ __align__(16) float vn[D];
    const float* row = qkv + (size_t)i * ldq;
    const bool has_new = write_kv && j1 == len;  // this chunk holds the new position
    rope_group<D, GQA_THREADS>(row, heads, kvh, group, pos, inv_freq, interleaved, has_new, qs, kn);
    if (has_new && t < D) vn[t] = row[(heads + kv_heads + kvh) * D + t];
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    if (has_new && t < D) {
        kb[(size_t)pos * D + t] = kn[t];
        vb[(size_t)pos * D + t] = vn[t];
    }
    // a warp per query head: scores with a lane per position, softmax, then values with a
    // lane per E dimensions; no block-wide step until the chunk's results are out
    for (int h = warp; h < group; h += NW) {
        float* sc = sm + h * cp4;
        float mx = -INFINITY;
        for (int j = j0 + lane; j < j1; j += 32) {
            const float* kr = has_new && j == pos ? kn : j - j0 < np ? ks + (j - j0) * DP : kb + (size_t)j * D;
            const float d = key_dot<D>(qs[h], kr) * scale;
            sc[j - j0] = d;
            mx = fmaxf(mx, d);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float sum = 0.f;
        for (int j = lane; j < j1 - j0; j += 32) {
            const float p = expf(sc[j] - mx);
            sc[j] = p;
            sum += p;
        }
        sum = warp_sum(sum);
        __syncwarp();
        // four independent sums: the loop's adds do not wait on each other
        float o[4][E];
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
            for (int e = 0; e < E; ++e) o[u][e] = 0.f;
        for (int jb = j0; jb < j1; jb += 4) {
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int j = jb + u;
                if (j < j1) {
                    const float p = sc[j - j0];
                    const float* vr = has_new && j == pos ? vn : j - j0 < np ? vs + (j - j0) * DP : vb + (size_t)j * D;
#pragma unroll
                    for (int e = 0; e < E; ++e) o[u][e] += p * vr[lane * E + e];
                }
            }
        }
        const int hq = kvh * group + h;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const float v = (o[0][e] + o[1][e]) + (o[2][e] + o[3][e]);
            if (S == 1) {
                out[(size_t)i * heads * D + hq * D + lane * E + e] = v / sum;
            } else {
                part[(((size_t)i * heads + hq) * ATT_SPLITS + sp) * (D + 2) + 2 + lane * E + e] = v;
            }
        }
        if (S > 1 && lane == 0) {
            float* mine = part + (((size_t)i * heads + hq) * ATT_SPLITS + sp) * (D + 2);
            mine[0] = mx, mine[1] = sum;
        }
    }
    if (S == 1) return;
    // the last of the (sequence, KV head)'s chunks combines them, in chunk order
    u32* cnt = counter + (size_t)i * kv_heads + kvh;
    if (!last_to_arrive(cnt, (u32)S)) return;
    // every chunk's results of the group's heads: staged in shared memory by coalesced loads
    // where they fit (the copied keys and values are no longer needed), then combined
    const float* all = part + ((size_t)i * heads + kvh * group) * ATT_SPLITS * (D + 2);
    constexpr int RS = ATT_SPLITS * (D + 2);  // floats of one head's chunk results
    const bool staged = group * RS <= 2 * (ATT_PF / D) * DP;
    if (staged) stage<GQA_THREADS, 16>(ks, all, group * RS);
    const float* src = staged ? ks : all;
    for (int u = t; u < group * D; u += GQA_THREADS) {
        const int h = u / D, d = u % D;
        const float* r = src + h * RS;
        float m = -INFINITY;
        for (int s2 = 0; s2 < S; ++s2) m = fmaxf(m, staged ? r[s2 * (D + 2)] : __ldcg(r + s2 * (D + 2)));
        float l = 0.f, v = 0.f;
        for (int s2 = 0; s2 < S; ++s2) {
            const float* c = r + s2 * (D + 2);
            const float f = expf((staged ? c[0] : __ldcg(c)) - m);
            l += (staged ? c[1] : __ldcg(c + 1)) * f;
            v += (staged ? c[2 + d] : __ldcg(c + 2 + d)) * f;
        }
        out[(size_t)i * heads * D + (kvh * group + h) * D + d] = v / l;
    }
    if (t == 0) *cnt = 0;
}

// Decode attention for one sequence (the batch-1 bucket): a 512-thread block per (KV head,
// chunk of at most ONE_CH positions) does every query head that shares the KV head, each
// cached key and value copied to shared memory once, before the wait. The graph runs the QKV
// product before it on all but `one_free` SMs (graph.rs), so these blocks start on SMs of
// their own and reach the wait while the QKV product runs; `attention_split`'s blocks start
// as the QKV product's leave. After the wait: the queries' RoPE, the scores (a thread per
// position and quarter of the dimensions, its key quarter in registers for all the heads),
// the softmax (a warp per head), the values (a thread per 4 dimensions and group of
// positions, all heads at once), then the last of the KV head's blocks combines the chunks
// in chunk order (deterministic). H100, `kernels.py` Q4_K step at batch 1, against
// `attention_split`: see `kernels-one-log.txt`. Head size 64, 1 to 8 query heads a KV head
// (`G`, a kernel each: the loops over the heads unrolled).
#define ONE_CH 64   // positions a block copies ahead (more only past ATT_SPLITS chunks)
#define ONE_T 512
#define ONE_DP 80   // floats a cached row takes in shared memory: two rows fill the 32 banks

// Floats of one head's scores (the longest chunk): graph.rs sizes the shared memory with it.
__device__ __forceinline__ int one_stride(int cap) {
    return (max(ONE_CH, (cap + ATT_SPLITS - 1) / ATT_SPLITS) + 3) & ~3;
}

template <int D, int G>
__device__ void attention_one(const float* qkv, float* out, float* kc, float* vc, int heads, int kv_heads, int cap,
                              const float* inv_freq, int interleaved, const int* pos_a, const int* slot_a,
                              const int* n, float scale, int write_kv, float* part, u32* counter) {
    static_assert(D == 64, "the thread layouts take 64 dimensions");
    constexpr int CH = ONE_CH, T = ONE_T, DP = ONE_DP, NW = T / 32;
    static_assert(G >= 1 && G * D <= T, "a thread per output of the group");
    const int kvh = blockIdx.x, sp = blockIdx.y;
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    // the step's rows, position and slot come from the host's upload: loaded together
    const int rows = *n, pos = pos_a[0], slot = slot_a[0], len = pos + 1;
    if (rows < 1) {
        pdl_wait();
        return;
    }
    const int S = min((len + CH - 1) / CH, ATT_SPLITS), chunk = (len + S - 1) / S;
    const int j0 = sp * chunk, j1 = min(len, j0 + chunk), cnt = j1 - j0;
    if (sp >= S) {
        pdl_wait();
        return;
    }
    const int PS = one_stride(cap);
    extern __shared__ __align__(16) float sm[];
    float* ks = sm;                 // [CH][DP]
    float* vs = ks + CH * DP;       // [CH][DP]
    float* ps = vs + CH * DP;       // [G][PS]: scores, then probabilities
    float* red = ps + G * PS;       // [NW][G][D]: the values' sums per warp
    __shared__ __align__(16) float qs[G][D];
    __shared__ __align__(16) float kn[D];
    __shared__ __align__(16) float vn[D];
    __shared__ float mh[G], lh[G];
    const size_t base = ((size_t)slot * kv_heads + kvh) * (size_t)cap * D;
    float* kb = kc + base;
    float* vb = vc + base;
    // decode steps: positions before `pos` from the cache, the new one (row nc) from the QKV
    // row, into shared memory with the others where it fits
    const bool has_new = write_kv && j1 == len;
    const int nc = has_new ? cnt - 1 : cnt, npf = min(nc, CH);
    for (int c = t; c < npf * (D / 4); c += T) {
        const int j = c / (D / 4), e = 4 * (c % (D / 4));
        cp_async16(ks + j * DP + e, kb + (size_t)(j0 + j) * D + e);
        cp_async16(vs + j * DP + e, vb + (size_t)(j0 + j) * D + e);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    const int pr = t % (D / 2);
    float sn = 0.f, cs = 1.f;
    if (t < (G + 1) * (D / 2)) sincosf((float)pos * inv_freq[pr], &sn, &cs);
    pdl_wait();
    const int a = interleaved ? 2 * pr : pr, b = interleaved ? 2 * pr + 1 : pr + D / 2;
    float* kr_new = nc < CH ? ks + nc * DP : kn;
    float* vr_new = nc < CH ? vs + nc * DP : vn;
    if (t < G * (D / 2)) {
        rope_pair(qkv + (kvh * G + t / (D / 2)) * D, a, b, sn, cs, qs[t / (D / 2)]);
    } else if (t < (G + 1) * (D / 2)) {
        if (has_new) rope_pair(qkv + (heads + kvh) * D, a, b, sn, cs, kr_new);
    } else if (t < (G + 1) * (D / 2) + D) {
        if (has_new) vr_new[t - (G + 1) * (D / 2)] = qkv[(heads + kv_heads + kvh) * D + t - (G + 1) * (D / 2)];
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    if (has_new && t < D) {
        kb[(size_t)pos * D + t] = kr_new[t];
        vb[(size_t)pos * D + t] = vr_new[t];
    }
    // scores: thread (position t / 4, float4s q, q + 4, q + 8, q + 12 of the key, q = t % 4);
    // `row`: where row p of the chunk is (past CH: the new one, or from the cache)
    auto scores = [&](auto row) {
        for (int p0 = 0; p0 < cnt; p0 += T / 4) {
            const int p = p0 + (t >> 2), q = t & 3;
            const bool ok = p < cnt;
            const float* kr = row(ks, kn, kb, ok ? p : 0);
            float4 k4[4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
                k4[i] = ok ? *(const float4*)(kr + 4 * (4 * i + q)) : make_float4(0.f, 0.f, 0.f, 0.f);
            float d[G];
#pragma unroll
            for (int h = 0; h < G; ++h) {
                float s = 0.f;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float4 q4 = *(const float4*)(&qs[h][4 * (4 * i + q)]);
                    s += q4.x * k4[i].x + q4.y * k4[i].y + q4.z * k4[i].z + q4.w * k4[i].w;
                }
                s += __shfl_xor_sync(0xffffffffu, s, 1);
                s += __shfl_xor_sync(0xffffffffu, s, 2);
                d[h] = s;
            }
            if (ok && q == 0) {
#pragma unroll
                for (int h = 0; h < G; ++h) ps[h * PS + p] = d[h] * scale;
            }
        }
    };
    auto in_smem = [](const float* sh, const float*, const float*, int p) -> const float* { return sh + p * DP; };
    auto anywhere = [&](const float* sh, const float* nw, const float* gl, int p) -> const float* {
        return p < CH ? sh + p * DP : p == nc ? nw : gl + (size_t)(j0 + p) * D;
    };
    if (cnt <= CH) {
        scores(in_smem);
    } else {
        scores(anywhere);
    }
    __syncthreads();
    // softmax: a warp per head
    if (warp < G) {
        float* sc = ps + warp * PS;
        float mx = -INFINITY;
        for (int j = lane; j < cnt; j += 32) mx = fmaxf(mx, sc[j]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float sum = 0.f;
        for (int j = lane; j < cnt; j += 32) {
            const float e = expf(sc[j] - mx);
            sc[j] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        if (lane == 0) mh[warp] = mx, lh[warp] = sum;
    }
    __syncthreads();
    // values: thread (4 dimensions dq = t % 16, positions t / 16 + 32 k), every head at once
    const int dq = t & 15;
    float acc[G][4];
#pragma unroll
    for (int h = 0; h < G; ++h) acc[h][0] = acc[h][1] = acc[h][2] = acc[h][3] = 0.f;
    auto values = [&](auto row) {
        for (int p = t >> 4; p < cnt; p += T / 16) {
            const float4 v = *(const float4*)(row(vs, vn, vb, p) + 4 * dq);
#pragma unroll
            for (int h = 0; h < G; ++h) {
                const float w = ps[h * PS + p];
                acc[h][0] += w * v.x, acc[h][1] += w * v.y, acc[h][2] += w * v.z, acc[h][3] += w * v.w;
            }
        }
    };
    if (cnt <= CH) {
        values(in_smem);
    } else {
        values(anywhere);
    }
    // lanes 16-31 hold the next position group of lanes 0-15; then the warps' sums
#pragma unroll
    for (int h = 0; h < G; ++h)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[h][e] += __shfl_xor_sync(0xffffffffu, acc[h][e], 16);
    if (lane < 16) {
#pragma unroll
        for (int h = 0; h < G; ++h)
            *(float4*)(red + (warp * G + h) * D + 4 * dq) = make_float4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
    }
    __syncthreads();
    const int h = t / D, d = t % D, hq = kvh * G + h;
    const bool mine = h < G;
    float o = 0.f;
    if (mine) {
#pragma unroll
        for (int w = 0; w < NW; ++w) o += red[(w * G + h) * D + d];
    }
    if (S == 1) {
        if (mine) out[hq * D + d] = o / lh[h];
        return;
    }
    // this chunk's (max, sum, outputs) for the combining block
    if (mine) {
        float* r = part + ((size_t)hq * ATT_SPLITS + sp) * (D + 2);
        r[2 + d] = o;
        if (d == 0) r[0] = mh[h], r[1] = lh[h];
    }
    if (!last_to_arrive(counter + kvh, (u32)S)) return;
    if (mine) {
        // every chunk's (max, sum, output) of the thread's head: all loads first
        const float* all = part + (size_t)hq * ATT_SPLITS * (D + 2);
        float cm[ATT_SPLITS], cl[ATT_SPLITS], co[ATT_SPLITS];
#pragma unroll
        for (int c = 0; c < ATT_SPLITS; ++c) {
            if (c < S) {
                cm[c] = __ldcg(all + c * (D + 2)), cl[c] = __ldcg(all + c * (D + 2) + 1);
                co[c] = __ldcg(all + c * (D + 2) + 2 + d);
            }
        }
        float m = -INFINITY;
#pragma unroll
        for (int c = 0; c < ATT_SPLITS; ++c)
            if (c < S) m = fmaxf(m, cm[c]);
        float l = 0.f, v = 0.f;
#pragma unroll
        for (int c = 0; c < ATT_SPLITS; ++c) {
            if (c < S) {
                const float f = expf(cm[c] - m);
                l += cl[c] * f;
                v += co[c] * f;
            }
        }
        out[hq * D + d] = v / l;
    }
    if (t == 0) counter[kvh] = 0;
}

// Decode attention for one (KV head, sequence) and all the query heads that share it
// (grouped-query attention): RoPE on the new queries and key, the new key/value written to
// the sequence's KV slot, then softmax over positions 0..=pos in two passes over score
// rows in shared memory (dynamic, `group * cap` floats). Each cached key and value is read
// once for the whole group: a block per query head would read them `group` times.
#define ATT_THREADS 256
template <int D>
__device__ void attention_group(const float* qkv, int ldq, float* out, float* kc, float* vc,
                          int heads, int kv_heads, int cap, const float* inv_freq,
                          int interleaved, const int* pos_a, const int* slot_a, const int* n,
                          float scale, int write_kv) {
    const int i = blockIdx.y;
    if (i >= *n) return;
    const int kvh = blockIdx.x, group = heads / kv_heads;
    const int pos = pos_a[i], slot = slot_a[i];
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    constexpr int NW = ATT_THREADS / 32;
    extern __shared__ float sc[];  // [group][cap]
    __shared__ __align__(16) float qs[ATT_GMAX][D];
    __shared__ __align__(16) float kn[D];
    __shared__ __align__(16) float vn[D];
    __shared__ float red[NW][ATT_GMAX];
    __shared__ float mxs[ATT_GMAX], den[ATT_GMAX];
    __shared__ __align__(16) float part[ATT_THREADS / (D / 4)][ATT_GMAX][D];
    const float* row = qkv + (size_t)i * ldq;
    rope_group<D, ATT_THREADS>(row, heads, kvh, group, pos, inv_freq, interleaved, true, qs, kn);
    if (t < D) vn[t] = row[(heads + kv_heads + kvh) * D + t];
    __syncthreads();
    const size_t base = ((size_t)slot * kv_heads + kvh) * (size_t)cap * D;
    float* kb = kc + base;
    float* vb = vc + base;
    if (write_kv && t < D) {
        kb[(size_t)pos * D + t] = kn[t];
        vb[(size_t)pos * D + t] = vn[t];
    }
    // pass 1: scores of every head of the group, one position per thread
    float mx[ATT_GMAX];
#pragma unroll
    for (int h = 0; h < ATT_GMAX; ++h) mx[h] = -INFINITY;
    for (int j = t; j <= pos; j += ATT_THREADS) {
        const float* kr = j == pos && write_kv ? kn : kb + (size_t)j * D;
        float d[ATT_GMAX];
#pragma unroll
        for (int h = 0; h < ATT_GMAX; ++h) d[h] = 0.f;
#pragma unroll 4
        for (int e = 0; e < D; e += 4) {
            const float4 kv = *(const float4*)(kr + e);
#pragma unroll
            for (int h = 0; h < ATT_GMAX; ++h)
                if (h < group)
                    d[h] += qs[h][e] * kv.x + qs[h][e + 1] * kv.y + qs[h][e + 2] * kv.z +
                            qs[h][e + 3] * kv.w;
        }
#pragma unroll
        for (int h = 0; h < ATT_GMAX; ++h)
            if (h < group) {
                sc[h * cap + j] = d[h] * scale;
                mx[h] = fmaxf(mx[h], d[h] * scale);
            }
    }
#pragma unroll
    for (int h = 0; h < ATT_GMAX; ++h) {
        if (h < group) {
            float v = mx[h];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
            if (lane == 0) red[warp][h] = v;
        }
    }
    __syncthreads();
    if (t < group) {
        float v = red[0][t];
        for (int w = 1; w < NW; ++w) v = fmaxf(v, red[w][t]);
        mxs[t] = v;
    }
    __syncthreads();
    // probabilities (unnormalized) and their sums
    for (int u = t; u < group * (pos + 1); u += ATT_THREADS) {
        const int h = u / (pos + 1), j = u % (pos + 1);
        sc[h * cap + j] = expf(sc[h * cap + j] - mxs[h]);
    }
    __syncthreads();
    for (int h = warp; h < group; h += NW) {
        float v = 0.f;
        for (int j = lane; j <= pos; j += 32) v += sc[h * cap + j];
        v = warp_sum(v);
        if (lane == 0) den[h] = v;
    }
    // pass 2: values, threads over (position group, 4 dimensions), every head at once;
    // eight 16-byte loads in flight per thread (this loop is bound by load latency)
    constexpr int DQ = D / 4, PG = ATT_THREADS / DQ;
    const int gi = t / DQ, dq = t % DQ;
    float o[ATT_GMAX][4];
#pragma unroll
    for (int h = 0; h < ATT_GMAX; ++h) o[h][0] = o[h][1] = o[h][2] = o[h][3] = 0.f;
    for (int j0 = gi; j0 <= pos; j0 += 8 * PG) {
        float4 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int j = j0 + u * PG;
            v[u] = j < pos ? *(const float4*)(vb + (size_t)j * D + 4 * dq)
                           : j == pos ? *(const float4*)(vn + 4 * dq) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int j = j0 + u * PG;
            if (j > pos) break;
#pragma unroll
            for (int h = 0; h < ATT_GMAX; ++h)
                if (h < group) {
                    const float p = sc[h * cap + j];
                    o[h][0] += p * v[u].x;
                    o[h][1] += p * v[u].y;
                    o[h][2] += p * v[u].z;
                    o[h][3] += p * v[u].w;
                }
        }
    }
#pragma unroll
    for (int h = 0; h < ATT_GMAX; ++h)
        if (h < group) *(float4*)&part[gi][h][4 * dq] = make_float4(o[h][0], o[h][1], o[h][2], o[h][3]);
    __syncthreads();
    for (int u = t; u < group * D; u += ATT_THREADS) {
        const int h = u / D, d2 = u % D;
        float v = 0.f;
#pragma unroll
        for (int g2 = 0; g2 < PG; ++g2) v += part[g2][h][d2];
        out[(size_t)i * heads * D + (kvh * group + h) * D + d2] = v / den[h];
    }
}

#ifndef MINB
#define MINB 1  // blocks per SM the matrix-vector kernels' registers must allow (128 registers)
#endif
#define MV(NAME, QT, NB, MODE) \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB) NAME(MvArgs a) { matvec<QT, NB, MODE>(a, MvSegs{}); }
#define MV_MODES(TAG, QT, NB)                   \
    MV(mv_##TAG##_p##NB, QT, NB, MODE_PLAIN)    \
    MV(mv_##TAG##_r##NB, QT, NB, MODE_RESID)    \
    MV(mv_##TAG##_g##NB, QT, NB, MODE_GLU)
// The tensor-core kernels let the next kernel launch only as their blocks end. Launched
// early, the next kernel's blocks sat beside the last of these many-block grids (gate/up at
// 32 rows: 352 blocks, the LM head 2,000; several blocks an SM) and the step was slower than
// with no early launch at all (H100, `kernels.py` Q4_K step: 16 rows 3.33 ms, without PDL
// 2.85, launched at the end 2.78-2.81; 32 rows 3.85 / 3.65 / 3.58; `kernels-late-log.txt`).
// Which shared resource the waiting blocks took was not measured.
// SwiGLU at 32 sequences: registers for two blocks an SM (128, a few bytes spilled) instead
// of the compiler's 139 (one block: 8 warps an SM). H100, `kernels.py` Q4_K: gate/up 56.2 ->
// 40.7 us, the step 3.57 -> 3.20 ms (`kernels-mmtune-log.txt`). Bounds for the plain
// products and for 16 sequences made them slower (`kernels-minb-log.txt`).
#define MM_MINB(NB, MODE) ((MODE) == MODE_GLU && (NB) > 16 ? 2 : 0)
#define MM(NAME, QT, NB, MODE)                                                \
    extern "C" __global__ void __launch_bounds__(MmWarps<MODE>::v * 32, MM_MINB(NB, MODE)) NAME(MvArgs a) { \
        pdl_wait_only();                                                      \
        matmul<QT, NB, MODE>(a);                                              \
        pdl_launch();                                                         \
    }
#define MM_MODES(TAG, QT, NB)                   \
    MM(mm_##TAG##_p##NB, QT, NB, MODE_PLAIN)    \
    MM(mm_##TAG##_r##NB, QT, NB, MODE_RESID)    \
    MM(mm_##TAG##_g##NB, QT, NB, MODE_GLU)
#define MV_ALL(TAG, QT)           \
    MM_MODES(TAG, QT, 16)         \
    MM_MODES(TAG, QT, 32)         \
    MV_MODES(TAG, QT, 1)          \
    MV_MODES(TAG, QT, 2)          \
    MV_MODES(TAG, QT, 4)          \
    MV_MODES(TAG, QT, 8)          \
    extern "C" __global__ void embed_##TAG(const uint8_t* table, unsigned long long row_bytes, \
                                           int hidden, const int* tok, const int* n, float* x, \
                                           float* xn, const float* nw, float eps) {            \
        pdl_wait();                                                              \
        embed<QT>(table, row_bytes, hidden, tok, n, x, xn, nw, eps);             \
    }

// Mixed QKV products (plain mode, the matrix-vector buckets), for the type pairs of common
// files: Q4_K_M's Q4_K with Q6_K (or Q8_0 where a row is not whole 256-blocks), the legacy
// types with Q8_0.
#define MVX(T1, QT1, T2, QT2, NB)                                                         \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB) mvx_##T1##_##T2##_p##NB(MvxArgs a) { \
        matvec<QT1, NB, MODE_PLAIN, QT2>(a.a, a.s);                                          \
    }
#define MVX_ALL(T1, QT1, T2, QT2) MVX(T1, QT1, T2, QT2, 1) MVX(T1, QT1, T2, QT2, 2) MVX(T1, QT1, T2, QT2, 4) MVX(T1, QT1, T2, QT2, 8)
MVX_ALL(q4_k, T_Q4_K, q6_k, T_Q6_K)
MVX_ALL(q4_k, T_Q4_K, q8_0, T_Q8_0)
MVX_ALL(q5_0, T_Q5_0, q8_0, T_Q8_0)
MVX_ALL(q4_0, T_Q4_0, q8_0, T_Q8_0)
MVX_ALL(q4_1, T_Q4_1, q8_0, T_Q8_0)

MV_ALL(q4_0, T_Q4_0)
MV_ALL(q4_1, T_Q4_1)
MV_ALL(q5_0, T_Q5_0)
MV_ALL(q8_0, T_Q8_0)
MV_ALL(q4_k, T_Q4_K)
MV_ALL(q6_k, T_Q6_K)

#define ATT(D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(1024) attention_head_##D(                       \
        const float* qkv, int ldq, float* out, float* kc, float* vc, int heads, int kv_heads,  \
        int cap, const float* inv_freq, int interleaved, const int* pos, const int* slot,      \
        const int* n, float scale, int write_kv) {                                              \
        pdl_wait();                                                                             \
        attention_head<D>(qkv, ldq, out, kc, vc, heads, kv_heads, cap, inv_freq, interleaved,  \
                          pos, slot, n, scale, write_kv);                                       \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_group_##D(               \
        const float* qkv, int ldq, float* out, float* kc, float* vc, int heads, int kv_heads,  \
        int cap, const float* inv_freq, int interleaved, const int* pos, const int* slot,      \
        const int* n, float scale, int write_kv) {                                              \
        pdl_wait();                                                                             \
        attention_group<D>(qkv, ldq, out, kc, vc, heads, kv_heads, cap, inv_freq, interleaved, \
                           pos, slot, n, scale, write_kv);                                      \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(SPLIT_THREADS) attention_split_##D(             \
        const float* qkv, int ldq, float* out, float* kc, float* vc, int heads, int kv_heads,  \
        int cap, const float* inv_freq, int interleaved, const int* pos, const int* slot,      \
        const int* n, float scale, int write_kv, float* part, u32* counter) {                   \
        attention_split<D, SPLIT_THREADS, ATT_PF>(qkv, ldq, out, kc, vc, heads, kv_heads, cap, inv_freq, interleaved, \
                           pos, slot, n, scale, write_kv, part, counter);                       \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(D > 64 ? D : 64) attention_split_small_##D(             \
        const float* qkv, int ldq, float* out, float* kc, float* vc, int heads, int kv_heads,  \
        int cap, const float* inv_freq, int interleaved, const int* pos, const int* slot,      \
        const int* n, float scale, int write_kv, float* part, u32* counter) {                   \
        attention_split<D, (D > 64 ? D : 64), ATT_PF / 2>(qkv, ldq, out, kc, vc, heads, kv_heads, cap, inv_freq, interleaved, \
                           pos, slot, n, scale, write_kv, part, counter);                       \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(GQA_THREADS) attention_gqa_##D(                 \
        const float* qkv, int ldq, float* out, float* kc, float* vc, int heads, int kv_heads,  \
        int cap, const float* inv_freq, int interleaved, const int* pos, const int* slot,      \
        const int* n, float scale, int write_kv, float* part, u32* counter) {                   \
        attention_gqa<D>(qkv, ldq, out, kc, vc, heads, kv_heads, cap, inv_freq, interleaved,   \
                         pos, slot, n, scale, write_kv, part, counter);                         \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(D) kv_write_##D(                               \
        const float* qkv, int ldq, float* kc, float* vc, int heads, int kv_heads, int cap,     \
        const float* inv_freq, int interleaved, const int* pos, const int* slot,               \
        const int* n) {                                                                         \
        pdl_wait();                                                                             \
        kv_write<D>(qkv, ldq, kc, vc, heads, kv_heads, cap, inv_freq, interleaved, pos, slot, n); \
    }

ATT(64)
ATT(128)
// the same parameters as the other decode-attention kernels (`ldq` unused: one row), a kernel
// per number of query heads that share a KV head (`attention_one_64_g<G>`)
#define ONE(G)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(ONE_T, 1) attention_one_64_g##G(                               \
        const float* qkv, int ldq, float* out, float* kc, float* vc, int heads, int kv_heads, int cap,         \
        const float* inv_freq, int interleaved, const int* pos, const int* slot, const int* n, float scale,    \
        int write_kv, float* part, u32* counter) {                                                              \
        attention_one<64, G>(qkv, out, kc, vc, heads, kv_heads, cap, inv_freq, interleaved, pos, slot, n, scale, \
                             write_kv, part, counter);                                                          \
    }
ONE(1)
ONE(2)
ONE(3)
ONE(4)
ONE(5)
ONE(6)
ONE(7)
ONE(8)

extern "C" __global__ void __launch_bounds__(256) norm_rows_f32(MvArgs a) {
    pdl_wait();
    norm_rows(a);
}

// Logits j0, j0 + T, ... (N of them, -inf past the vocabulary), all loads issued before the
// first is used.
template <int N>
__device__ __forceinline__ void load_round(float (&x)[N], const float* l, int j0, int T, int vocab) {
#pragma unroll
    for (int k = 0; k < N; ++k) x[k] = j0 + k * T < vocab ? l[j0 + k * T] : -INFINITY;
}

// Greedy pick of each row: the first index of the largest logit and its log-probability
// under the softmax (the sampler's greedy path, on the device: a step then downloads 8
// bytes a sequence instead of its logits). A block per row.
extern "C" __global__ void __launch_bounds__(1024) greedy_rows(const float* logits, int vocab,
                                                              const int* n, int* out) {
    pdl_wait();
    const int i = blockIdx.x;
    if (i >= *n) return;
    const float* l = logits + (size_t)i * vocab;
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, nw = blockDim.x / 32;
    __shared__ float bv[32], red[32];
    __shared__ int bi[32];
    // The row is read in rounds of GR loads a thread, all issued before the first is used
    // (a loop of one load at a time waits a round trip per 1024 logits); the first round's
    // values stay in registers for the sum of exponentials (a vocabulary up to GR * 1024 is
    // read once: H100, 32000 logits, 9.4 -> 8.5 us, `kernels-greedy32-log.txt`). A thread
    // sees its logits in index order in both passes, so the picks and sums are as with one
    // load at a time.
    constexpr int GR = 32, GR2 = 8;  // first round, later rounds (vocabularies over 32768)
    const int T = blockDim.x;
    float first[GR];
    float best = -INFINITY;
    int at = 0x7fffffff;
    load_round<GR>(first, l, t, T, vocab);
#pragma unroll
    for (int k = 0; k < GR; ++k)
        if (first[k] > best) best = first[k], at = t + k * T;
    for (int j0 = t + GR * T; j0 < vocab; j0 += GR2 * T) {
        float x[GR2];
        load_round<GR2>(x, l, j0, T, vocab);
#pragma unroll
        for (int k = 0; k < GR2; ++k)
            if (x[k] > best) best = x[k], at = j0 + k * T;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(0xffffffffu, best, o);
        const int a2 = __shfl_xor_sync(0xffffffffu, at, o);
        if (v2 > best || (v2 == best && a2 < at)) best = v2, at = a2;
    }
    if (lane == 0) bv[warp] = best, bi[warp] = at;
    __syncthreads();
    best = bv[0];
    at = bi[0];
    for (int w = 1; w < nw; ++w)
        if (bv[w] > best || (bv[w] == best && bi[w] < at)) best = bv[w], at = bi[w];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < GR; ++k)
        if (t + k * T < vocab) s += expf(first[k] - best);
    for (int j0 = t + GR * T; j0 < vocab; j0 += GR2 * T) {
        float x[GR2];
        load_round<GR2>(x, l, j0, T, vocab);
#pragma unroll
        for (int k = 0; k < GR2; ++k)
            if (j0 + k * T < vocab) s += expf(x[k] - best);
    }
    s = warp_sum(s);
    if (lane == 0) red[warp] = s;
    __syncthreads();
    if (t == 0) {
        float den = 0.f;
        for (int w = 0; w < nw; ++w) den += red[w];
        const int pick = at == 0x7fffffff ? 0 : at;
        out[2 * i] = pick;
        out[2 * i + 1] = __float_as_int(l[pick] - best - logf(den));
    }
}

// The rows of a step launched before the host has seen the picks of the one before
// (`GraphDecoder::step`: the host's ~50 us a token between steps then overlaps the GPU's
// step). Row i of the next step continues row `map.row[i]` of the step just run: its token
// is that row's greedy pick, at the next position, in the same slot. `params` is the step's
// tokens, positions and slots (`stride` each) and the row count. One thread: at most 32
// rows, read before any is written, so `map` may reorder them.
struct RowMap {
    unsigned char row[32];
};
extern "C" __global__ void advance_rows(int* params, int stride, const int* picks, RowMap map,
                                        int n) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int tok[32], pos[32], slot[32];
    for (int i = 0; i < n; ++i) {
        const int j = map.row[i];
        tok[i] = picks[2 * j];
        pos[i] = params[stride + j] + 1;
        slot[i] = params[2 * stride + j];
    }
    for (int i = 0; i < n; ++i) {
        params[i] = tok[i];
        params[stride + i] = pos[i];
        params[2 * stride + i] = slot[i];
    }
    params[3 * stride] = n;
}
