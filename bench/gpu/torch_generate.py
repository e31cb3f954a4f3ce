"""PyTorch + transformers peer: the same bf16 weights, batch 1, greedy `model.generate`,
prefill of --prompt-tokens and --tokens new tokens, timed with CUDA synchronisation after
warm-up. Prints JSON."""
import argparse, json, statistics, time

import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--prompt-tokens", type=int, default=512)
ap.add_argument("--tokens", type=int, default=128)
ap.add_argument("--iterations", type=int, default=5)
a = ap.parse_args()

m = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).cuda().eval()
g = torch.Generator().manual_seed(0)
ids = torch.randint(3, m.config.vocab_size, (1, a.prompt_tokens), generator=g).cuda()
kw = dict(do_sample=False, max_new_tokens=a.tokens, min_new_tokens=a.tokens, eos_token_id=None, pad_token_id=0)


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


with torch.no_grad():
    for _ in range(2):
        m.generate(ids, **kw)
    prefill = [timed(lambda: m(ids)) for _ in range(a.iterations)]
    total = [timed(lambda: m.generate(ids, **kw)) for _ in range(a.iterations)]
p = statistics.median(prefill)
t = statistics.median(total)
print(json.dumps({
    "runtime": f"torch {torch.__version__} eager, transformers generate (greedy)",
    "prompt_tokens": a.prompt_tokens, "tokens": a.tokens,
    "prefill_tokens_per_second": a.prompt_tokens / p,
    "decode_tokens_per_second": (a.tokens - 1) / (t - p),
    "generate_seconds": t,
}))
