#!/usr/bin/env bash
# curl through Till's gateway. Needs tilld with `gateway = "127.0.0.1:8719"` (or set TILL_GATEWAY to
# its URL) and an openai service.
set -euo pipefail
G=${TILL_GATEWAY:-http://127.0.0.1:8719}

TOKEN=$(till mint openai --allow 'GET /v1/models' --uses 3)

# Where OpenAI-style clients put the key; the service comes from the token.
curl -sS -i "$G/v1/models" -H "Authorization: Bearer $TOKEN" | head -20

# The same service, named in the path.
curl -sS "$G/proxy/openai/v1/models" -H "Authorization: Bearer $TOKEN" | head -c 300; echo

# Gemini-style, with the token in ?key= (Till removes it and injects the real key its own way).
# GTOKEN=$(till mint gemini --allow 'GET /v1beta/models')
# curl -sS "$G/proxy/gemini/v1beta/models?key=$GTOKEN"

# The fourth request: 429 with {"error": {"message": "Till: this token's 3 activation(s) are all spent...", ...}}
curl -sS "$G/v1/models" -H "Authorization: Bearer $TOKEN" > /dev/null
curl -sS -i "$G/v1/models" -H "Authorization: Bearer $TOKEN"

# Health and metrics.
curl -sS "$G/healthz"
curl -sS "$G/metrics" | grep '^till_'
