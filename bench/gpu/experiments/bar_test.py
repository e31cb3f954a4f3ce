# grid barrier cost on this GPU: 1000 barriers in one kernel, several implementations
import cupy as cp, ctypes, sys
src = r'''
typedef unsigned int u32;
__device__ __forceinline__ u32 ld_acq(u32* p){u32 v; asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;}
extern "C" __global__ void barA(u32* bar, int iters, float* sink){
  u32 target=0;
  for(int i=0;i<iters;++i){ target+=gridDim.x; __syncthreads();
    if(threadIdx.x==0){ __threadfence(); atomicAdd(bar,1u); while(ld_acq(bar)<target){} }
    __syncthreads(); }
}
extern "C" __global__ void barB(u32* bar, int iters, float* sink){
  u32 target=0;
  for(int i=0;i<iters;++i){ target+=gridDim.x; __syncthreads();
    if(threadIdx.x==0){ u32 o; asm volatile("atom.add.release.gpu.global.u32 %0,[%1],1;":"=r"(o):"l"(bar):"memory"); while(ld_acq(bar)<target){__nanosleep(32);} }
    __syncthreads(); }
}
// last arriver bumps a flag on another line; others poll the flag
extern "C" __global__ void barC(u32* bar, int iters, float* sink){
  u32* flag = bar + 32;
  for(int i=0;i<iters;++i){ __syncthreads();
    if(threadIdx.x==0){ u32 o; asm volatile("atom.add.acq_rel.gpu.global.u32 %0,[%1],1;":"=r"(o):"l"(bar):"memory");
      if(o == (u32)(i+1)*gridDim.x-1){ asm volatile("st.release.gpu.global.u32 [%0],%1;"::"l"(flag),"r"((u32)i+1):"memory"); }
      else { while(ld_acq(flag) < (u32)i+1){} } }
    __syncthreads(); }
}
'''
mod = cp.RawModule(code=src, options=("-arch=sm_90",))
sms = cp.cuda.Device().attributes["MultiProcessorCount"]
bar = cp.zeros(64, dtype=cp.uint32); sink = cp.zeros(1, dtype=cp.float32)
for name in ["barA", "barB", "barC"]:
    f = mod.get_function(name)
    for blocks in [sms, 2 * sms]:
        for _ in range(2):
            bar.fill(0); cp.cuda.runtime.deviceSynchronize()
            e0, e1 = cp.cuda.Event(), cp.cuda.Event(); iters = 2000
            e0.record(); f((blocks,), (256,), (bar, cp.int32(iters), sink)); e1.record(); e1.synchronize()
        print(f"{name} blocks {blocks}: {cp.cuda.get_elapsed_time(e0, e1) * 1e3 / iters:.2f} us per barrier", flush=True)
