"""Google's Gen AI SDK (google-genai), unchanged, with a Till token as its key.

    export GEMINI_API_KEY=$(till mint gemini --allow 'POST /v1/models/*' --uses 2)
    export GEMINI_BASE_URL=http://127.0.0.1:8719/proxy/gemini
    python gemini_sdk.py

The SDK sends its key in `x-goog-api-key`; Till takes the token from there and injects the real key
the same way. A streamed answer is one activation, like any other. (google-genai 3.x calls the `v1`
API; older releases call `v1beta`: mint `POST /v1beta/models/*` for those.)
"""
import os

from google import genai
from google.genai import errors, types

client = genai.Client(
    api_key=os.environ["GEMINI_API_KEY"],
    http_options=types.HttpOptions(base_url=os.environ["GEMINI_BASE_URL"]),
)

reply = client.models.generate_content(model="gemini-2.0-flash", contents="Say hello in five words.")
print(reply.text)

# Streaming: server-sent events pass through Till chunk by chunk; the whole stream is one activation.
for chunk in client.models.generate_content_stream(model="gemini-2.0-flash", contents="Count to five."):
    print(chunk.text, end="", flush=True)
print()

# A third request: the token's two activations are spent, and Till says so.
try:
    client.models.generate_content(model="gemini-2.0-flash", contents="One more?")
except errors.APIError as e:
    print("refused:", e.code, e.status, e.message)
