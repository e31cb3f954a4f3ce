"""Device-to-device copy bandwidth (bytes read + written per second), median of 20 copies of
a 2 GiB buffer after warm-up: the ceiling for reading weights in batch-1 decode."""
import json, statistics

import torch

n = 2 << 30
src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
dst = torch.empty_like(src)
for _ in range(3):
    dst.copy_(src)
torch.cuda.synchronize()
times = []
for _ in range(20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    dst.copy_(src)
    e.record()
    torch.cuda.synchronize()
    times.append(s.elapsed_time(e) / 1e3)
t = statistics.median(times)
print(json.dumps({"bytes": 2 * n, "seconds": t, "bytes_per_second": 2 * n / t, "device": torch.cuda.get_device_name()}))
