// Experiment (twelfth session): batch 1's gate/up product, SwiGLU and down product as one
// kernel, split over the intermediate dimension. Timing and logits only (`kernels.py ...
// mf=experiments/mlp_fused.cu:"mm pdl persist mlp"`); not used by the engine.
//
// Why: in the separate kernels a layer's MLP is two dependent phases (gate/up 8.8 us, down
// 5.0 us a layer at batch 1 in `trace-q4_k-1-prewait.txt`) against 6.5 us of weight bytes at
// the copy bandwidth; the down product pays its own wait release and reads and rounds its
// 5,632 inputs after it. Here block b owns a range of the intermediate columns: it computes
// their gate and up rows (a warp per row pair, as `matvec` does), so their SwiGLU outputs
// are in its own shared memory, and multiplies them by the down matrix's columns of the same
// range for all output rows, adding its partial sums to the residual stream with
// `red.add.f32`. Those down columns depend on nothing, so the block copies them into shared
// memory (`cp.async`) before the wait on the previous kernel: 6.5 MB of the layer's DRAM
// reads move off the chain of phases, and one hand-off a layer is gone.
//
// The float additions of 132 blocks' partial sums land in whatever order the blocks
// finish, so logits are not bitwise reproducible (a production form would add them as
// fixed-point integers and let the readers convert). A block adds to `x` only after every
// block has read `x` for its own input (`read`, a counter a layer zeroed before the step).
//
// Measured (H100, `kernels-mlp-log.txt`): correct (rel. L2 1.9e-7) but slower, 0.713 ms a
// step against 0.600; with the down columns not copied (`-DMLP_NOSLAB`, timing only) 0.610,
// so the fusion does not pay even with the down weights free (bench/README.md, twelfth
// session).
//
// Units: 16 intermediate columns whose down weights are the low or high nibbles of one
// 16-byte run of a Q4_K super-block (unit u: run u / 2, nibble u % 2), so a block's units
// share runs and its shared memory holds, per down row, its runs and their super-blocks'
// headers (d, dmin, 12 scale bytes). Q4_K, one sequence.

#include "../../../crates/llorch-engine/src/model/decode.cu"

#define MLP_MAXU 4   // units a block at most (TinyLlama on 132 SMs: 2 or 3)
#define MLP_SLOTS 5  // 16-byte runs a down row: MLP_MAXU / 2 + 1 runs, 2 headers

struct MlpArgs {  // matches `MlpArgs` in kernels.py
    const uint8_t* down;
    unsigned long long down_row_bytes;
    u32* read;  // blocks that have read x
    MvArgs gu;  // gate/up: x the residual stream, norm_in, rows = intermediate, y unused
};

// The intermediate column of element e (0..15) of unit u.
__device__ __forceinline__ int mlp_col(int u, int e) {
    const int run = u >> 1, pp = run & 7;
    return (run >> 3) * 256 + 64 * (pp >> 1) + 16 * (pp & 1) + 32 * (u & 1) + e;
}

template <int QT>
__device__ void mlp(const MlpArgs& s) {
    constexpr int U = UG_GLU;
    const MvArgs& a = s.gu;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = threadIdx.x, T = blockDim.x;
    const int ng = (a.k + 1023) / 1024, R = a.k;  // down's rows: the hidden size
    const int units = a.rows / 16, G = gridDim.x, per = units / G, extra = units % G;
    const int nu = per + (blockIdx.x < extra), u0 = blockIdx.x * per + min((int)blockIdx.x, extra);
    const int nj = 16 * nu;  // gate/up row pairs of this block
    const int run0 = u0 >> 1, nrun = ((u0 + nu - 1) >> 1) - run0 + 1, sb0 = run0 >> 3;
    const int nsb = ((u0 + nu - 1) >> 4) - sb0 + 1;
    extern __shared__ __align__(16) uint8_t xq[];
    uint8_t* slab = xq + ng * XQ_STEP;  // [slot][row] 16-byte runs: nrun qs runs, nsb headers
    __shared__ float rs[1];
    __shared__ float hf[16 * MLP_MAXU];
    __shared__ u32 hw[MLP_MAXU][8];
    __shared__ float hsc[MLP_MAXU];
    __shared__ int hsum[MLP_MAXU];
    // before the wait: the block's down runs and headers, the first row pair's weights
#ifdef MLP_NOSLAB  // timing probe: the down runs not copied (wrong values)
    if (R > 0) {} else
#endif
    for (int idx = t; idx < (nrun + nsb) * R; idx += T) {
        const int sl = idx / R, r = idx - sl * R;
        const uint8_t* row = s.down + (size_t)r * s.down_row_bytes;
        const uint8_t* src = sl < nrun ? row + (size_t)((run0 + sl) >> 3) * 144 + 16 + 16 * ((run0 + sl) & 7)
                                       : row + (size_t)(sb0 + sl - nrun) * 144;
        cp_async16(slab + ((size_t)sl * R + r) * 16, src);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    const int n = *a.n;
    Raw raw[U][2], nxt[U][2];
    bool has[U], nhas[U];
    int j = warp, g0 = 0;
    if (j < nj) load_unit<QT, U, 2>(a, mlp_col(u0 + j / 16, j % 16), 0, ng, lane, raw, has);
    NormPre np;
    norm_pre<QT>(a, n, ng, np);
    pdl_wait();
    quantize_x<QT, 1>(a, n, ng, xq, rs, np);
    if (t == 0) atomicAdd(s.read, 1u);  // its reads of x have returned (they are in xq)
    float acc[2][1] = {{0.f}, {0.f}};
    while (j < nj) {
        const bool row_end = g0 + U >= ng;
        const int jn = row_end ? j + WARPS : j, gn = row_end ? 0 : g0 + U;
        if (jn < nj) load_unit<QT, U, 2>(a, mlp_col(u0 + jn / 16, jn % 16), gn, ng, lane, nxt, nhas);
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (has[u]) mul_step<QT, 1, 2>(raw[u], lane, xq, ng, g0 + u, n, acc);
        if (row_end) {
            const float gt = warp_sum(acc[0][0]) * rs[0], up = warp_sum(acc[1][0]) * rs[0];
            if (lane == 0) hf[j] = gt / (1.f + expf(-gt)) * up;
            acc[0][0] = acc[1][0] = 0.f;
        }
        j = jn;
        g0 = gn;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            has[u] = nhas[u];
#pragma unroll
            for (int h = 0; h < 2; ++h) raw[u][h] = nxt[u][h];
        }
    }
    __syncthreads();
    // each unit's 16 outputs rounded to 16-bit integers with one scale, as `quantize_x` does
    if (warp < nu) {
        const float v = lane < 16 ? hf[16 * warp + lane] : 0.f;
        float m = fabsf(v);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        const int q = __float2int_rn(v * (m > 0.f ? 32767.f / m : 0.f));
        const int q1 = __shfl_down_sync(0xffffffffu, q, 1);
        int sq = q;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
        if (lane < 16 && !(lane & 1)) hw[warp][lane >> 1] = pack16(q, q1);
        if (lane == 0) hsc[warp] = m / 32767.f, hsum[warp] = sq;
    }
    if (t == 0) {  // every block has read x before any adds to it
        while (*(volatile u32*)s.read < (u32)G) __nanosleep(64);
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
#ifdef MLP_NODOWN  // timing probe: no down product (wrong values)
    if (R > 0) return;
#endif
    for (int r = t; r < R; r += T) {
        float y = 0.f;
        for (int ui = 0; ui < nu; ++ui) {
            const int u = u0 + ui, run = u >> 1, nib = u & 1;
            const uint4 q = *(const uint4*)(slab + ((size_t)(run - run0) * R + r) * 16);
            const uint4 hd = *(const uint4*)(slab + ((size_t)(nrun + (run >> 3) - sb0) * R + r) * 16);
            const u32 qw[4] = {q.x, q.y, q.z, q.w};
            int d = 0;
#pragma unroll
            for (int e4 = 0; e4 < 4; ++e4) {
                const u32 b = (qw[e4] >> (4 * nib)) & 0x0F0F0F0Fu;
                d = dp2a_hi(hw[ui][2 * e4 + 1], b, dp2a_lo(hw[ui][2 * e4], b, d));
            }
            // `q4k_scale` of sub-block jj, on the three scale words in registers
            const int jj = 2 * ((run & 7) >> 1) + nib, sh = 8 * (jj & 3);
            const u32 by = hd.y >> sh, bz = hd.z >> sh, bw = hd.w >> sh;
            const u32 isc = jj < 4 ? by & 63 : (bw & 0xF) | ((by >> 6 & 3) << 4);
            const u32 imn = jj < 4 ? bz & 63 : (bw >> 4 & 0xF) | ((bz >> 6 & 3) << 4);
            const float sc = u2f(isc), mn = u2f(imn);
            const float2 dm = __half22float2(*(const __half2*)&hd.x);
            y += hsc[ui] * (dm.x * sc * (float)d - dm.y * mn * (float)hsum[ui]);
        }
#ifdef MLP_NORED  // timing probe: no additions (wrong values)
        if (y == 1234.5f)
#endif
        atomicAdd(const_cast<float*>(a.x) + r, y);  // unused result: a `red`
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32, 1) mlp_q4_k_1(MlpArgs s) { mlp<T_Q4_K>(s); }
