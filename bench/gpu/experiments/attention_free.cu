// Experiment (thirteenth session): batch 1's attention on SMs that the QKV product leaves
// free. Timing and logits only (`kernels.py ... af=experiments/attention_free.cu:"mm pdl
// persist attfree free20"`); not used by the engine.
//
// Why: with `kernels.py`'s `freeN` (the QKV product's grid N blocks short of one an SM), the
// existing grouped attention at 8 chunks went from 0.901 to 0.732 ms a step
// (`kernels-free-log.txt`): blocks that sit on SMs of their own start, copy their keys and
// values and reach the wait while the QKV product runs, instead of after its blocks leave.
// That kernel's chunks are slow, though (a lane per position, a warp per head: 13.5 us alone).
// This one is built for the free SMs: a 512-thread block per (KV head, chunk of at most
// FREE_CH positions), all 8 query heads that share the KV head, each cached key and value
// read once into shared memory before the wait. After it: the 8 queries' RoPE, the scores
// (a thread per position and quarter of the dimensions, the key quarter kept in registers
// for the 8 heads), the softmax (a warp per head), the values (a thread per 4 dimensions and
// group of positions, the 8 heads at once), then the chunks combined in chunk order by the
// last of the KV head's blocks (as `attention_gqa`, deterministic), or with -DFREE_IN_O=1 by
// the output projection as it reads its input (`mv_q4_k_a1`: `AttX` below), so that no block
// waits for the others (a fence, a counter and a last block's pass: 2.45 us a layer in the
// step by `-DFREE_PROBE=2`).

#include "../../../crates/llorch-engine/src/model/decode.cu"

#ifndef FREE_CH
#define FREE_CH 128  // positions a block at most
#endif
#ifndef FREE_PROBE
#define FREE_PROBE 0
#endif
#ifndef FREE_IN_O
#define FREE_IN_O 0
#endif
#define FREE_T 512
#define FREE_G 8     // query heads per KV head (TinyLlama)
#define FREE_DP 80   // floats a key/value row in shared memory: two rows a 32-bank phase
#define FREE_PS 68   // floats a chunk's result: max, sum, 2 unused, the D outputs (16-byte aligned)

template <int D>
__device__ void attention_free(const float* qkv, float* out, float* kc, float* vc, int heads, int kv_heads, int cap,
                               const float* inv_freq, int interleaved, const int* pos_a, const int* slot_a,
                               float scale, float* part, u32* counter) {
    static_assert(D == 64, "the thread layouts below assume 64 dimensions");
    constexpr int G = FREE_G, CH = FREE_CH, T = FREE_T, DP = FREE_DP, NW = T / 32;
    const int kvh = blockIdx.x, sp = blockIdx.y;  // x first: every KV head's active chunks start first
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int pos = pos_a[0], slot = slot_a[0], len = pos + 1;
    const int S = (len + CH - 1) / CH, chunk = (len + S - 1) / S;
    const int j0 = sp * chunk, j1 = min(len, j0 + chunk), cnt = j1 - j0;
    if (sp >= S || heads != G * kv_heads) {
        pdl_wait();
        return;
    }
    extern __shared__ __align__(16) float sm[];
    float* ks = sm;                // [CH][DP]; after the scores: the values' partial sums
    float* vs = ks + CH * DP;      // [CH][DP]
    float* ps = vs + CH * DP;      // [G][CH]: scores, then probabilities (then, for CH < 103, the
                                   // values' partial sums)
    __shared__ __align__(16) float qs[G][D];
    __shared__ float mh[G], lh[G];
    const size_t base = ((size_t)slot * kv_heads + kvh) * (size_t)cap * D;
    float* kb = kc + base;
    float* vb = vc + base;
    const int np = min(j1, pos) - j0;  // cached positions of the chunk (the new one comes from the QKV row)
    for (int c = t; c < np * (D / 4); c += T) {
        const int j = c / (D / 4), e = 4 * (c % (D / 4));
        cp_async16(ks + j * DP + e, kb + (size_t)(j0 + j) * D + e);
        cp_async16(vs + j * DP + e, vb + (size_t)(j0 + j) * D + e);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    const int pr = t % (D / 2);
    float sn = 0.f, cs = 1.f;
    if (t < (G + 1) * (D / 2)) sincosf((float)pos * inv_freq[pr], &sn, &cs);
    pdl_wait();
#if FREE_PROBE == 1  // timing probe (wrong values): nothing after the wait
    return;
#endif
    const bool has_new = j1 == len;
    const int a = interleaved ? 2 * pr : pr, b = interleaved ? 2 * pr + 1 : pr + D / 2;
    // the new key and value go to the cache and to their row of shared memory (row np)
    if (t < G * (D / 2)) {
        rope_pair(qkv + (kvh * G + t / (D / 2)) * D, a, b, sn, cs, qs[t / (D / 2)]);
    } else if (t < (G + 1) * (D / 2)) {
        if (has_new) {
            rope_pair(qkv + (heads + kvh) * D, a, b, sn, cs, ks + np * DP);
        }
    } else if (t < (G + 1) * (D / 2) + D) {
        const int d = t - (G + 1) * (D / 2);
        if (has_new) vs[np * DP + d] = qkv[(heads + kv_heads + kvh) * D + d];
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    if (has_new && t < D) {
        kb[(size_t)pos * D + t] = ks[np * DP + t];
        vb[(size_t)pos * D + t] = vs[np * DP + t];
    }
    // scores: thread (position t / 4, quarter t % 4: float4s q, q + 4, q + 8, q + 12)
    for (int p0 = 0; p0 < cnt; p0 += T / 4) {
        const int p = p0 + (t >> 2), q = t & 3;
        const bool ok = p < cnt;
        float4 k4[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
            k4[i] = ok ? *(const float4*)(ks + p * DP + 4 * (4 * i + q)) : make_float4(0.f, 0.f, 0.f, 0.f);
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
            for (int h = 0; h < G; ++h) ps[h * CH + p] = d[h] * scale;
        }
    }
    __syncthreads();
    // softmax: a warp per head
    if (warp < G) {
        float* sc = ps + warp * CH;
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
    // values: thread (4 dimensions dq = t % 16, positions pg = t / 16 + 32 k), the 8 heads at once
    const int dq = t & 15, pg = t >> 4;
    float acc[G][4];
#pragma unroll
    for (int h = 0; h < G; ++h) acc[h][0] = acc[h][1] = acc[h][2] = acc[h][3] = 0.f;
    for (int p = pg; p < cnt; p += T / 16) {
        const float4 v = *(const float4*)(vs + p * DP + 4 * dq);
#pragma unroll
        for (int h = 0; h < G; ++h) {
            const float w = ps[h * CH + p];
            acc[h][0] += w * v.x, acc[h][1] += w * v.y, acc[h][2] += w * v.z, acc[h][3] += w * v.w;
        }
    }
    // lanes 0-15 and 16-31 hold neighbouring position groups; then the warps' sums via shared memory
#pragma unroll
    for (int h = 0; h < G; ++h)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[h][e] += __shfl_xor_sync(0xffffffffu, acc[h][e], 16);
    // [NW][G][D]: where the keys were (no longer read), or after the scores when that is too small
    float* red = NW * G * D <= CH * DP ? ks : ps + G * CH;
    if (lane < 16) {
#pragma unroll
        for (int h = 0; h < G; ++h)
            *(float4*)(red + (warp * G + h) * D + 4 * dq) = make_float4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
    }
    __syncthreads();
    const int h = t / D, d = t % D;  // T == G * D: a thread per output
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) o += red[(w * G + h) * D + d];
    const int hq = kvh * G + h;
    if (S == 1 && !FREE_IN_O) {
        out[hq * D + d] = o / lh[h];
        return;
    }
    float* mine = part + ((size_t)hq * ATT_SPLITS + sp) * FREE_PS;
    mine[4 + d] = o;
    if (d == 0) mine[0] = mh[h], mine[1] = lh[h];
#if FREE_PROBE == 2 || FREE_IN_O  // (probe 2: timing only, the chunks' results are not combined)
    return;
#endif
    if (!last_to_arrive(counter + kvh, (u32)S)) return;
    // the last block: every chunk's (max, sum, output) of the thread's head, loads first
    const float* all = part + (size_t)hq * ATT_SPLITS * FREE_PS;
    float cm[ATT_SPLITS], cl[ATT_SPLITS], co[ATT_SPLITS];
#pragma unroll
    for (int c = 0; c < ATT_SPLITS; ++c) {
        if (c < S) {
            cm[c] = __ldcg(all + c * FREE_PS), cl[c] = __ldcg(all + c * FREE_PS + 1);
            co[c] = __ldcg(all + c * FREE_PS + 4 + d);
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
    if (t == 0) counter[kvh] = 0;
}

// The same arguments as `attention_split_64` (ldq, n and write_kv unused: one sequence, decode steps)
extern "C" __global__ void __launch_bounds__(FREE_T, 1)
    attention_free_64(const float* qkv, int ldq, float* out, float* kc, float* vc, int heads, int kv_heads, int cap,
                      const float* inv_freq, int interleaved, const int* pos, const int* slot, const int* n,
                      float scale, int write_kv, float* part, u32* counter) {
    attention_free<64>(qkv, out, kc, vc, heads, kv_heads, cap, inv_freq, interleaved, pos, slot, scale, part, counter);
}

// The output projection's input read from the chunks' results (-DFREE_IN_O=1): columns c..c+15
// of head c / 64 as the chunks' outputs weighted by exp(max - overall max) / overall sum, in
// chunk order. `a.part`: the results [sequence][head][ATT_SPLITS][FREE_PS]; `a.norm_next`:
// the sequences' positions (int), borrowed fields the matrix-vector kernels do not use.
struct AttX {
    __device__ __forceinline__ void operator()(const MvArgs& a, int i, int c, float (&v)[16]) const {
        constexpr int D = 64;
        const int len = ((const int*)a.norm_next)[i] + 1;
        const int S = (len + FREE_CH - 1) / FREE_CH, heads = a.k / D;
        const float* r = a.part + ((size_t)i * heads + c / D) * ATT_SPLITS * FREE_PS + 4 + c % D;
        float w[ATT_SPLITS], l[ATT_SPLITS], m = -INFINITY;
#pragma unroll
        for (int s = 0; s < ATT_SPLITS; ++s) {
            if (s < S) {
                const float2 ml = __ldcg((const float2*)(r - 4 - c % D + s * FREE_PS));
                w[s] = ml.x, l[s] = ml.y;
                m = fmaxf(m, ml.x);
            }
        }
        float sum = 0.f;
#pragma unroll
        for (int s = 0; s < ATT_SPLITS; ++s) {
            if (s < S) {
                w[s] = expf(w[s] - m);
                sum += l[s] * w[s];
            }
        }
        const float inv = 1.f / sum;
#pragma unroll
        for (int e = 0; e < 16; ++e) v[e] = 0.f;
#pragma unroll
        for (int s = 0; s < ATT_SPLITS; ++s) {
            if (s < S) {
                const float f = w[s] * inv;
#pragma unroll
                for (int e4 = 0; e4 < 4; ++e4) {
                    const float4 o = __ldcg((const float4*)(r + s * FREE_PS + 4 * e4));
                    v[4 * e4] += f * o.x, v[4 * e4 + 1] += f * o.y, v[4 * e4 + 2] += f * o.z, v[4 * e4 + 3] += f * o.w;
                }
            }
        }
    }
};

extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB) mv_q4_k_a1(MvArgs a) {
    matvec<T_Q4_K, 1, MODE_RESID, AttX>(a, AttX());
}
