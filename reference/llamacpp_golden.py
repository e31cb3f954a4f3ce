"""Golden outputs from an independent runtime: llama.cpp through its Python binding.

Writes, for the shipped GGUF models in $LLORCH_MODELS_DIR (default ~/.cache/llorch/models):
  reference/tokenizer_ids.json   token ids of a set of strings (Unicode, code, whitespace runs)
  reference/golden_greedy.json   greedy continuations (token ids) of a handful of prompts

Setup (once, ~20 min: llama.cpp is compiled with the host's SIMD):
  python3 -m venv reference/.venv
  CMAKE_ARGS="-DGGML_NATIVE=ON" reference/.venv/bin/pip install llama-cpp-python==0.3.36
  reference/.venv/bin/python reference/llamacpp_golden.py
The Rust tests (crates/llorch-engine/tests/parity.rs) read these files; they do not need llama.cpp.
"""
import json, os, sys
from llama_cpp import Llama

MODELS_DIR = os.environ.get("LLORCH_MODELS_DIR", os.path.expanduser("~/.cache/llorch/models"))
HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "gemma-3-270m": "gemma-3-270m-q4_k_m.gguf",
}
STRINGS = [
    "Hello, world!",
    "The capital of France is Paris.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Ünïcödé: naïve café — 東京タワー 🚀🎉 Привет мир",
    "    four spaces, then\ttab\t\tand   three\n\n\nnewlines   ",
    "Numbers 1234567 and 3.14159, dates 2024-11-21.",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "",
    " leading space and trailing space ",
    "MiXeD CaSe WORDS and don't won't I'm we'll they've",
]
PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She",
    "The three primary colors are",
    "def add(a, b):\n    return",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at a temperature of",
]
N_GEN = 32


def load(path):
    return Llama(model_path=path, n_ctx=2048, n_threads=2, n_threads_batch=2, verbose=False)


def main():
    tok_out, gen_out = {}, {}
    for name, fname in MODELS.items():
        path = os.path.join(MODELS_DIR, fname)
        if not os.path.exists(path):
            print(f"skip {name}: {path} missing", file=sys.stderr)
            continue
        llm = load(path)
        add_bos = bool(llm._model.add_bos_token())
        tok_out[name] = {
            "file": fname,
            "add_bos": add_bos,
            "cases": [{"text": s, "ids": llm.tokenize(s.encode("utf-8"), add_bos=add_bos, special=True)} for s in STRINGS],
        }
        if name == "smollm2-135m-instruct":
            cases = []
            for p in PROMPTS:
                ids = llm.tokenize(p.encode("utf-8"), add_bos=add_bos, special=True)
                llm.reset()
                out = []
                for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
                    if t == llm.token_eos() or len(out) >= N_GEN:
                        break
                    out.append(int(t))
                cases.append({"prompt": p, "prompt_ids": ids, "output_ids": out,
                              "text": llm.detokenize(out).decode("utf-8", "replace")})
                print(name, repr(p[:30]), "->", repr(cases[-1]["text"][:60]), file=sys.stderr)
            gen_out[name] = {"file": fname, "n_gen": N_GEN, "cases": cases}
        del llm
    json.dump({"runtime": "llama-cpp-python 0.3.36 (GGML_NATIVE=ON)", "models": tok_out},
              open(os.path.join(HERE, "tokenizer_ids.json"), "w"), ensure_ascii=False, indent=1)
    json.dump({"runtime": "llama-cpp-python 0.3.36 (GGML_NATIVE=ON), greedy, n_threads=2", "models": gen_out},
              open(os.path.join(HERE, "golden_greedy.json"), "w"), ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
