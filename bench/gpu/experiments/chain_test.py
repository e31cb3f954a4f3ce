# What a dependent phase costs on this GPU, by how the next phase learns its input is ready.
# A chain of NPH phases shaped like the decode step's small products: each reads a 2048-float
# vector, RMS-norms it in the block, and a warp per output row multiplies it by that row's
# 4-bit weights (1 KB a row, 2 MB a phase, a distinct matrix per phase so they come from
# DRAM), the weights loaded before the wait. Variants:
#   pdl:   a kernel per phase, programmatic dependent launch, `griddepcontrol.wait` (decode.cu)
#   ll:    a kernel per phase, no wait: every value is stored with a flag in one 8-byte word
#          (NCCL's LL protocol) and readers poll their words until the flags say "this step"
#   bar:   one persistent kernel, a grid barrier between phases
#   pll:   one persistent kernel, LL words instead of the barrier
#   nop:   (floor) a kernel per phase as pdl, that only waits and lets the next one start
#   read:  (floor) as nop, then reads and RMS-norms the input vector, and writes 2048 floats
#          (a warp's row each), without weights
# Prints us per phase (a graph of NPH phases replayed; median of 5 timings of 200 replays).
import ctypes, os, statistics, subprocess, sys
import cupy as cp, numpy as np

ROWS, NPH = 2048, 110
WL = int(sys.argv[1]) if len(sys.argv) > 1 else 2  # 16-byte weight loads per lane and row
# dynamic shared memory a block takes (unused): 100000 holds occupancy at 2 blocks an SM, as
# decode.cu's products have (their registers)
SMEM = int(sys.argv[2]) if len(sys.argv) > 2 else 100000
# blocks an SM each kernel is compiled for (`__launch_bounds__(256, MINB)`; the grid stays 2 an
# SM): 4 leaves room for the next kernel's blocks beside the running one's, so they start
# and load their weights before it ends
MINB = int(sys.argv[3]) if len(sys.argv) > 3 else 2
src = r'''
typedef unsigned int u32;
#define ROWS 2048
#ifndef WL
#define WL 2
#endif
__device__ __forceinline__ float warp_sum(float v){ for(int o=16;o>0;o>>=1) v+=__shfl_xor_sync(0xffffffffu,v,o); return v; }
__device__ __forceinline__ void pdl_wait(){ asm volatile("griddepcontrol.wait;":::"memory"); }
__device__ __forceinline__ void pdl_go(){ asm volatile("griddepcontrol.launch_dependents;":::"memory"); }
__device__ __forceinline__ uint4 ldv(const uint2* p){ uint4 v; asm volatile("ld.volatile.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x),"=r"(v.y),"=r"(v.z),"=r"(v.w) : "l"(p)); return v; }
__device__ __forceinline__ void stv(uint2* p, float v, u32 f){ asm volatile("st.volatile.global.v2.u32 [%0], {%1,%2};" :: "l"(p), "r"(__float_as_uint(v)), "r"(f) : "memory"); }
__device__ __forceinline__ u32 ld_acq(u32* p){u32 v; asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;}

struct W { uint4 w[WL]; };
__device__ __forceinline__ void wload(const uint4* Wm, int r, int lane, W& w){
  if (r < ROWS) { const uint4* p = Wm + ((size_t)r * 32 + lane) * WL;
#pragma unroll
    for (int j=0;j<WL;++j) w.w[j] = p[j]; }
}
// xs holds the vector; the row's dot with the lane's WL*32 nibbles
__device__ __forceinline__ float rowdot(const float* xs, const W& w, int lane){
  float acc=0.f; const int c0 = lane * WL * 32;
#pragma unroll
  for (int j=0;j<WL;++j){ const u32 q[4]={w.w[j].x,w.w[j].y,w.w[j].z,w.w[j].w};
#pragma unroll
    for (int k=0;k<4;++k)
#pragma unroll
      for (int e=0;e<8;++e) acc += (float)((int)((q[k]>>(4*e))&15u) - 8) * xs[(c0 + j*32 + k*8 + e) % ROWS]; }
  return acc;
}
__device__ __forceinline__ float block_rs(float ss, float* red){
  const int lane=threadIdx.x&31, warp=threadIdx.x>>5;
  ss = warp_sum(ss); if(lane==0) red[warp]=ss; __syncthreads();
  float t=0.f;
#pragma unroll
  for(int i=0;i<8;++i) t+=red[i];
  return rsqrtf(t/ROWS + 1e-5f);
}
__device__ __forceinline__ float read_plain(const float* x, float* xs){
  float ss=0.f;
  for(int i=threadIdx.x*4;i<ROWS;i+=1024){ float4 v=*(const float4*)(x+i); *(float4*)(xs+i)=v; ss+=v.x*v.x+v.y*v.y+v.z*v.z+v.w*v.w; }
  return ss;
}
__device__ __forceinline__ float read_ll(const uint2* x, float* xs, u32 want){
  float ss=0.f;
  for(int i=threadIdx.x*4;i<ROWS;i+=1024){ uint4 a, b;
    do { a = ldv(x+i); } while (a.y != want || a.w != want);
    do { b = ldv(x+i+2); } while (b.y != want || b.w != want);
    float4 v = make_float4(__uint_as_float(a.x), __uint_as_float(a.z), __uint_as_float(b.x), __uint_as_float(b.z));
    *(float4*)(xs+i)=v; ss+=v.x*v.x+v.y*v.y+v.z*v.z+v.w*v.w; }
  return ss;
}
extern "C" __global__ void bump(u32* ctr){ ctr[0] += 1; }

extern "C" __global__ void __launch_bounds__(256,MINB) ph_pdl(const uint4* Wm, const float* x, float* y){
  const int lane=threadIdx.x&31, warp=threadIdx.x>>5, r=blockIdx.x*8+warp;
  W w; wload(Wm, r, lane, w);
  pdl_wait(); pdl_go();
  __shared__ float xs[ROWS]; __shared__ float red[8];
  const float rs = block_rs(read_plain(x, xs), red); __syncthreads();
  if (r < ROWS){ const float v = warp_sum(rowdot(xs, w, lane)) * rs * 0.02f; if(lane==0) y[r]=v; }
}
extern "C" __global__ void __launch_bounds__(256,MINB) ph_nop(const uint4* Wm, const float* x, float* y){
  pdl_wait(); pdl_go();
}
extern "C" __global__ void __launch_bounds__(256,MINB) ph_read(const uint4* Wm, const float* x, float* y){
  const int lane=threadIdx.x&31, warp=threadIdx.x>>5, r=blockIdx.x*8+warp;
  pdl_wait(); pdl_go();
  __shared__ float xs[ROWS]; __shared__ float red[8];
  const float rs = block_rs(read_plain(x, xs), red); __syncthreads();
  if (r < ROWS && lane==0) y[r] = xs[r] * rs;
}
extern "C" __global__ void __launch_bounds__(256,MINB) ph_ll(const uint4* Wm, const uint2* x, uint2* y, const u32* ctr, int k, int nph){
  const int lane=threadIdx.x&31, warp=threadIdx.x>>5, r=blockIdx.x*8+warp;
  pdl_go();
  W w; wload(Wm, r, lane, w);
  const u32 e = ctr[0] * nph + k;
  __shared__ float xs[ROWS]; __shared__ float red[8];
  const float rs = block_rs(read_ll(x, xs, e - 1), red); __syncthreads();
  if (r < ROWS){ const float v = warp_sum(rowdot(xs, w, lane)) * rs * 0.02f; if(lane==0) stv(y+r, v, e); }
}
extern "C" __global__ void __launch_bounds__(256,MINB) ph_bar(const uint4* Wm, float* x0, float* x1, u32* bar, int nph){
  const int lane=threadIdx.x&31, warp=threadIdx.x>>5, r=blockIdx.x*8+warp;
  __shared__ float xs[ROWS]; __shared__ float red[8];
  u32 target = 0;
  W w; wload(Wm, r, lane, w);
  for (int k=1;k<=nph;++k){
    const float* x = (k&1)? x0 : x1; float* y = (k&1)? x1 : x0;
    const float rs = block_rs(read_plain(x, xs), red); __syncthreads();
    if (r < ROWS){ const float v = warp_sum(rowdot(xs, w, lane)) * rs * 0.02f; if(lane==0) y[r]=v; }
    if (k < nph) wload(Wm + (size_t)k * ROWS * 32 * WL, r, lane, w);
    target += gridDim.x; __syncthreads();
    if (threadIdx.x==0){ u32 o; asm volatile("atom.add.release.gpu.global.u32 %0,[%1],1;":"=r"(o):"l"(bar):"memory"); while(ld_acq(bar)<target){} }
    __syncthreads();
  }
}
extern "C" __global__ void __launch_bounds__(256,MINB) ph_pll(const uint4* Wm, uint2* x0, uint2* x1, const u32* ctr, int nph){
  const int lane=threadIdx.x&31, warp=threadIdx.x>>5, r=blockIdx.x*8+warp;
  __shared__ float xs[ROWS]; __shared__ float red[8];
  const u32 base = ctr[0] * nph;
  W w; wload(Wm, r, lane, w);
  for (int k=1;k<=nph;++k){
    const uint2* x = (k&1)? x0 : x1; uint2* y = (k&1)? x1 : x0;
    const float rs = block_rs(read_ll(x, xs, base + k - 1), red); __syncthreads();
    if (r < ROWS){ const float v = warp_sum(rowdot(xs, w, lane)) * rs * 0.02f; if(lane==0) stv(y+r, v, base + k); }
    if (k < nph) wload(Wm + (size_t)k * ROWS * 32 * WL, r, lane, w);
    __syncthreads();  // xs is rewritten by the next phase
  }
}
'''
os.makedirs("/tmp/chain", exist_ok=True)
open("/tmp/chain/chain.cu", "w").write(src)
subprocess.run(["nvcc", "--cubin", "-O3", "-arch=sm_90", f"-DWL={WL}", f"-DMINB={MINB}", "-o", "/tmp/chain/chain.cubin",
                "/tmp/chain/chain.cu"], check=True)
mod = cp.cuda.function.Module()
mod.load_file("/tmp/chain/chain.cubin")
cuda = ctypes.CDLL("libcuda.so.1")


class LaunchAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_int * 16)]


class LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(LaunchAttr)), ("nattrs", ctypes.c_uint)]


def launch(fn, grid, stream, args, pdl):
    arr = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in args])
    attr = LaunchAttr(id=6)
    attr.value[0] = 1 if pdl else 0
    cfg = LaunchConfig((ctypes.c_uint * 3)(grid, 1, 1), (ctypes.c_uint * 3)(256, 1, 1), 0 if fn is f['bump'] else SMEM, ctypes.c_void_p(stream.ptr),
                       ctypes.pointer(attr), 1)
    r = cuda.cuLaunchKernelEx(ctypes.byref(cfg), ctypes.c_void_p(fn.ptr), arr, None)
    assert r == 0, r


def ptr(a):
    return ctypes.c_uint64(a.data.ptr)


sms = cp.cuda.Device().attributes["MultiProcessorCount"]
G = 2 * sms
wm = cp.asarray(np.random.default_rng(1).integers(0, 2**31, size=NPH * ROWS * 32 * WL * 4, dtype=np.uint32))
x0 = cp.asarray(np.random.default_rng(2).standard_normal(ROWS).astype(np.float32))
x1 = cp.zeros(ROWS, cp.float32)
l0 = cp.zeros(2 * ROWS, cp.uint32)
l1 = cp.zeros(2 * ROWS, cp.uint32)
ctr = cp.zeros(64, cp.uint32)
bar = cp.zeros(64, cp.uint32)
f = {n: mod.get_function(n) for n in ["bump", "ph_pdl", "ph_ll", "ph_bar", "ph_pll", "ph_nop", "ph_read"]}
wstride = ROWS * 32 * WL * 16
for n in ["ph_pdl", "ph_ll", "ph_bar", "ph_pll", "ph_nop", "ph_read"]:
    assert cuda.cuFuncSetAttribute(ctypes.c_void_p(f[n].ptr), 8, SMEM) == 0


def init_ll():
    ctr.fill(0)
    v = l0.view(cp.float32)
    v[0::2] = x0
    l0[1::2] = NPH  # what phase 0 of step 1 wrote: epoch 1 * NPH + 0
    l1.fill(0)


def build(name, stream):
    launch(f["bump"], 1, stream, [ptr(ctr)], False)
    if name in ("pdl", "nop", "read"):
        for k in range(1, NPH + 1):
            a, b = (x0, x1) if k & 1 else (x1, x0)
            launch(f["ph_" + name], G, stream, [ctypes.c_uint64(wm.data.ptr + (k - 1) * wstride), ptr(a), ptr(b)], k > 1)
    elif name == "ll":
        for k in range(1, NPH + 1):
            a, b = (l0, l1) if k & 1 else (l1, l0)
            launch(f["ph_ll"], G, stream, [ctypes.c_uint64(wm.data.ptr + (k - 1) * wstride), ptr(a), ptr(b), ptr(ctr),
                                           ctypes.c_int(k), ctypes.c_int(NPH)], k > 1)
    elif name == "bar":
        launch(f["ph_bar"], G, stream, [ptr(wm), ptr(x0), ptr(x1), ptr(bar), ctypes.c_int(NPH)], False)
    elif name == "pll":
        launch(f["ph_pll"], G, stream, [ptr(wm), ptr(l0), ptr(l1), ptr(ctr), ctypes.c_int(NPH)], False)


stream = cp.cuda.Stream(non_blocking=True)
out = {}
for name in ["pdl", "ll", "bar", "pll", "nop", "read"]:
    init_ll()
    bar.fill(0)
    cp.cuda.runtime.deviceSynchronize()
    stream.begin_capture()
    build(name, stream)
    g = stream.end_capture()
    g.upload(stream)
    reps = 200
    ts = []
    for t in range(6):
        if name == "bar":  # the barrier counts up across launches: reset between timings
            bar.fill(0)
            cp.cuda.runtime.deviceSynchronize()
            reps_t = 1
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(stream)
            g.launch(stream)
            e1.record(stream)
            e1.synchronize()
            ts.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3 / NPH)
            continue
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record(stream)
        for _ in range(reps):
            g.launch(stream)
        e1.record(stream)
        e1.synchronize()
        ts.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3 / reps / NPH)
    # one step from the same start for the comparison
    x0.set(np.random.default_rng(2).standard_normal(ROWS).astype(np.float32))
    init_ll()
    bar.fill(0)
    cp.cuda.runtime.deviceSynchronize()
    g.launch(stream)
    stream.synchronize()
    res = x0 if name in ("pdl", "bar", "nop", "read") else l0.view(cp.float32)[0::2]
    out[name] = cp.asnumpy(res)
    print(f"{name}: {statistics.median(ts[1:]):.2f} us per phase (WL={WL}, {G} blocks, {SMEM} B smem, MINB {MINB})",
          flush=True)
# the variants compute the same chain of phases: same values up to float rounding order
for name in ["ll", "bar", "pll"]:
    print(f"{name} vs pdl max abs diff {np.abs(out[name] - out['pdl']).max():.3g}", flush=True)
