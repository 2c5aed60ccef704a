#!/usr/bin/env bash
# Policy scale: for 0 / 1k / 10k / 100k keys (BENCH_POLICY_SIZES="0 1000"
# chooses), how long `tollgate policy check` takes, how long the gateway
# takes to become ready, how long the filter's on_configure compiles the
# policy inside the wasm VM, how much memory Envoy holds, and Envoy's CPU per
# request under load (wrk, 3 s) with the last key of the policy. Then, with
# the gateway still running, edits of the policy file as an operator saves
# them (write a temporary file, `mv` it over the policy): how long until the
# first request sees a revoked key refused and a new key admitted, and
# Envoy's RSS after three more edits. Only public behaviour is used (the
# file `tollgate run --policy` watches, the answers to requests), so the
# figures hold whatever carries the keys into Envoy. Prints two tables and
# the 100k-key targets.
set -euo pipefail
cd "$(dirname "$0")/.."
TOLLGATE=${TOLLGATE_BIN:-target/debug/tollgate}
SIZES=${BENCH_POLICY_SIZES:-0 1000 10000 100000}
# A change not seen by then is reported as "timeout".
CHANGE_TIMEOUT_S=30
WORK=$(mktemp -d)
pid=
envoy_pid=
stop_gateway() {
  [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
  # `tollgate run` stops its Envoy; this covers it dying before it could.
  [ -n "$envoy_pid" ] && kill "$envoy_pid" 2>/dev/null || true
  pid= envoy_pid=
}
trap 'stop_gateway; rm -rf "$WORK"' EXIT

# gen N PATH [REVOKED [NEW]]: N keys tg-scale-0..N-1; REVOKED is a comma list
# of key indexes marked revoked; NEW=1 appends the key tg-scale-new.
gen() { python3 - "$@" <<'PY'
import json, hashlib, sys
n, path = int(sys.argv[1]), sys.argv[2]
revoked = {int(i) for i in (sys.argv[3] if len(sys.argv) > 3 else "").split(",") if i}
new = len(sys.argv) > 4 and sys.argv[4] == "1"
def key(i, secret, team):
    k = {"id": f"key-{i}", "key_sha256": hashlib.sha256(secret.encode()).hexdigest(),
         "user": f"user{i}@example.com", "team": f"team-{team}", "groups": ["eng"]}
    if i in revoked:
        k["revoked"] = True
    return k
keys = [key(i, f"tg-scale-{i}", i % 50) for i in range(n)] + ([key("new", "tg-scale-new", 0)] if new else [])
json.dump({"version": 1, "defaults": {"models": ["claude-*"], "limits": {"requests_per_minute": 1000}},
           "groups": {"eng": {"models": ["claude-*"]}}, "keys": keys}, open(path, "w"))
PY
}

now() { date +%s.%N; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
rss_mb() { rss_kb "$1" | awk '{printf "%.0f", $1 / 1024}'; }
# Microseconds since the epoch without a fork (the polls below run tight).
now_us() { local t=${EPOCHREALTIME//[.,]/}; echo "$t"; }

BODY='{"model":"claude-haiku-4-5","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
cat > "$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"claude-haiku-4-5","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
wrk.headers["content-type"] = "application/json"
wrk.headers["x-api-key"] = os.getenv("BENCH_KEY")
LUA
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# edit POLICY N REVOKED NEW SEES_KEY SEES_STATUS: saves the policy with
# those keys revoked/added (atomically, as editors do), then sends requests
# with SEES_KEY back to back until one gets SEES_STATUS (a 401 must be the
# revoked refusal, README's error table). Prints the ms from just before the
# `mv` to that answer, or "timeout".
edit() {
  local policy=$1 n=$2 revoked=$3 new=$4 key=$5 want=$6 code t0 t
  gen "$n" "$policy.tmp" "$revoked" "$new" || return 1
  t0=$(now_us)
  mv "$policy.tmp" "$policy" || return 1
  while :; do
    code=$(curl -s -o "$WORK/answer" -w '%{http_code}' --max-time 5 "http://$listen/v1/messages" \
             -H "x-api-key: $key" -H 'content-type: application/json' -d "$BODY" || true)
    t=$(now_us)
    if [ "$code" = "$want" ] && { [ "$want" != 401 ] || grep -q 'this API key has been revoked' "$WORK/answer"; }; then
      echo $(((t - t0 + 500) / 1000)); return
    fi
    if ((t - t0 > CHANGE_TIMEOUT_S * 1000000)); then echo timeout; return; fi
  done
}

echo "Targets at 100,000 keys: ready <= 1.5 s, one-key revocation applied <= 1 s after saving, Envoy RSS <= 200 MB and stable across reloads"
printf '%-8s %10s %12s %12s %16s %14s %12s %14s\n' keys "file MB" "check s" "ready s" "on_configure ms" "envoy RSS MB" "request ms" "CPU us/req"
edits=()
t100=
for n in $SIZES; do
  policy="$WORK/p$n.json"; state="$WORK/s$n"
  gen "$n" "$policy"
  t0=$(now); "$TOLLGATE" policy check "$policy" > /dev/null; t1=$(now)
  "$TOLLGATE" run --policy "$policy" --upstream mock --listen 127.0.0.1:0 --admin 127.0.0.1:0 \
     --collector 127.0.0.1:0 --collector-http 127.0.0.1:0 --state-dir "$state" --envoy-log-level info \
     --concurrency 1 --mock-event-delay-ms 0 > "$WORK/run$n.log" 2>&1 &
  pid=$!
  while [ ! -f "$state/ready.json" ]; do kill -0 "$pid" || { cat "$WORK/run$n.log"; exit 1; }; sleep 0.05; done
  t2=$(now)
  envoy_pid=$(python3 -c "import json;print(json.load(open('$state/ready.json'))['envoy_pid'])")
  listen=$(python3 -c "import json;print(json.load(open('$state/ready.json'))['listen'])")
  key=$([ "$n" = 0 ] && echo tg-none || echo "tg-scale-$((n - 1))")
  req_ms=$(curl -s -o /dev/null -w '%{time_total}' "http://$listen/v1/messages" -H "x-api-key: $key" \
            -d '{"model":"claude-haiku-4-5","max_tokens":5,"messages":[]}' | awk '{printf "%.1f", $1 * 1000}')
  c0=$(cpu_ticks "$envoy_pid")
  requests=$(BENCH_KEY=$key wrk -t1 -c8 -d3s -s "$WORK/post.lua" "http://$listen/v1/messages" | awk '/requests in/ {print $1}')
  cpu_us=$(awk -v a="$c0" -v b="$(cpu_ticks "$envoy_pid")" -v n="$requests" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.1f", (b - a) / hz / n * 1e6}')
  compile_ms=$(grep -o 'compiled in [0-9]* ms' "$state/envoy.log" | awk '{print $3}' | sort -n | tail -1)
  ready_s=$(awk -v a="$t1" -v b="$t2" 'BEGIN {printf "%.2f", b - a}')
  rss_ready=$(rss_mb "$envoy_pid")
  printf '%-8s %10.1f %12.2f %12.2f %16s %14.0f %12s %14s\n' "$n" "$(stat -c %s "$policy" | awk '{print $1/1048576}')" \
     "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" "$ready_s" "${compile_ms:-?}" "$(rss_kb "$envoy_pid" | awk '{print $1/1024}')" "$req_ms" "$cpu_us"
  # The edits need the last key and three others to revoke: 4 keys.
  if [ "$n" -ge 4 ]; then
    last=$((n - 1))
    revoke_ms=$(edit "$policy" "$n" "$last" 0 "tg-scale-$last" 401)
    new_ms=$(edit "$policy" "$n" "$last" 1 tg-scale-new 200)
    # Three more edits, each revoking one more key (a change every request
    # can observe, and one a 401 answer does not meter), then Envoy's RSS
    # once it is applied and Envoy had 1 s to release the previous policy.
    revoked=$last reload_ms=() reload_rss=()
    for i in 0 1 2; do
      revoked="$revoked,$i"
      reload_ms+=("$(edit "$policy" "$n" "$revoked" 1 "tg-scale-$i" 401)")
      sleep 1
      reload_rss+=("$(rss_mb "$envoy_pid")")
    done
    edits+=("$n|$revoke_ms|$new_ms|$rss_ready|$(IFS=/; echo "${reload_rss[*]}")|$(IFS=/; echo "${reload_ms[*]}")")
    [ "$n" = 100000 ] && t100="$ready_s|$revoke_ms|$rss_ready|${reload_rss[*]}"
  fi
  stop_gateway
done

if [ ${#edits[@]} -gt 0 ]; then
  echo
  echo "Policy edits while the gateway runs (saved with mv; ms until the first request that sees the edit;"
  echo "RSS after each of 3 more edits revoking another key, read 1 s after each applied):"
  printf '%-8s %10s %11s %14s %18s %16s\n' keys "revoke ms" "new key ms" "RSS ready MB" "RSS reloads MB" "reloads ms"
  for row in "${edits[@]}"; do
    IFS='|' read -r n a b c d e <<< "$row"
    printf '%-8s %10s %11s %14s %18s %16s\n' "$n" "$a" "$b" "$c" "$d" "$e"
  done
fi

echo
echo "Targets at 100,000 keys (this run):"
if [ -z "$t100" ]; then
  echo "  not measured (BENCH_POLICY_SIZES=\"$SIZES\" has no 100000)"
  exit 0
fi
IFS='|' read -r ready revoke rss0 rss_reloads <<< "$t100"
read -r r1 r2 r3 <<< "$rss_reloads"
verdict() { if [ "$1" = 1 ]; then echo met; else echo "NOT MET"; fi; }
rss_max=$(printf '%s\n' "$rss0" "$r1" "$r2" "$r3" | sort -n | tail -1)
# Stable: a copy of the 100k policy left behind by each reload would add tens
# of MB per edit; allocator noise stays within 5% of the RSS.
growth=$((r3 - r1))
printf '  %-50s %-28s %s\n' "ready <= 1.5 s" "$ready s" "$(verdict "$(awk -v r="$ready" 'BEGIN {print (r <= 1.5)}')")"
printf '  %-50s %-28s %s\n' "one-key revocation applied <= 1 s after saving" "$revoke ms" \
  "$(verdict "$([ "$revoke" != timeout ] && [ "$revoke" -le 1000 ] && echo 1)")"
printf '  %-50s %-28s %s\n' "Envoy RSS <= 200 MB (at ready and after each edit)" "max $rss_max MB" "$(verdict "$([ "$rss_max" -le 200 ] && echo 1)")"
printf '  %-50s %-28s %s\n' "Envoy RSS stable (3rd - 1st reload <= 5% of 1st)" "$r1/$r2/$r3 MB ($(printf '%+d' "$growth") MB)" \
  "$(verdict "$([ $((growth * 20)) -le "$r1" ] && echo 1)")"
