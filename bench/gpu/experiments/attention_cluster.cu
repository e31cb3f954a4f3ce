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
    const int t = threadIdx.x;
    constexpr int DP = D + 4;
    __shared__ __align__(16) float qs[D];
    __shared__ __align__(16) float kn[D];
    __shared__ __align__(16) float vn[D];
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
    const bool has_new = live && j1 == len && j0 < j1;
    if (live) new_row<D>(qkv + (size_t)i * ldq, h, heads, kv_heads, kvh, has_new, interleaved, sn, cs, qs, kn, vn);
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    if (write_kv && has_new && h % group == 0 && t < D) {
        kb[(size_t)pos * D + t] = kn[t];
        vb[(size_t)pos * D + t] = vn[t];
    }
    float mx, den;
    const float ov = attend_chunk<D, T>(qs, kn, vn, ks, vs, kb, vb, j0, j1, np, pos, write_kv, scale, s, mx, den);
    if (t < D) mine[2 + t] = ov;
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
