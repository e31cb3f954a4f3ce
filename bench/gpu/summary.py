"""Reads the GPU run's files and writes the summary: correctness (relative L2 of logits,
greedy agreement), speed vs PyTorch, fraction of the bandwidth bound, worker load."""
import json, math, os, sys

M, out = sys.argv[1], sys.argv[2]
J = lambda f: json.load(open(os.path.join(M, f)))
s = {"correctness": {}, "speed": {}, "worker": []}
TOL = {"tinyllama-q4km.gguf": 3e-2, "tinyllama-bf16": 3e-2}
for f, tol in TOL.items():
    c, g = J(f"check-{f}-cpu.json"), J(f"check-{f}-cuda.json")
    a, b = c["logits"], g["logits"]
    rel = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)) / max(1e-30, sum(x * x for x in a)))
    same = 0
    for x, y in zip(c["greedy_ids"], g["greedy_ids"]):
        if x != y:
            break
        same += 1
    s["correctness"][f] = {"rel_l2": rel, "max_abs": max(abs(x - y) for x, y in zip(a, b)), "tolerance": tol,
                           "pass": rel < tol, "greedy_equal_prefix": same, "greedy_n": len(c["greedy_ids"])}
bw = J("bandwidth.json")["bytes_per_second"]
q4 = os.path.getsize(os.path.join(M, "tinyllama-q4km.gguf"))
for f in TOL:
    b = J(f"bench-{f}.json")
    d = b["decode_tokens_per_second"]["median"]
    # every weight is read once per decoded token, except the embedding table (one row)
    embed = 32000 * 2048
    bytes_per_token = q4 - embed * 144 // 256 if f.endswith("gguf") else 2 * (b["model"]["parameters"] - embed)
    bound = bw / bytes_per_token
    s["speed"][f] = {"prefill_tok_s": b["prefill_tokens_per_second"]["median"], "decode_tok_s": d,
                     "weight_bytes_per_token": bytes_per_token, "bound_tok_s": bound, "fraction_of_bound": d / bound,
                     "load_seconds": b["load_seconds"]}
t = J("torch.json")
s["speed"]["pytorch_bf16"] = t
s["speed"]["llorch_bf16_vs_pytorch_decode"] = s["speed"]["tinyllama-bf16"]["decode_tok_s"] / t["decode_tokens_per_second"]
s["speed"]["llorch_q4km_vs_pytorch_decode"] = s["speed"]["tinyllama-q4km.gguf"]["decode_tok_s"] / t["decode_tokens_per_second"]
s["bandwidth_bytes_per_second"] = bw
s["worker"] = [json.loads(l) for l in open(os.path.join(M, "load.jsonl")) if l.strip()]
s["info"] = J("info.json")
json.dump(s, open(out, "w"), indent=1)
print(json.dumps(s["correctness"], indent=1))
print(f"{'file':<24}{'prefill tok/s':>15}{'decode tok/s':>14}{'bound tok/s':>13}{'of bound':>10}")
for f in TOL:
    x = s["speed"][f]
    print(f"{f:<24}{x['prefill_tok_s']:>15.1f}{x['decode_tok_s']:>14.1f}{x['bound_tok_s']:>13.0f}{x['fraction_of_bound']:>10.1%}")
print(f"{'pytorch bf16':<24}{t['prefill_tokens_per_second']:>15.1f}{t['decode_tokens_per_second']:>14.1f}")
for w in s["worker"]:
    print(f"worker clients={w['clients']}: {w['tokens_per_s']:.1f} tok/s, TTFT p50 {w['ttft_p50_s']:.3f}s p99 {w['ttft_p99_s']:.3f}s")
