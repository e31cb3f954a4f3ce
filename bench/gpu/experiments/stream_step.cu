// Experiment (eleventh session): batch 1's 22 layers as one persistent kernel whose weights
// stream into shared memory independently of the phases' hand-offs. Timing and logits
// only (`kernels.py ... st=experiments/stream_step.cu:"mm pdl persist gqa stream"`); not
// used by the engine.
//
// Why: the tenth session's probes showed a layer of the separate kernels takes ~27 us
// against 8.3 us of weight bytes, because each of its five dependent phases reads its
// weights only after the phase before has ended. Here each block owns a fixed, contiguous
// range of rows of every matrix (one bulk copy per matrix and layer, `cp.async.bulk` with
// an mbarrier: no registers held), and a layer's share of every matrix fits in one SM's
// shared memory (Q4_K: ~196 KB). The copy of layer l+1's rows of a matrix is issued as soon
// as the block has multiplied layer l's rows of it, so DRAM streams the weights for a whole
// layer ahead while the chain of phases (grid barrier, inputs, multiply from shared memory)
// runs. The earlier persistent kernel (`persistent-step.patch`) held the next phase's
// weights in registers across each barrier and spilled; this one holds none.
//
// Layout of the dynamic shared memory (offsets from the host, `SArgs`): the four matrices'
// regions, the rounded inputs (`xq`), attention's scores. Q4_K only (Q6_K's regions do not
// fit), one sequence. The LM head and the greedy picks stay the separate kernels, launched
// after this one with programmatic dependent launch.

#include "../../../crates/llorch-engine/src/model/decode.cu"

#ifdef STREAM_TRACE
// `kernels.py --trace`: a record per (layer, block, phase): the wait's return and the
// phase's end (%globaltimer, ns)
#define TRACE_CAP 65536
__device__ unsigned int trace_n;
__device__ unsigned long long trace_buf[TRACE_CAP * 8];
__device__ __forceinline__ unsigned long long gtime() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    return t;
}
__shared__ unsigned long long st_mid[2];  // thread 0's stamps within a phase
#define TMID(k) (threadIdx.x == 0 ? (void)(st_mid[k] = gtime()) : (void)0)
__device__ __forceinline__ void trace_rec(int l, int ph, unsigned long long t0) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned int k = atomicAdd(&trace_n, 1u);
        if (k < TRACE_CAP) {
            unsigned long long* r = trace_buf + 8ull * k;
            r[0] = l, r[1] = blockIdx.x, r[2] = ph, r[3] = t0, r[4] = gtime();
            r[5] = st_mid[0], r[6] = st_mid[1];
        }
    }
}
#define T0() const unsigned long long t0_ = gtime()
#define TREC(l, ph) trace_rec(l, ph, t0_)
#else
#define T0()
#define TREC(l, ph)
#define TMID(k)
#endif

struct SLayer {  // matches `SLayer` in kernels.py
    const uint8_t* qkv;
    const uint8_t* o;
    const uint8_t* gate_up;
    const uint8_t* down;
    const float* attn_norm;
    const float* ffn_norm;
    float* k;
    float* v;
};

struct SArgs {  // matches `SArgs` in kernels.py
    const SLayer* layers;
    float* x;
    float* qkv;
    float* att;
    float* act;
    float* att_part;
    u32* att_counter;
    u32* bar;
    const int* pos;
    const int* slot;
    const int* n;
    const float* inv_freq;
    unsigned long long rb_qkv, rb_o, rb_gu, rb_down;
    int n_layers, hidden, heads, kv_heads, cap, inter, interleaved;
    float eps, scale;
    int off_o, off_gu, off_down, off_xq, off_att;
};

// ---- mbarriers and bulk copies (sm_90) ----
__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(unsigned long long* b) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(b)) : "memory");
}

__device__ __forceinline__ void mbar_expect(unsigned long long* b, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, u32 bytes, unsigned long long* b) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_u32(dst)),
                 "l"(src), "r"(bytes), "r"(smem_u32(b))
                 : "memory");
}

__device__ __forceinline__ void mbar_wait(unsigned long long* b, u32 parity) {
    asm volatile(
        "{\n\t.reg .pred p;\n"
        "W:\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n\t"
        "@!p bra W;\n}" ::"r"(smem_u32(b)),
        "r"(parity)
        : "memory");
}

// Grid barrier in halves (as persistent-step.patch): arrive once the block's writes are
// done, wait until every block has arrived; work that does not depend on the other blocks
// goes between.
__device__ __forceinline__ void grid_arrive(u32* bar) {
    __syncthreads();
    if (threadIdx.x == 0) asm volatile("fence.acq_rel.gpu;\n\tred.relaxed.gpu.global.add.u32 [%0], 1;" ::"l"(bar) : "memory");
}

__device__ __forceinline__ void grid_wait(u32* bar, u32 target) {
    if (threadIdx.x == 0) {
        u32 v;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
        } while (v < target);
    }
    __syncthreads();
}

// Block b's rows [r0, r1) of a matrix of `rows` rows: contiguous, balanced.
__device__ __forceinline__ void block_rows(int rows, int& r0, int& r1) {
    r0 = (int)((long long)blockIdx.x * rows / gridDim.x);
    r1 = (int)((long long)(blockIdx.x + 1) * rows / gridDim.x);
}

// Issues layer l's copy of matrix `m` (0 QKV, 1 output, 2 gate/up, 3 down) into its region.
__device__ __forceinline__ void issue(const SArgs& s, int l, int m, uint8_t* sm, unsigned long long* mb) {
    const SLayer& lw = s.layers[l];
    int r0, r1;
    if (m == 0) {
        block_rows((s.heads + 2 * s.kv_heads) * 64, r0, r1);
        const u32 bytes = (u32)((r1 - r0) * s.rb_qkv);
        mbar_expect(mb, bytes);
        bulk_copy(sm, lw.qkv + r0 * s.rb_qkv, bytes, mb);
    } else if (m == 1) {
        block_rows(s.hidden, r0, r1);
        const u32 bytes = (u32)((r1 - r0) * s.rb_o);
        mbar_expect(mb, bytes);
        bulk_copy(sm + s.off_o, lw.o + r0 * s.rb_o, bytes, mb);
    } else if (m == 2) {
        block_rows(s.inter, r0, r1);
        const u32 bytes = (u32)((r1 - r0) * s.rb_gu);
        mbar_expect(mb, 2 * bytes);
        bulk_copy(sm + s.off_gu, lw.gate_up + r0 * s.rb_gu, bytes, mb);
        bulk_copy(sm + s.off_gu + bytes, lw.gate_up + (s.inter + r0) * s.rb_gu, bytes, mb);
    } else {
        block_rows(s.hidden, r0, r1);
        const u32 bytes = (u32)((r1 - r0) * s.rb_down);
        mbar_expect(mb, bytes);
        bulk_copy(sm + s.off_down, lw.down + r0 * s.rb_down, bytes, mb);
    }
}

// One product of the block's rows [r0, r1), weights in shared memory at `w` (SwiGLU: the
// gate rows, then as many up rows), for one sequence. The inputs are rounded as `matvec`
// rounds them, and the sums are taken in the same order per row.
template <int QT, int MODE, typename F>
__device__ __forceinline__ void sprod(const MvArgs& a, const uint8_t* w, int r0, int r1, uint8_t* xq,
                                      const NormPre& np, F&& after_inputs) {
    constexpr int RW = MODE == MODE_GLU ? 2 : 1;
    __shared__ float rs[1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int ng = (a.k + 1023) / 1024, nr = r1 - r0;
    quantize_x<QT, 1>(a, 1, ng, xq, rs, np);
    TMID(1);
    after_inputs();
    for (int j = warp; j < nr; j += WARPS) {
        float acc[RW][1] = {};
        for (int g = 0; g < ng; ++g) {
            if (!lane_has<QT>(a.k, g, lane)) continue;
            Raw raw[RW];
#pragma unroll
            for (int h = 0; h < RW; ++h) raw_load<QT>(w + (size_t)(j + h * nr) * a.row_bytes, g, lane, raw[h]);
            mul_step<QT, 1, RW>(raw, lane, xq, ng, g, 1, acc);
        }
        const float v = warp_sum(acc[0][0]) * rs[0];
        const float v2 = RW > 1 ? warp_sum(acc[RW - 1][0]) * rs[0] : 0.f;
        if (lane == 0) store_out<MODE>(a, 0, r0 + j, v, v2);
    }
}

__device__ __forceinline__ MvArgs margs(const SArgs& s, const float* x, const float* norm_in, float* y,
                                        unsigned long long rb, int rows, int k) {
    MvArgs a = {};
    a.x = x, a.y = y, a.n = s.n, a.row_bytes = rb, a.rows = rows, a.k = k, a.ldy = rows, a.eps = s.eps;
    a.norm_in = norm_in;
    return a;
}

// Attention item `it` = (KV head, chunk) of the one sequence (as persistent-step.patch).
struct AttItem {
    int kvh, sp, pos, slot, len, chunk, S, j0, j1;
};
__device__ __forceinline__ bool att_item(const SArgs& s, int it, AttItem& m) {
    m.sp = it % ATT_SPLITS;
    m.kvh = it / ATT_SPLITS;
    if (m.kvh >= s.kv_heads) return false;
    m.pos = s.pos[0], m.slot = s.slot[0], m.len = m.pos + 1;
    att_chunk(m.len, m.sp, m.chunk, m.S, m.j0, m.j1);
    return m.sp < m.S;
}

// A warp per query head of the group: scores with a lane per position, softmax, values
// with a lane per D/32 dimensions; the last chunk of a KV head combines the chunks.
template <int D>
__device__ void att_run(const SArgs& s, const SLayer& lw, const AttItem& m, float* sm, const float* ks,
                        const float* vs, int np) {
    constexpr int E = D / 32;
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, group = s.heads / s.kv_heads;
    const int cp4 = (m.chunk + 3) & ~3;
    __shared__ __align__(16) float qs[ATT_GMAX][D];
    __shared__ __align__(16) float kn[D];
    __shared__ __align__(16) float vn[D];
    __shared__ bool last;
    const int ldq = (s.heads + 2 * s.kv_heads) * D;
    const float* row = s.qkv;
    const bool has_new = m.j1 == m.len;
    for (int u = t; u < (group + 1) * (D / 2); u += blockDim.x) {
        const int hh = u / (D / 2), p = u % (D / 2);  // hh == group: the new key
        if (hh == group && !has_new) continue;
        const int a = s.interleaved ? 2 * p : p;
        const int b = s.interleaved ? 2 * p + 1 : p + D / 2;
        const float* src = hh < group ? row + (m.kvh * group + hh) * D : row + (s.heads + m.kvh) * D;
        float sn, cs;
        sincosf((float)m.pos * s.inv_freq[p], &sn, &cs);
        rope_pair(src, a, b, sn, cs, hh < group ? qs[hh] : kn);
    }
    if (has_new && t < D) vn[t] = row[(s.heads + s.kv_heads + m.kvh) * D + t];
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    TMID(0);
    const size_t base = ((size_t)m.slot * s.kv_heads + m.kvh) * (size_t)s.cap * D;
    float* kb = lw.k + base;
    float* vb = lw.v + base;
    if (has_new && t < D) {
        kb[(size_t)m.pos * D + t] = kn[t];
        vb[(size_t)m.pos * D + t] = vn[t];
    }
    (void)ldq;
    for (int h = warp; h < group; h += WARPS) {
        float* sc = sm + h * cp4;
        float mx = -INFINITY;
        for (int j = m.j0 + lane; j < m.j1; j += 32) {
            const float* kr = j == m.pos ? kn : j - m.j0 < np ? ks + (j - m.j0) * (D + 4) : kb + (size_t)j * D;
            const float d = key_dot<D>(qs[h], kr) * s.scale;
            sc[j - m.j0] = d;
            mx = fmaxf(mx, d);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float sum = 0.f;
        for (int j = lane; j < m.j1 - m.j0; j += 32) {
            const float p = expf(sc[j] - mx);
            sc[j] = p;
            sum += p;
        }
        sum = warp_sum(sum);
        __syncwarp();
        float o[E];
#pragma unroll
        for (int e = 0; e < E; ++e) o[e] = 0.f;
        for (int j = m.j0; j < m.j1; ++j) {
            const float p = sc[j - m.j0];
            const float* vr = j == m.pos ? vn : j - m.j0 < np ? vs + (j - m.j0) * (D + 4) : vb + (size_t)j * D;
#pragma unroll
            for (int e = 0; e < E; ++e) o[e] += p * vr[lane * E + e];
        }
        const int hq = m.kvh * group + h;
        if (m.S == 1) {
#pragma unroll
            for (int e = 0; e < E; ++e) s.att[hq * D + lane * E + e] = o[e] / sum;
        } else {
            float* mine = s.att_part + ((size_t)hq * ATT_SPLITS + m.sp) * (D + 2);
#pragma unroll
            for (int e = 0; e < E; ++e) mine[2 + lane * E + e] = o[e];
            if (lane == 0) mine[0] = mx, mine[1] = sum;
        }
    }
    if (m.S == 1) return;
    TMID(1);
    __threadfence();
    __syncthreads();
    u32* cnt = s.att_counter + m.kvh;
    if (t == 0) last = atomicAdd(cnt, 1u) == (u32)m.S - 1;
    __syncthreads();
    if (!last) return;
    for (int u = t; u < group * D; u += blockDim.x) {
        const int hq = m.kvh * group + u / D, d = u % D;
        const float* all = s.att_part + (size_t)hq * ATT_SPLITS * (D + 2);
        float mx = -INFINITY;
        for (int s2 = 0; s2 < m.S; ++s2) mx = fmaxf(mx, __ldcg(all + s2 * (D + 2)));
        float l = 0.f, v = 0.f;
        for (int s2 = 0; s2 < m.S; ++s2) {
            const float f = expf(__ldcg(all + s2 * (D + 2)) - mx);
            l += __ldcg(all + s2 * (D + 2) + 1) * f;
            v += __ldcg(all + s2 * (D + 2) + 2 + d) * f;
        }
        s.att[hq * D + d] = v / l;
    }
    if (t == 0) *cnt = 0;
}

#ifdef NO_REFILL
#define NOREF true  // the regions are filled once: only layer 0 waits for them
#else
#define NOREF false
#endif
#ifdef REFILL_LATE
#define LATE true
#else
#define LATE false
#endif

template <int QT, int D>
__device__ void stream_step(const SArgs& s) {
    extern __shared__ __align__(128) uint8_t stream_sm[];
    uint8_t* sm = stream_sm;
    __shared__ __align__(8) unsigned long long mb[4];
    uint8_t* xq = sm + s.off_xq;
    float* asm_ = (float*)(sm + s.off_att);
    const int G = gridDim.x, L = s.n_layers, qkv_w = (s.heads + 2 * s.kv_heads) * D;
    if (threadIdx.x == 0) {
#pragma unroll
        for (int m = 0; m < 4; ++m) mbar_init(mb + m);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int m = 0; m < 4; ++m) issue(s, 0, m, sm, mb + m);
    pdl_wait();  // the embedding's x
    u32 target = 0;
    // thread 0 re-issues a region once every warp has read it (the caller synced the block)
    // -DNO_REFILL (timing probe, wrong values): every layer multiplies layer 0's weights;
    // -DREFILL_LATE: a region's refill goes out after the next phase's inputs are rounded,
    // so that its bytes do not arrive while that phase reads its inputs
    auto refill = [&](int l, int m) {
#ifdef NO_REFILL
        return;
#endif
        if (threadIdx.x == 0 && l + 1 < L) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            issue(s, l + 1, m, sm, mb + m);
        }
    };
    for (int l = 0; l < L; ++l) {
        const SLayer& lw = s.layers[l];
        const u32 par = l & 1;
        NormPre npre;
        // QKV
        MvArgs a = margs(s, s.x, lw.attn_norm, s.qkv, s.rb_qkv, qkv_w, s.hidden);
        if (l > 0) grid_arrive(s.bar);
        norm_pre<QT>(a, 1, (a.k + 1023) / 1024, npre);
        if (l > 0) grid_wait(s.bar, target += G);
        T0();
        if (!NOREF || l == 0) mbar_wait(mb + 0, par);
        TMID(0);
        int r0, r1;
        block_rows(qkv_w, r0, r1);
        sprod<QT, MODE_PLAIN>(a, sm, r0, r1, xq, npre, [&] { if (LATE && l > 0) refill(l - 1, 3); });
        TREC(l, 0);
        grid_arrive(s.bar);
        // attention: an item (KV head, chunk) a block; its cached keys and values are copied
        // into the QKV region (free until the refill below) before the wait
        AttItem m;
        const bool mine = att_item(s, blockIdx.x, m);
        float* ks = (float*)sm;
        const int kv_rows = s.off_o / (2 * (D + 4) * 4);
        float* vs = ks + kv_rows * (D + 4);
        int np = 0;
        if (mine) {
            const size_t base = ((size_t)m.slot * s.kv_heads + m.kvh) * (size_t)s.cap * D;
            np = max(0, min(min(m.j1, m.pos) - m.j0, kv_rows));
            for (int c = threadIdx.x; c < np * (D / 4); c += blockDim.x) {
                const int j = c / (D / 4), e = 4 * (c % (D / 4));
                cp_async16(ks + j * (D + 4) + e, lw.k + base + (size_t)(m.j0 + j) * D + e);
                cp_async16(vs + j * (D + 4) + e, lw.v + base + (size_t)(m.j0 + j) * D + e);
            }
            asm volatile("cp.async.commit_group;" ::: "memory");
        }
        grid_wait(s.bar, target += G);
        {
        T0();
        if (mine) att_run<D>(s, lw, m, asm_, ks, vs, np);
        TREC(l, 1);
        }
        __syncthreads();
        if (!LATE) refill(l, 0);
        // output projection + residual
        a = margs(s, s.att, nullptr, s.x, s.rb_o, s.hidden, s.heads * D);
        grid_arrive(s.bar);
        npre.rem = -1;
        grid_wait(s.bar, target += G);
        {
        T0();
        if (!NOREF || l == 0) mbar_wait(mb + 1, par);
        TMID(0);
        block_rows(s.hidden, r0, r1);
        sprod<QT, MODE_RESID>(a, sm + s.off_o, r0, r1, xq, npre, [&] { if (LATE) refill(l, 0); });
        TREC(l, 2);
        }
        grid_arrive(s.bar);
        if (!LATE) refill(l, 1);
        // gate/up + SwiGLU
        a = margs(s, s.x, lw.ffn_norm, s.act, s.rb_gu, s.inter, s.hidden);
        norm_pre<QT>(a, 1, (a.k + 1023) / 1024, npre);
        grid_wait(s.bar, target += G);
        {
        T0();
        if (!NOREF || l == 0) mbar_wait(mb + 2, par);
        TMID(0);
        block_rows(s.inter, r0, r1);
        sprod<QT, MODE_GLU>(a, sm + s.off_gu, r0, r1, xq, npre, [&] { if (LATE) refill(l, 1); });
        TREC(l, 3);
        }
        grid_arrive(s.bar);
        if (!LATE) refill(l, 2);
        // down + residual
        a = margs(s, s.act, nullptr, s.x, s.rb_down, s.hidden, s.inter);
        npre.rem = -1;
        grid_wait(s.bar, target += G);
        {
        T0();
        if (!NOREF || l == 0) mbar_wait(mb + 3, par);
        TMID(0);
        block_rows(s.hidden, r0, r1);
        sprod<QT, MODE_RESID>(a, sm + s.off_down, r0, r1, xq, npre, [&] { if (LATE) refill(l, 2); });
        TREC(l, 4);
        }
        __syncthreads();
        if (!LATE || l + 1 == L) refill(l, 3);
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32, 1) sstep_q4_k_64(SArgs s) { stream_step<T_Q4_K, 64>(s); }
