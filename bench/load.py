"""Load generator: N concurrent streaming clients against one OpenAI-compatible server
(a llorch worker, pool-managerd, or llama.cpp's server). Each client sends requests back to
back for --requests rounds; measures TTFT per request and generated tokens (one SSE chunk
with text = one token for llorch; usage is not needed). Standard library only.
Usage: python bench/load.py --url http://127.0.0.1:8080 --clients 1,4,8 --max-tokens 64"""
import argparse, http.client, json, statistics, threading, time, urllib.parse

ap = argparse.ArgumentParser()
ap.add_argument("--url", required=True)
ap.add_argument("--clients", default="1,4,8")
ap.add_argument("--requests", type=int, default=3, help="requests per client")
ap.add_argument("--max-tokens", type=int, default=64)
ap.add_argument("--prompt", default="Write a short story about a robot who learns to paint. Once upon a time,")
ap.add_argument("--label", default="llorch")
a = ap.parse_args()
u = urllib.parse.urlparse(a.url)


def one(results):
    body = json.dumps({"prompt": a.prompt, "max_tokens": a.max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True})
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        results.append({"status": r.status})
        return
    ttft, n = None, 0
    buf = b""
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        ch = json.loads(data)
        if ch.get("choices") and ch["choices"][0].get("text"):
            if ttft is None:
                ttft = time.perf_counter() - t0
            n += 1
    results.append({"status": 200, "ttft": ttft, "tokens": n, "e2e": time.perf_counter() - t0})
    c.close()


def client(results):
    for _ in range(a.requests):
        one(results)


out = []
for n in [int(x) for x in a.clients.split(",")]:
    results = []
    threads = [threading.Thread(target=client, args=(results,)) for _ in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200 and r["ttft"] is not None]
    ttfts = sorted(r["ttft"] for r in ok)
    q = lambda p: ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] if ttfts else None
    row = {"label": a.label, "clients": n, "requests": len(results), "ok": len(ok),
           "tokens": sum(r["tokens"] for r in ok), "wall_s": wall,
           "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "requests_per_s": len(ok) / wall,
           "ttft_p50_s": q(0.5), "ttft_p99_s": q(0.99)}
    out.append(row)
    print(json.dumps(row), flush=True)
