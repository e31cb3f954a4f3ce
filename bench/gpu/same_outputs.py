"""Greedy outputs of a worker on the GPU are the same alone and in a batch (graph buckets).

Sends each prompt alone, then N requests at once (the prompts, then the first one again),
and compares the texts. With --save FILE the texts alone are written to FILE; with
--against FILE they must also equal FILE's (e.g. a worker with LLORCH_DECODE_AHEAD=0).
Usage: python3 same_outputs.py URL [N=12] [--save FILE | --against FILE]
"""
import json
import sys
import threading
import urllib.request

URL = sys.argv[1]
PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3, 4,",
           "The three primary colors are", "Water boils at", "A haiku about the sea:",
           # longer than the graph's rows: Candle's path (two at once: with our attention kernels)
           "Once upon a time, in a small village at the edge of a great forest, there lived an old "
           "clockmaker who had never once left the valley. Every morning he wound the tower clock, "
           "and every evening he wrote a single line in a leather book. One day a stranger came and",
           "The report begins with a summary of the quarter: revenue grew in every region, costs fell "
           "slightly, and the new factory opened two weeks ahead of schedule. The second section "
           "covers hiring, and the third explains why the board decided to"]


def complete(prompt):
    body = json.dumps({"prompt": prompt, "max_tokens": 24, "temperature": 0}).encode()
    req = urllib.request.Request(URL + "/v1/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)["choices"][0]["text"]


args = sys.argv[1:]
opt = {}
for flag in ("--save", "--against"):
    if flag in args:
        i = args.index(flag)
        opt[flag] = args[i + 1]
        del args[i:i + 2]
alone = {p: complete(p) for p in PROMPTS}
ref_ok = True
if "--save" in opt:
    with open(opt["--save"], "w") as f:
        json.dump(alone, f)
if "--against" in opt:
    with open(opt["--against"]) as f:
        ref = json.load(f)
    diff = [p for p in PROMPTS if ref.get(p) != alone[p]]
    ref_ok = not diff
    print(json.dumps({"alone_vs_reference_same": len(PROMPTS) - len(diff), "of": len(PROMPTS)}))
    for p in diff:
        print("DIFF-REF", repr(p), repr(ref.get(p)), repr(alone[p]))
N = int(args[1]) if len(args) > 1 else 12  # 12: the 16-sequence bucket
# fewer than the prompts: the first N (6: the 8-sequence bucket)
batch = PROMPTS[:N] if N < len(PROMPTS) else PROMPTS + [PROMPTS[0]] * (N - len(PROMPTS))
out = [None] * len(batch)


def run(i):
    out[i] = complete(batch[i])


ts = [threading.Thread(target=run, args=(i,)) for i in range(len(batch))]
[t.start() for t in ts]
[t.join() for t in ts]
same = sum(out[i] == alone[p] for i, p in enumerate(batch))
print(json.dumps({"requests": len(batch), "same_as_alone": same}))
for i, p in enumerate(batch):
    if out[i] != alone[p]:
        print("DIFF", repr(p), repr(alone[p]), repr(out[i]))
sys.exit(0 if same == len(batch) and ref_ok else 1)
