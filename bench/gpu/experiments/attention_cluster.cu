// Experiment (twelfth session): batch 1-2 attention as a thread-block cluster of ATT_CL
// blocks per (sequence, query head), each block one long chunk of positions with all of its
// cached keys and values copied to shared memory before the wait, the chunks combined over
// distributed shared memory. Timing and logits only (`kernels.py ...
// ac=experiments/attention_cluster.cu:"mm pdl persist attcl -DATT_CL=4"`); not used by the engine.
//
// Why: `attention_split` takes ~7.2 us a layer at batch 1 (position 600) for 1.2 MB of cache,
// against ~1.4 us for a kernel-per-phase hand-off that reads its input (`chain-floor-log.txt`).
// Its 16 chunks a head are blocks of 128 threads, and the chunks meet through a fence, a
// global counter and the last block's pass over their results (~2.3 us, `attention-probes`).
// Here a head's chunks are the 2-4 blocks of one cluster: a cluster barrier replaces the
// fence and counter, and the first block reads the others' results from their shared memory.
// Small clusters place easily (the fifth session's clusters of 8 and 16 blocks started late).
//
// Measured (H100, bench/README.md, twelfth session): batch 1 no faster at positions 512-640,
// batch 2 with 2 blocks 2-9% faster up to 900 positions, but every form slower at 2,000 and
// 3,500 (a block's long chunk is one serial chain). Not kept.

#include "../../../crates/llorch-engine/src/model/decode.cu"

#ifndef ATT_CL
#define ATT_CL 4
#endif
#ifndef CL_THREADS
#define CL_THREADS 128
#endif
#ifndef CL_VU
#define CL_VU 8  // value rows a thread loads before using them
#endif
#ifndef CL_PF
#define CL_PF 320  // cached positions a block copies ahead (keys and values, rows of D + 4)
#endif

__device__ __forceinline__ void cluster_sync_all() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// A float of block `rank`'s shared memory at the address of `p` in this block's.
__device__ __forceinline__ float ld_dsmem(const float* p, u32 rank) {
    u32 a = (u32)__cvta_generic_to_shared(p), r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(r) : "memory");
    return v;
}

template <int D, int T>
__device__ void attention_cl(const float* qkv, int ldq, float* out, float* kc, float* vc, int heads,
                             int kv_heads, int cap, const float* inv_freq, int interleaved, const int* pos_a,
                             const int* slot_a, const int* n, float scale, int write_kv) {
    const int r = blockIdx.x, h = blockIdx.y, i = blockIdx.z, group = heads / kv_heads, kvh = h / group;
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    constexpr int NW = T / 32, DP = D + 4, DQ = D / 4, PG = T / DQ;
    __shared__ __align__(16) float qs[D];
    __shared__ __align__(16) float kn[D];
    __shared__ __align__(16) float vn[D];
    __shared__ float red[NW];
    __shared__ __align__(16) float po[PG][D];
    __shared__ float mine[D + 2];  // this chunk's (max, sum, output), read by rank 0
    extern __shared__ __align__(16) float sc[];  // K, V [CL_PF][DP], then scores
    const bool live = i < *n;  // the row count comes from the host: before the wait
    int pos = 0, slot = 0;
    if (live) pos = pos_a[i], slot = slot_a[i];
    const int len = pos + 1, chunk = (len + ATT_CL - 1) / ATT_CL;
    const int j0 = min(len, r * chunk), j1 = min(len, j0 + chunk);
    float* ks = sc;
    float* vs = ks + CL_PF * DP;
    float* s = vs + CL_PF * DP;
    const size_t base = ((size_t)slot * kv_heads + kvh) * (size_t)cap * D;
    float* kb = kc + base;
    float* vb = vc + base;
    const int np = live && write_kv ? max(0, min(min(j1, pos) - j0, CL_PF)) : 0;
    copy_ahead<D, T>(ks, vs, kb, vb, j0, np);
    float sn = 0.f, cs = 1.f;
    if (t < D / 2) sincosf((float)pos * inv_freq[t], &sn, &cs);
    pdl_wait();
    const float* row = qkv + (size_t)i * ldq;
    const bool has_new = live && j1 == len && j0 < j1;
    if (live && t < D / 2) {
        const int a = interleaved ? 2 * t : t;
        const int b = interleaved ? 2 * t + 1 : t + D / 2;
        rope_pair(row + h * D, a, b, sn, cs, qs);
        if (has_new) rope_pair(row + (heads + kvh) * D, a, b, sn, cs, kn);
    }
    if (has_new && t < D) vn[t] = row[(heads + kv_heads + kvh) * D + t];
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    if (write_kv && has_new && h % group == 0 && t < D) {
        kb[(size_t)pos * D + t] = kn[t];
        vb[(size_t)pos * D + t] = vn[t];
    }
    float mx = -INFINITY;
    for (int j = j0 + t; j < j1; j += T) {
        const float* kr = j == pos && write_kv ? kn : j - j0 < np ? ks + (j - j0) * DP : kb + (size_t)j * D;
        const float d = key_dot<D>(qs, kr) * scale;
        s[j - j0] = d;
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
        const float p = expf(s[j] - mx);
        s[j] = p;
        sum += p;
    }
    sum = warp_sum(sum);
    if (lane == 0) red[warp] = sum;
    __syncthreads();
    float den = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) den += red[w];
    const int gi = t / DQ, dq = t % DQ;
    float o[4] = {0.f, 0.f, 0.f, 0.f};
    for (int jb = j0 + gi; jb < j1; jb += CL_VU * PG) {
        float4 v[CL_VU];
#pragma unroll
        for (int u = 0; u < CL_VU; ++u) {
            const int j = jb + u * PG;
            const float* vr = j == pos && write_kv ? vn : j - j0 < np ? vs + (j - j0) * DP : vb + (size_t)j * D;
            v[u] = j < j1 ? *(const float4*)(vr + 4 * dq) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < CL_VU; ++u) {
            const int j = jb + u * PG;
            const float p = j < j1 ? s[j - j0] : 0.f;
            o[0] += p * v[u].x;
            o[1] += p * v[u].y;
            o[2] += p * v[u].z;
            o[3] += p * v[u].w;
        }
    }
    *(float4*)&po[gi][4 * dq] = make_float4(o[0], o[1], o[2], o[3]);
    __syncthreads();
    if (t < D) {
        float v = 0.f;
#pragma unroll
        for (int g = 0; g < PG; ++g) v += po[g][t];
        mine[2 + t] = v;
    }
    if (t == 0) mine[0] = j0 < j1 ? mx : -INFINITY, mine[1] = j0 < j1 ? den : 0.f;
    cluster_sync_all();  // every chunk's result is in its block's `mine`
    if (r == 0 && live && t < D) {
        float m[ATT_CL], l = 0.f, v = 0.f, mm = -INFINITY;
#pragma unroll
        for (int c = 0; c < ATT_CL; ++c) m[c] = ld_dsmem(mine, c), mm = fmaxf(mm, m[c]);
#pragma unroll
        for (int c = 0; c < ATT_CL; ++c) {
            const float f = m[c] == -INFINITY ? 0.f : expf(m[c] - mm);
            l += ld_dsmem(mine + 1, c) * f;
            v += ld_dsmem(mine + 2 + t, c) * f;
        }
        out[(size_t)i * heads * D + h * D + t] = v / l;
    }
    cluster_sync_all();  // the others' shared memory stays until rank 0 has read it
}

extern "C" __global__ void __launch_bounds__(CL_THREADS) attention_cl_64(
    const float* qkv, int ldq, float* out, float* kc, float* vc, int heads, int kv_heads, int cap,
    const float* inv_freq, int interleaved, const int* pos_a, const int* slot_a, const int* n, float scale,
    int write_kv) {
    attention_cl<64, CL_THREADS>(qkv, ldq, out, kc, vc, heads, kv_heads, cap, inv_freq, interleaved, pos_a,
                                 slot_a, n, scale, write_kv);
}
