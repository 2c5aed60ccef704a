#!/usr/bin/env bash
# The `make demo` tour: start the gateway with the example policy and the
# built-in mock provider, then show each behaviour as a command and its result.
set -euo pipefail
cd "$(dirname "$0")/.."

TOLLGATE=${TOLLGATE_BIN:-target/debug/tollgate}
LISTEN=${DEMO_LISTEN:-127.0.0.1:8080}
STATE=.tollgate/demo
GW="http://$LISTEN"
mkdir -p "$STATE"
rm -f "$STATE/ready.json"

bold() { printf '\n\033[1m%s\033[0m\n' "$*"; }
fail() { echo "demo: $*" >&2; exit 1; }

"$TOLLGATE" run --policy policies/example.json --upstream mock --listen "$LISTEN" \
  --admin 127.0.0.1:0 --collector 127.0.0.1:0 --state-dir "$STATE" --audit-flush-ms 200 &
GATEWAY=$!
trap 'kill $GATEWAY 2>/dev/null; wait $GATEWAY 2>/dev/null || true' EXIT

for _ in $(seq 1 600); do
  [ -f "$STATE/ready.json" ] && break
  kill -0 $GATEWAY 2>/dev/null || fail "the gateway did not start (see $STATE/envoy.log)"
  sleep 0.1
done
[ -f "$STATE/ready.json" ] || fail "the gateway was not ready after 60s"

# call NAME EXPECTED_STATUS curl-args...: prints the status line and the body.
call() {
  local name=$1 want=$2; shift 2
  bold "$name"
  echo "\$ curl $*" | sed "s#$GW#\$GW#"
  local out status
  out=$(curl -sS -D "$STATE/headers" "$@")
  status=$(head -1 "$STATE/headers" | tr -d '\r')
  echo "$status"
  grep -iE '^(retry-after|anthropic-ratelimit-requests-remaining|x-should-retry):' "$STATE/headers" | tr -d '\r' || true
  # Bodies compacted to one line for reading.
  echo "$out" | python3 -c 'import json,sys
t=sys.stdin.read()
try: t=json.dumps(json.loads(t))
except ValueError: pass
print(t[:300] + ("…" if len(t) > 300 else ""))' 
  [[ "$status" == *" $want "* ]] || fail "$name: expected $want, got: $status"
}

MSG='{"model":"claude-sonnet-4-5","max_tokens":256,"messages":[{"role":"user","content":"Say hello to the payments team."}]}'
call "1. Alice's virtual key, an allowed model: the provider answers" 200 \
  "$GW/v1/messages" -H "x-api-key: tg-demo-alice" -H 'content-type: application/json' -d "$MSG"

bold "2. A streamed call: events arrive one by one, usage is read from the stream"
echo "\$ curl -N \$GW/v1/messages -H 'x-api-key: tg-demo-alice' -d '{..., \"stream\": true}'"
curl -sS -N "$GW/v1/messages" -H "x-api-key: tg-demo-alice" -H 'content-type: application/json' \
  -d '{"model":"claude-sonnet-4-5","max_tokens":256,"stream":true,"messages":[{"role":"user","content":"Count to ten."}]}' \
  | grep '^event:' | sort | uniq -c

call "3. An unknown key never reaches the provider" 401 \
  "$GW/v1/messages" -H "x-api-key: tg-not-a-key" -d "$MSG"

call "4. A revoked key" 401 \
  "$GW/v1/messages" -H "x-api-key: tg-demo-revoked" -d "$MSG"

call "5. Bob (contractors group) asks for a model outside his allowlist" 403 \
  "$GW/v1/messages" -H "x-api-key: tg-demo-bob" -d "$MSG"

bold "6. The nightly agent (3 requests per minute) bursts into its limit"
for i in 1 2 3 4; do
  want=200; [ "$i" = 4 ] && want=429
  call "   request $i" $want "$GW/v1/messages" -H "x-api-key: tg-demo-agent" \
    -d '{"model":"claude-haiku-4-5","max_tokens":64,"messages":[{"role":"user","content":"triage"}]}'
done

bold "7. One audit record per request, allowed or denied"
sleep 1
echo "\$ tollgate audit tail --db $STATE/audit.db -n 10"
"$TOLLGATE" audit tail --db "$STATE/audit.db" -n 10

if [ "${DEMO_EXIT:-0}" = 1 ]; then
  bold "Demo finished."
  exit 0
fi
bold "The gateway keeps running on $GW. Try:"
cat <<TRY
  curl $GW/v1/messages -H 'x-api-key: tg-demo-alice' -d '$MSG'
  curl $GW/v1/chat/completions -H 'Authorization: Bearer tg-demo-alice' \\
       -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
  ANTHROPIC_BASE_URL=$GW ANTHROPIC_API_KEY=tg-demo-alice python3 -c 'import anthropic; ...'
  $TOLLGATE audit tail --db $STATE/audit.db --follow
Edit policies/example.json and save: the next request uses it. Ctrl-C stops everything.
TRY
wait $GATEWAY
