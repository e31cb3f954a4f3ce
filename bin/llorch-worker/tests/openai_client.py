"""Drives a llorch worker (or pool-managerd) with the official `openai` client.
Usage: python openai_client.py http://127.0.0.1:PORT/v1"""
import sys

from openai import OpenAI, BadRequestError

client = OpenAI(base_url=sys.argv[1], api_key="unused")
model = client.models.list().data[0].id
msgs = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"}]

r = client.chat.completions.create(model=model, messages=msgs, max_tokens=40, temperature=0)
text = r.choices[0].message.content
assert "Paris" in text, text
assert r.choices[0].finish_reason == "stop"
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
print("chat:", text)

parts = []
for chunk in client.chat.completions.create(model=model, messages=msgs, max_tokens=40, temperature=0, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
assert "".join(parts) == text, ("".join(parts), text)
print("chat stream: ok")

r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
ctext = r.choices[0].text
assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
parts = [c.choices[0].text for c in client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if c.choices]
assert "".join(parts) == ctext
print("completion:", repr(ctext))

try:
    client.completions.create(model=model, prompt="x", max_tokens=-1)
    raise SystemExit("expected a 400")
except BadRequestError as e:
    assert e.status_code == 400 and "max_tokens" in str(e)
print("ALL OK")
