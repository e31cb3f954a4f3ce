"""llama.cpp on the same GGUF, measured the way `llorch bench` measures: the same prompt text
cut to --prompt-tokens tokens, greedy, --tokens generated; prefill tok/s = prompt tokens /
time to the first token; decode tok/s = (tokens - 1) / time from the first to the last token.
Needs llama-cpp-python (reference/README.md builds it). Prints JSON."""
import argparse, json, statistics, time

from llama_cpp import Llama

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--iterations", type=int, default=5)
ap.add_argument("--warmup", type=int, default=1)
ap.add_argument("--tokens", type=int, default=128)
ap.add_argument("--prompt-tokens", type=int, default=128)
a = ap.parse_args()

llm = Llama(model_path=a.model, n_ctx=2048, n_threads=a.threads, n_threads_batch=a.threads, n_batch=512, verbose=False)
text = "The quick brown fox jumps over the lazy dog while the river runs past the old mill. " * (a.prompt_tokens // 8 + 8)
ids = llm.tokenize(text.encode(), add_bos=bool(llm._model.add_bos_token()), special=True)[: a.prompt_tokens]
prefill, decode = [], []
for i in range(a.warmup + a.iterations):
    llm.reset()
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        now = time.perf_counter()
        if first is None:
            first = now
        last = now
        n += 1
        if n >= a.tokens:
            break
    p, d = len(ids) / (first - t0), (n - 1) / (last - first)
    if i >= a.warmup:
        prefill.append(p)
        decode.append(d)
stat = lambda v: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
print(json.dumps({"runtime": "llama-cpp-python 0.3.36", "model": a.model, "threads": a.threads,
                  "prompt_tokens": len(ids), "tokens": a.tokens,
                  "prefill_tokens_per_second": stat(prefill), "decode_tokens_per_second": stat(decode)}, indent=1))
