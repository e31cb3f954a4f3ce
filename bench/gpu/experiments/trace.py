"""Timeline of one decode step, from %globaltimer stamps in the kernels.

`python3 trace.py make SRC.cu OUT.cu` writes a copy of decode.cu whose batch-1..8 products
(`matvec`) and split attention record, per block: entry, (products) just before the wait,
the wait's return, inputs ready (products: rounded into shared memory), the end
(attention: before its counter, and the combining block's end). `kernels.py --trace`
replays a step of such a file once and saves the records
(`trace-<variant>-<type>-<batch>.npy`); `python3 trace.py show FILE.npy` prints
per kernel of the step: when its first block started, when the wait returned (first/last
block), inputs ready, its last block's end, relative to the step's start, and the gaps;
`show FILE.npy NAME,...` adds, for the named kernels (e.g. `o3,gate_up3`), the median and
largest per-block phases: before the wait, in it, reading the inputs, multiplying.
"""
import re
import sys

import numpy as np

HEADER = r'''
#define TRACE_CAP 65536
__device__ unsigned int trace_n;
__device__ unsigned long long trace_buf[TRACE_CAP * 8];
__device__ __forceinline__ unsigned long long gtime() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// id: what the kernel works on (its weights or KV cache: tells the layer), kind: 0 product,
// 1 attention (t3: before the counter), 2 attention's combining block (t3: its end);
// tp: products, when the block reached the wait (its loads ahead of it issued)
__device__ __forceinline__ void trace_rec(unsigned long long id, int kind, unsigned long long t0,
                                         unsigned long long t1, unsigned long long t2,
                                         unsigned long long t3, unsigned long long tp = 0) {
    const unsigned int k = atomicAdd(&trace_n, 1u);
    if (k >= TRACE_CAP) return;
    unsigned long long* r = trace_buf + 8ull * k;
    r[0] = id, r[1] = kind, r[2] = blockIdx.x + 65536ull * (blockIdx.y + 65536ull * blockIdx.z), r[3] = tp;
    r[4] = t0, r[5] = t1, r[6] = t2, r[7] = t3;
}
'''


def make(src, dst):
    s = open(src).read()
    s = s.replace("typedef unsigned int u32;\n", "typedef unsigned int u32;\n" + HEADER, 1)
    # matvec: entry, after the wait, after quantize_x, end (all warps)
    body = s[s.index("__device__ void matvec(const MvArgs& a) {"):]
    body_end = body.index("\n}\n") + 3
    mv = body[:body_end]
    mv2 = mv.replace("    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;\n",
                     "    const unsigned long long T0 = gtime();\n"
                     "    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;\n", 1)
    mv2 = mv2.replace("    pdl_wait();\n", "    const unsigned long long TP = gtime();\n"
                      "    pdl_wait();\n    const unsigned long long T1 = gtime();\n", 1)
    qx = re.search(r"    quantize_x<QT, NB>\([^;]*\);\n", mv2).group(0)
    mv2 = mv2.replace(qx, qx + "    const unsigned long long T2 = gtime();\n", 1)
    assert mv2.endswith("    }\n}\n"), mv2[-40:]
    mv2 = mv2[:-2] + ("    __syncthreads();\n"
                      "    if (threadIdx.x == 0) trace_rec((unsigned long long)a.w, 0, T0, T1, T2, gtime(), TP);\n}\n")
    s = s.replace(mv, mv2, 1)
    # attention_split
    a0 = s.index("__device__ void attention_split(")
    a1 = s.index("\n}\n", a0) + 3
    at = s[a0:a1]
    at2 = at.replace("    const int i = blockIdx.z, h = blockIdx.x, sp = blockIdx.y",
                     "    const unsigned long long T0 = gtime();\n"
                     "    const int i = blockIdx.z, h = blockIdx.x, sp = blockIdx.y", 1)
    at2 = at2.replace("    pdl_wait();\n", "    pdl_wait();\n    const unsigned long long T1 = gtime();\n", 1)
    at2 = at2.replace("    asm volatile(\"cp.async.wait_all;\" ::: \"memory\");\n    __syncthreads();\n",
                      "    asm volatile(\"cp.async.wait_all;\" ::: \"memory\");\n    __syncthreads();\n"
                      "    const unsigned long long T2 = gtime();\n", 1)
    at2 = at2.replace("    __threadfence();\n    __syncthreads();\n    u32* cnt",
                      "    __threadfence();\n    __syncthreads();\n"
                      "    if (t == 0) trace_rec((unsigned long long)kc, 1, T0, T1, T2, gtime());\n    u32* cnt", 1)
    at2 = at2.replace("    if (t == 0) *cnt = 0;\n}\n",
                      "    if (t == 0) *cnt = 0;\n    __syncthreads();\n"
                      "    if (t == 0) trace_rec((unsigned long long)kc, 2, T0, T1, T2, gtime());\n}\n", 1)
    assert at2.count("trace_rec") == 2 and at2.count("T2 = gtime") == 1
    s = s.replace(at, at2, 1)
    open(dst, "w").write(s)


def phases(r, names, want):
    """Per-block phases (us) of the named product kernels: median and largest."""
    ids, kind, t0, tp, t1, t2, t3 = r[:, 0], r[:, 1], r[:, 4], r[:, 3], r[:, 5], r[:, 6], r[:, 7]
    print(f"{'kernel':>10} {'before the wait':>16} {'in the wait':>12} {'inputs':>12} {'multiply':>12}   (us a block: median / largest)")
    for i in np.unique(ids):
        name = (names or {}).get(int(i))
        m = (ids == i) & (kind == 0)
        if name not in want or not m.any():
            continue
        cols = [(tp - t0)[m], (t1 - tp)[m], (t2 - t1)[m], (t3 - t2)[m]]
        print(f"{name:>10} " + " ".join(f"{np.median(c) / 1e3:6.2f} /{c.max() / 1e3:5.2f}".rjust(w)
                                          for c, w in zip(cols, (16, 12, 12, 12))))


def show(path, names=None, want=None):
    r = np.load(path)
    ids, kind, t0, t1, t2, t3 = r[:, 0], r[:, 1], r[:, 4], r[:, 5], r[:, 6], r[:, 7]
    base = t0.min()
    # a kernel instance = its id (weights / KV cache pointer); order by first entry
    rows = []
    for i in np.unique(ids):
        m = ids == i
        k = kind[m]
        att = (k > 0).any()
        end = t3[m & (kind == 2)].max() if att and (m & (kind == 2)).any() else t3[m].max()
        rows.append((t0[m].min(), i, att, m.sum(), t0[m].max(), t1[m].min(), t1[m].max(), t2[m].max(), end))
    rows.sort()
    print(f"{'kernel':>10} {'blocks':>6} {'start':>8} {'last_start':>10} {'wait_first':>10} {'wait_last':>9}"
          f" {'input':>8} {'end':>8} {'span':>6} {'gap':>6}   (us from the step's first block)")
    prev_end = None
    for (s, i, att, nbk, ls, w0, w1, ready, end) in rows:
        name = (names or {}).get(int(i), "attention" if att else hex(int(i))[-6:])
        f = lambda t: (t - base) / 1e3
        gap = f(end) - prev_end if prev_end is not None else 0.0
        print(f"{name:>10} {nbk:6d} {f(s):8.2f} {f(ls):10.2f} {f(w0):10.2f} {f(w1):9.2f} {f(ready):8.2f} {f(end):8.2f}"
              f" {f(end) - f(s):6.2f} {gap:6.2f}")
        prev_end = f(end)
    tt = np.sort(np.unique(np.concatenate([t0, t1, t2, t3])))
    d = np.diff(tt)
    print(f"globaltimer: smallest nonzero step {d[d > 0].min()} ns")
    if want:
        phases(r, names, want)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    else:
        import json
        import os
        js = sys.argv[2][:-4] + ".json"
        names = {int(k): v for k, v in json.load(open(js)).items()} if os.path.exists(js) else None
        show(sys.argv[2], names, sys.argv[3].split(",") if len(sys.argv) > 3 else None)
