"""Drives the official OpenAI Python SDK through Till's gateway (run by tests/tests/sdk.rs).

Env: TILL_BASE_URL (the gateway's /v1), TILL_TOKEN (3 activations), TILL_SPENT_TOKEN (none left).
Prints one JSON object with what the SDK returned or raised.
"""
import json
import os

import openai

base_url = os.environ["TILL_BASE_URL"]
client = openai.OpenAI(base_url=base_url, api_key=os.environ["TILL_TOKEN"], max_retries=0)
out = {}

chat = client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hi"}])
out["plain"] = chat.choices[0].message.content

stream = client.chat.completions.create(
    model="test-model", messages=[{"role": "user", "content": "hi"}], stream=True
)
out["streamed"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

spent = openai.OpenAI(base_url=base_url, api_key=os.environ["TILL_SPENT_TOKEN"], max_retries=0)
try:
    spent.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hi"}])
    out["spent"] = "no error"
except openai.RateLimitError as e:
    out["spent"] = {"class": type(e).__name__, "status": e.status_code, "message": str(e)}

print(json.dumps(out))
