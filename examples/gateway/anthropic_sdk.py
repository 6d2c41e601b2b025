"""The Anthropic Python SDK, unchanged, with a Till token as its key.

    export ANTHROPIC_API_KEY=$(till mint anthropic --allow 'POST /v1/messages' --uses 1)
    export ANTHROPIC_BASE_URL=http://127.0.0.1:8719/proxy/anthropic
    python anthropic_sdk.py

The SDK sends the token as `x-api-key`; Till swaps in the real key and adds `anthropic-version` if the
SDK did not.
"""
import anthropic

client = anthropic.Anthropic()  # reads ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL
message = client.messages.create(
    model="claude-sonnet-4-5",
    max_tokens=100,
    messages=[{"role": "user", "content": "Say hello in five words."}],
)
print(message.content[0].text)
