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
// blocks; each warp owns a few output rows and reads every weight byte once for all
// input rows, multiplying f32 inputs by the dequantized weights (the exact product).
// The RMS norms are fused: kernels that write the residual stream also leave each row's
// 1/rms (`rs`) for the next kernel, which scales its input on load.

#include <cuda_fp16.h>
#include <stdint.h>

typedef unsigned int u32;

#define WARPS 8            // warps per block in the matrix-vector kernels
#define MODE_PLAIN 0       // y = W x (+ bias)
#define MODE_RESID 1       // y += W x, then 1/rms of each y row into rs_out
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
    const float* norm_next;   // MODE_RESID: weight of the RMS norm that reads the output
    float* xn;                // MODE_RESID: the output rows normed by it [NB, rows]
    const float* bias;        // [rows] or null
    float* y;                 // output rows [NB, ldy]
    float* part;              // MODE_RESID: per-block partial sums of squares [NB, gridDim.x]
    u32* counter;             // MODE_RESID: blocks done (the last one finishes the norm)
    const int* n;             // rows in this step
    unsigned long long row_bytes;
    int rows;
    int k;
    int ldy;
    int mode;
    float eps;
    int pad;
};

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

// A warp covers 1024 columns of a row per step: each lane dequantizes 32 weights, 16 at
// columns c0.. and 16 at c0 + X.. (X: where the layout puts the high nibbles; 16 makes the
// 32 columns contiguous). Few wide loads per lane: the kernels are bound by load
// instructions, not bytes, when each lane reads a byte at a time. Returns false when the
// lane's columns lie past the end of the row.
template <int QT> struct Layout { static constexpr int X = 16; };
template <> struct Layout<T_Q4_K> { static constexpr int X = 32; };
template <> struct Layout<T_Q6_K> { static constexpr int X = 64; };

template <int QT>
__device__ __forceinline__ bool load32(const uint8_t* row, int k, int g, int lane, float* w,
                                       int& c0) {
    if (QT == T_Q4_K || QT == T_Q6_K) {
        const int sb = 4 * g + (lane >> 3), part = lane & 7;
        if (sb * 256 >= k) return false;
        if (QT == T_Q4_K) {
            const uint8_t* b = row + (size_t)sb * 144;
            const float2 dm = __half22float2(*(const __half2*)b);
            u32 sc[3];
            sc[0] = ((const u32*)(b + 4))[0];
            sc[1] = ((const u32*)(b + 4))[1];
            sc[2] = ((const u32*)(b + 4))[2];
            const int j = part >> 1, b0 = (part & 1) * 16;
            float s[2], m[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int jj = 2 * j + h;
                if (jj < 4) {
                    s[h] = byte_of(sc, jj) & 63;
                    m[h] = byte_of(sc, jj + 4) & 63;
                } else {
                    s[h] = (byte_of(sc, jj + 4) & 0xF) | ((byte_of(sc, jj - 4) >> 6) << 4);
                    m[h] = (byte_of(sc, jj + 4) >> 4) | ((byte_of(sc, jj) >> 6) << 4);
                }
            }
            const float d0 = dm.x * s[0], n0 = dm.y * m[0], d1 = dm.x * s[1], n1 = dm.y * m[1];
            const uint4 q = *(const uint4*)(b + 16 + 32 * j + b0);
            const u32 qq[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int e = 0; e < 16; ++e) {
                const u32 by = (qq[e >> 2] >> (8 * (e & 3))) & 0xFF;
                w[e] = d0 * u2f(by & 0xF) - n0;
                w[16 + e] = d1 * u2f(by >> 4) - n1;
            }
            c0 = sb * 256 + 64 * j + b0;
        } else {
            const uint8_t* b = row + (size_t)sb * 210;
            const float d = ldh(b + 208);
            const int nh = part >> 2, q = part & 3, lb = 16 * (q & 1), sel = q >> 1;
            const uint8_t* ql = b + 64 * nh + 32 * sel + lb;
            const uint8_t* qh = b + 128 + 32 * nh + lb;
            const int8_t* sc = (const int8_t*)(b + 192 + 8 * nh);
            const float slo = d * (float)sc[(q & 1) + 2 * sel];
            const float shi = d * (float)sc[(q & 1) + 4 + 2 * sel];
#pragma unroll
            for (int e4 = 0; e4 < 4; ++e4) {
                const u32 l4 = ld16x2(ql + 4 * e4), h4 = ld16x2(qh + 4 * e4);
#pragma unroll
                for (int f = 0; f < 4; ++f) {
                    const u32 l = (l4 >> (8 * f)) & 0xFF, h = (h4 >> (8 * f)) & 0xFF;
                    const u32 lo = (l & 0xF) | (((h >> (2 * sel)) & 3) << 4);
                    const u32 hi = (l >> 4) | (((h >> (4 + 2 * sel)) & 3) << 4);
                    w[4 * e4 + f] = slo * (u2f(lo) - 32.f);
                    w[16 + 4 * e4 + f] = shi * (u2f(hi) - 32.f);
                }
            }
            c0 = sb * 256 + 128 * nh + 32 * sel + lb;
        }
        return true;
    } else {
        // 32-wide blocks: one block per lane
        const int blk = 32 * g + lane;
        if (blk * 32 >= k) return false;
        c0 = blk * 32;
        if (QT == T_Q8_0) {
            const uint8_t* b = row + (size_t)blk * 34;
            const float d = ldh(b);
#pragma unroll
            for (int e4 = 0; e4 < 8; ++e4) {
                const u32 v = ld16x2(b + 2 + 4 * e4);
#pragma unroll
                for (int f = 0; f < 4; ++f)  // int8 b = (b ^ 0x80) - 128
                    w[4 * e4 + f] = (u2f(((v >> (8 * f)) & 0xFF) ^ 0x80) - 128.f) * d;
            }
        } else if (QT == T_Q4_0 || QT == T_Q5_0) {
            const int hdr = QT == T_Q4_0 ? 2 : 6;
            const uint8_t* b = row + (size_t)blk * (QT == T_Q4_0 ? 18 : 22);
            const float d = ldh(b);
            const u32 qh = QT == T_Q5_0 ? ld16x2(b + 2) : 0;
#pragma unroll
            for (int e4 = 0; e4 < 4; ++e4) {
                const u32 v = ld16x2(b + hdr + 4 * e4);
#pragma unroll
                for (int f = 0; f < 4; ++f) {
                    const int j = 4 * e4 + f;
                    const u32 by = (v >> (8 * f)) & 0xFF;
                    if (QT == T_Q4_0) {
                        w[j] = (u2f(by & 0xF) - 8.f) * d;
                        w[16 + j] = (u2f(by >> 4) - 8.f) * d;
                    } else {
                        const u32 x0 = (by & 0xF) | (((qh >> j) << 4) & 0x10);
                        const u32 x1 = (by >> 4) | ((qh >> (j + 12)) & 0x10);
                        w[j] = (u2f(x0) - 16.f) * d;
                        w[16 + j] = (u2f(x1) - 16.f) * d;
                    }
                }
            }
        } else {  // T_Q4_1
            const uint8_t* b = row + (size_t)blk * 20;
            const float2 dm = __half22float2(*(const __half2*)b);
#pragma unroll
            for (int e4 = 0; e4 < 4; ++e4) {
                const u32 v = ((const u32*)(b + 4))[e4];
#pragma unroll
                for (int f = 0; f < 4; ++f) {
                    const u32 by = (v >> (8 * f)) & 0xFF;
                    w[4 * e4 + f] = u2f(by & 0xF) * dm.x + dm.y;
                    w[16 + 4 * e4 + f] = u2f(by >> 4) * dm.x + dm.y;
                }
            }
        }
        return true;
    }
}

// The lane's 32 inputs of row `i`.
template <int X>
__device__ __forceinline__ void load_x(const MvArgs& a, int i, int c0, float* xv) {
    const float* xr = a.x + (size_t)i * a.k;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
            const float4 p = *(const float4*)(xr + c0 + h * X + 4 * v);
            xv[16 * h + 4 * v] = p.x;
            xv[16 * h + 4 * v + 1] = p.y;
            xv[16 * h + 4 * v + 2] = p.z;
            xv[16 * h + 4 * v + 3] = p.w;
        }
    }
}

// One warp per output row (GLU: the gate row and its up row), reading every weight once
// for all NB input rows. A row is only a few 16-byte loads per lane, unrolled so they are
// all in flight at once: these kernels are bound by memory latency, not instructions.
template <int QT, int NB>
__device__ void matvec(const MvArgs& a) {
    constexpr int X = Layout<QT>::X;
    const int n = *a.n;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const bool glu = a.mode == MODE_GLU;
    const int r = blockIdx.x * WARPS + warp;
    float acc[NB], acc2[NB];
#pragma unroll
    for (int i = 0; i < NB; ++i) acc[i] = acc2[i] = 0.f;
    if (r < a.rows) {
        const uint8_t* row = a.w + (size_t)r * a.row_bytes;
        const uint8_t* row2 = a.w + (size_t)(glu ? r + a.rows : r) * a.row_bytes;
        const int ng = (a.k + 1023) / 1024;
#pragma unroll 4
        for (int g = 0; g < ng; ++g) {
            float w[32], w2[32];
            int c0;
            if (!load32<QT>(row, a.k, g, lane, w, c0)) continue;
            if (glu) load32<QT>(row2, a.k, g, lane, w2, c0);
#pragma unroll
            for (int i = 0; i < NB; ++i) {
                if (i < n) {
                    float xv[32];
                    load_x<X>(a, i, c0, xv);
                    float s = 0.f, s2 = 0.f;
#pragma unroll
                    for (int e = 0; e < 32; ++e) s += w[e] * xv[e];
                    acc[i] += s;
                    if (glu) {
#pragma unroll
                        for (int e = 0; e < 32; ++e) s2 += w2[e] * xv[e];
                        acc2[i] += s2;
                    }
                }
            }
        }
    }
    __shared__ float sq[WARPS][NB];
#pragma unroll
    for (int i = 0; i < NB; ++i) {
        if (i < n) {
            const float v = warp_sum(acc[i]);
            const float v2 = glu ? warp_sum(acc2[i]) : 0.f;
            float out = 0.f;
            if (lane == 0 && r < a.rows) {
                float* yp = a.y + (size_t)i * a.ldy + r;
                if (a.mode == MODE_RESID) {
                    out = *yp + v;
                } else if (glu) {
                    out = v / (1.f + expf(-v)) * v2;
                } else {
                    out = a.bias ? v + a.bias[r] : v;
                }
                *yp = out;
            }
            if (a.mode == MODE_RESID && lane == 0) sq[warp][i] = out * out;
        }
    }
    if (a.mode != MODE_RESID) return;
    // The residual stream's next reader wants it RMS-normed: per-block partial sums of
    // squares, then the last block to finish sums them in a fixed order (deterministic,
    // unlike float atomics) and writes the normed copy `xn`.
    __threadfence();
    __syncthreads();
    const int t = threadIdx.x;
    if (t < n) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) s += sq[w][t];
        a.part[(size_t)t * gridDim.x + blockIdx.x] = s;
        __threadfence();
    }
    __shared__ bool last;
    __shared__ float rs[NB];
    __syncthreads();
    if (t == 0) last = atomicAdd(a.counter, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    for (int i = warp; i < n; i += WARPS) {
        float s = 0.f;
        for (int b = lane; b < (int)gridDim.x; b += 32)
            s += __ldcg(a.part + (size_t)i * gridDim.x + b);
        s = warp_sum(s);
        if (lane == 0) rs[i] = 1.f / sqrtf(s / (float)a.rows + a.eps);
    }
    __syncthreads();
    for (int i = 0; i < n; ++i)
        for (int c = t; c < a.rows; c += blockDim.x)
            a.xn[(size_t)i * a.rows + c] = __ldcg(a.y + (size_t)i * a.ldy + c) * rs[i] * a.norm_next[c];
    if (t == 0) *a.counter = 0;
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

// Decode attention for one (query head, sequence): RoPE on the new query and key, the new
// key/value written to the sequence's KV slot (by the group's first head), then softmax
// over positions 0..=pos in two passes over a score row in shared memory (dynamic,
// `cap` floats): scores with one position per thread (many independent loads in flight),
// then values with threads over (position group, dimension). The new position is read
// from shared memory, so heads of the same group never wait on each other's writes.
template <int D>
__device__ void attention(const float* qkv, int ldq, float* out, float* kc, float* vc,
                          int heads, int kv_heads, int cap, const float* inv_freq,
                          int interleaved, const int* pos_a, const int* slot_a, const int* n,
                          float scale) {
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
        qs[a] = q[a] * c - q[b] * s;
        qs[b] = q[a] * s + q[b] * c;
        kn[a] = k[a] * c - k[b] * s;
        kn[b] = k[a] * s + k[b] * c;
    }
    if (t < D) vn[t] = v[t];
    __syncthreads();
    const size_t base = ((size_t)slot * kv_heads + kvh) * (size_t)cap * D;
    float* kb = kc + base;
    float* vb = vc + base;
    if (h % group == 0 && t < D) {
        kb[(size_t)pos * D + t] = kn[t];
        vb[(size_t)pos * D + t] = vn[t];
    }
    // pass 1: scores and their maximum
    float mx = -INFINITY;
    for (int j = t; j <= pos; j += blockDim.x) {
        const float* kr = j == pos ? kn : kb + (size_t)j * D;
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < D; e += 4) {
            const float4 kv = *(const float4*)(kr + e);
            d += qs[e] * kv.x + qs[e + 1] * kv.y + qs[e + 2] * kv.z + qs[e + 3] * kv.w;
        }
        d *= scale;
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

#define MV(NAME, QT, NB) \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) NAME(MvArgs a) { matvec<QT, NB>(a); }
#define MV_ALL(TAG, QT)           \
    MV(mv_##TAG##_1, QT, 1)       \
    MV(mv_##TAG##_2, QT, 2)       \
    MV(mv_##TAG##_4, QT, 4)       \
    MV(mv_##TAG##_8, QT, 8)       \
    extern "C" __global__ void embed_##TAG(const uint8_t* table, unsigned long long row_bytes, \
                                           int hidden, const int* tok, const int* n, float* x, \
                                           float* xn, const float* nw, float eps) {            \
        embed<QT>(table, row_bytes, hidden, tok, n, x, xn, nw, eps);                           \
    }

MV_ALL(q4_0, T_Q4_0)
MV_ALL(q4_1, T_Q4_1)
MV_ALL(q5_0, T_Q5_0)
MV_ALL(q8_0, T_Q8_0)
MV_ALL(q4_k, T_Q4_K)
MV_ALL(q6_k, T_Q6_K)

#define ATT(D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(1024) attention_##D(                            \
        const float* qkv, int ldq, float* out, float* kc, float* vc, int heads, int kv_heads,  \
        int cap, const float* inv_freq, int interleaved, const int* pos, const int* slot,      \
        const int* n, float scale) {                                                            \
        attention<D>(qkv, ldq, out, kc, vc, heads, kv_heads, cap, inv_freq, interleaved, pos,  \
                     slot, n, scale);                                                           \
    }

ATT(64)
ATT(128)
