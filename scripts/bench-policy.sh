#!/usr/bin/env bash
# Policy scale: for 1k / 10k / 100k keys, how long `tollgate policy check`
# takes, how long the gateway takes to become ready, how long the filter's
# on_configure compiles the policy inside the wasm VM, and how much memory
# Envoy holds compared with an empty policy, and Envoy's CPU per request
# under load (wrk, 3 s) with the last key of the policy. Prints one table.
set -euo pipefail
cd "$(dirname "$0")/.."
TOLLGATE=${TOLLGATE_BIN:-target/debug/tollgate}
WORK=$(mktemp -d)
trap 'pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT

gen() { python3 - "$1" "$2" <<'PY'
import json, hashlib, sys
n, path = int(sys.argv[1]), sys.argv[2]
keys = [{"id": f"key-{i}", "key_sha256": hashlib.sha256(f"tg-scale-{i}".encode()).hexdigest(),
         "user": f"user{i}@example.com", "team": f"team-{i % 50}", "groups": ["eng"]} for i in range(n)]
json.dump({"version": 1, "defaults": {"models": ["claude-*"], "limits": {"requests_per_minute": 1000}},
           "groups": {"eng": {"models": ["claude-*"]}}, "keys": keys}, open(path, "w"))
PY
}

now() { date +%s.%N; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

cat > "$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"claude-haiku-4-5","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
wrk.headers["content-type"] = "application/json"
wrk.headers["x-api-key"] = os.getenv("BENCH_KEY")
LUA
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

printf '%-8s %10s %12s %12s %16s %14s %12s %14s\n' keys "file MB" "check s" "ready s" "on_configure ms" "envoy RSS MB" "request ms" "CPU us/req"
for n in 0 1000 10000 100000; do
  policy="$WORK/p$n.json"; state="$WORK/s$n"
  gen "$n" "$policy"
  t0=$(now); "$TOLLGATE" policy check "$policy" > /dev/null; t1=$(now)
  "$TOLLGATE" run --policy "$policy" --upstream mock --listen 127.0.0.1:0 --admin 127.0.0.1:0 \
     --collector 127.0.0.1:0 --collector-http 127.0.0.1:0 --state-dir "$state" --envoy-log-level info \
     --concurrency 1 --mock-event-delay-ms 0 > "$WORK/run$n.log" 2>&1 &
  pid=$!
  while [ ! -f "$state/ready.json" ]; do kill -0 $pid || { cat "$WORK/run$n.log"; exit 1; }; sleep 0.05; done
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
  printf '%-8s %10.1f %12.2f %12.2f %16s %14.0f %12s %14s\n' "$n" "$(stat -c %s "$policy" | awk '{print $1/1048576}')" \
     "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" "$(awk -v a="$t1" -v b="$t2" 'BEGIN {print b - a}')" "${compile_ms:-?}" "$(rss_kb "$envoy_pid" | awk '{print $1/1024}')" "$req_ms" "$cpu_us"
  kill $pid; wait $pid 2>/dev/null || true
done
