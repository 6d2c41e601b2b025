"""The OpenAI Python SDK, unchanged, with a Till token as its key.

    export OPENAI_API_KEY=$(till mint openai --allow 'POST /v1/chat/completions' --uses 2)
    export OPENAI_BASE_URL=http://127.0.0.1:8719/v1
    python openai_sdk.py
"""
import openai

client = openai.OpenAI()  # reads OPENAI_API_KEY and OPENAI_BASE_URL

reply = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello in five words."}]
)
print(reply.choices[0].message.content)

# Streaming: server-sent events pass through Till chunk by chunk; the whole stream is one activation.
for chunk in client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "Count to five."}], stream=True
):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()

# A third call would exceed the token's 2 activations: openai.RateLimitError, with Till's reason.
try:
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
except openai.RateLimitError as e:
    print("refused:", e)
