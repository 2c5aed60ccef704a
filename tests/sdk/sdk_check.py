"""Drive the gateway with the official Anthropic and OpenAI SDKs.

Run by tests/e2e/metering.rs with GATEWAY set; the keys match the policy that
test writes. Each check prints one line "ok <name>: <detail>"; the first
failed expectation raises, and the process exits non-zero.
"""
import os
import time

import anthropic
import openai

GW = os.environ["GATEWAY"]


def ok(name, detail=""):
    print(f"ok {name}: {detail}", flush=True)


def expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


a = anthropic.Anthropic(base_url=GW, api_key="tg-sdk-main", max_retries=0)
o = openai.OpenAI(base_url=GW + "/v1", api_key="tg-sdk-main", max_retries=0)

# Allowed call; rate-limit headers count down.
raw = a.messages.with_raw_response.create(
    model="claude-sonnet-4-5", max_tokens=200, messages=[{"role": "user", "content": "hi"}])
first = int(raw.headers["anthropic-ratelimit-requests-remaining"])
msg = raw.parse()
expect(msg.usage.output_tokens == 74, f"usage {msg.usage}")
raw = a.messages.with_raw_response.create(
    model="claude-sonnet-4-5", max_tokens=200, messages=[{"role": "user", "content": "hi"}])
second = int(raw.headers["anthropic-ratelimit-requests-remaining"])
expect(second == first - 1, f"requests remaining {first} then {second}")
out_remaining = int(raw.headers["anthropic-ratelimit-output-tokens-remaining"])
ok("anthropic.messages", f"output_tokens=74 requests-remaining {first}->{second} output-tokens-remaining {out_remaining}")

# Streaming through the SDK's helper; usage comes from the stream.
with a.messages.stream(model="claude-sonnet-4-5", max_tokens=300,
                       messages=[{"role": "user", "content": "story"}]) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
expect(final.usage.output_tokens == 118 and len(text) > 100, f"stream usage {final.usage}")
ok("anthropic.stream", f"{len(text)} chars, output_tokens={final.usage.output_tokens}")

# Errors arrive as the SDK's own exception types with Anthropic-shaped bodies.
try:
    anthropic.Anthropic(base_url=GW, api_key="tg-sdk-nope", max_retries=0).messages.create(
        model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    raise AssertionError("unknown key accepted")
except anthropic.AuthenticationError as e:
    expect(e.body["error"]["type"] == "authentication_error", e.body)
    ok("anthropic.AuthenticationError", e.body["error"]["message"])
try:
    a.messages.create(model="claude-opus-4-1", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    raise AssertionError("model outside allowlist accepted")
except anthropic.PermissionDeniedError as e:
    expect("not allowed for this key" in e.body["error"]["message"], e.body)
    ok("anthropic.PermissionDeniedError", e.body["error"]["message"])
limited = anthropic.Anthropic(base_url=GW, api_key="tg-sdk-limited", max_retries=0)
for _ in range(2):
    limited.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}])
try:
    limited.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    raise AssertionError("third request within the minute accepted")
except anthropic.RateLimitError as e:
    expect(e.body["error"]["type"] == "rate_limit_error", e.body)
    expect(int(e.response.headers["retry-after"]) > 0, e.response.headers)
    ok("anthropic.RateLimitError", e.body["error"]["message"])

# A spent budget stops the SDK: x-should-retry: false, so even with retries
# enabled it does not wait out retry-after.
budget = anthropic.Anthropic(base_url=GW, api_key="tg-sdk-budget", max_retries=3)
budget.messages.create(model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "x"}])
started = time.time()
try:
    budget.messages.create(model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "x"}])
    raise AssertionError("request past the budget accepted")
except anthropic.RateLimitError as e:
    expect(e.response.headers.get("x-should-retry") == "false", e.response.headers)
    expect(time.time() - started < 2, "the SDK retried a spent budget")
    ok("anthropic.budget", e.body["error"]["message"])

# OpenAI SDK: JSON, a stream whose client did not ask for usage (no usage
# chunk may reach it, yet the gateway charges usage), and errors.
c = o.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
expect(c.usage.completion_tokens == 69, f"usage {c.usage}")
ok("openai.chat", f"completion_tokens={c.usage.completion_tokens}")
chunks = list(o.chat.completions.create(model="gpt-4o-mini", stream=True,
                                        messages=[{"role": "user", "content": "story"}]))
expect(all(ch.choices for ch in chunks), "a usage-only chunk reached a client that did not ask for it")
expect(all(ch.usage is None for ch in chunks), "usage reached a client that did not ask for it")
ok("openai.stream", f"{len(chunks)} chunks, none usage-only")
r = o.responses.create(model="gpt-4o", input="hi")
expect(r.usage.output_tokens == 71, f"usage {r.usage}")
ok("openai.responses", f"output_tokens={r.usage.output_tokens}")
try:
    openai.OpenAI(base_url=GW + "/v1", api_key="tg-sdk-nope", max_retries=0).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("unknown key accepted")
except openai.AuthenticationError as e:
    expect(e.code == "invalid_api_key", e.body)
    ok("openai.AuthenticationError", e.message)
try:
    o.chat.completions.create(model="o3-pro", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("model outside allowlist accepted")
except openai.PermissionDeniedError as e:
    expect(e.code == "model_not_allowed", e.body)
    ok("openai.PermissionDeniedError", e.message)
ol = openai.OpenAI(base_url=GW + "/v1", api_key="tg-sdk-limited", max_retries=0)
try:
    ol.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("limited key accepted after its minute was spent")
except openai.RateLimitError as e:
    expect(e.code == "rate_limit_exceeded", e.body)
    ok("openai.RateLimitError", e.message)
print("all sdk checks passed")
