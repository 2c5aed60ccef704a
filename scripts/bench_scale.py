#!/usr/bin/env python3
"""make bench-scale: limits shared by several Envoy replicas through Redis.

One run, one machine, loopback. Four `tollgate run --redis URL` gateways (each
a real Envoy with tollgate.wasm, one worker, and its own collector, mock
provider and in-process quota service) share one `redis-server`; a fifth
gateway without --redis is the single-Envoy baseline. A Python client spreads
requests over the replicas. Figures (SCALEOUT.md, "What to measure"):

  1. over-admission: 4 replicas at 2x and 4x offered load, a requests/min and
     an output-tokens/min limit, against one exact token bucket replayed over
     the same arrival (and completion) times; in total and per 60-s window;
  2. a burst of 200 concurrent requests on a full bucket;
  3. latency (p50/p99, wrk at 2 connections) and Envoy CPU per request
     (/proc, wrk at 16 connections) for a warm key, a cold key (a new key per
     request from a 20,000-key policy) and a strict limit, shared vs single;
  4. Redis commands per request at steady state (INFO commandstats deltas);
  5. revocation time on every replica over 20 trials;
  6. Redis SIGKILLed for 10 s under load, per on_store_failure mode: failed
     requests, then the daily-token and USD windows in Redis against the
     audited usage in the four collectors;
  7. one of two external quota replicas (`tollgate quota`) SIGKILLed under load;
  8. 5% of Sync/Settle responses dropped and 5% duplicated by a gRPC proxy
     in this script (grpcio) in front of the quota service: Redis windows
     against the audited usage.
Then a table of the targets, each met or not.

BENCH_SCALE_RUNS (3) repeats each rate, latency and over-admission figure;
BENCH_SCALE_SECONDS (60) is the steady phase of each over-admission trace
(the load phases of the other tests scale with it, within bounds);
BENCH_SCALE_CHAOS_DROP and BENCH_SCALE_CHAOS_DUP (0.05 each) set test 8's rates.
Writes only into a temporary directory, removed at exit; every process it
started is stopped at exit. Progress goes to stderr, the report to stdout.
"""
import hashlib, heapq, http.client, json, os, random, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, threading, queue, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLLGATE = os.environ.get("TOLLGATE_BENCH_BIN", os.path.join(ROOT, "target/release/tollgate"))
ENVOY = os.environ.get("TOLLGATE_ENVOY", os.path.join(ROOT, ".venv/bin/envoy"))
WASM = os.path.join(ROOT, "target/tollgate.wasm")
RUNS = int(os.environ.get("BENCH_SCALE_RUNS", "3"))
SECONDS = int(os.environ.get("BENCH_SCALE_SECONDS", "60"))
CHAOS_DROP = float(os.environ.get("BENCH_SCALE_CHAOS_DROP", "0.05"))
CHAOS_DUP = float(os.environ.get("BENCH_SCALE_CHAOS_DUP", "0.05"))
# BENCH_SCALE_ONLY=calls,latency runs only those tests (names: over, burst,
# latency, calls, revocation, redis-killed, quota-killed, chaos), e.g. to
# look at one figure on gateways that ran nothing before it.
ONLY = {t for t in os.environ.get("BENCH_SCALE_ONLY", "").split(",") if t}


def wanted(test):
    return not ONLY or test in ONLY
REPLICAS = 4
TICK = os.sysconf("SC_CLK_TCK")
COLD_KEYS = 20_000
# The mock answers every /v1/messages request with its recorded exchange
# `messages-basic`: 61 input and 74 output tokens. Each request asks for
# max_tokens 256, so it reserves 256 output tokens and settles 182 back.
MAX_TOKENS, OUT, IN = 256, 74, 61
BODY = json.dumps({"model": "claude-haiku-4-5", "max_tokens": MAX_TOKENS,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
PRICE_IN, PRICE_OUT = 1.0, 5.0  # USD per million tokens (claude-haiku-*)

work = tempfile.mkdtemp(prefix="tollgate-bench-scale-")
procs = []          # every child we started: stopped at exit
pids = []           # Envoy pids from ready.json: killed if still alive at exit
report = []         # the report, printed at the end
verdicts = []       # (target, figure, met)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def out(line=""):
    report.append(line)


def sha(s):
    return hashlib.sha256(s.encode()).hexdigest()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def med(xs):
    xs = list(xs)
    return statistics.median(xs), max(xs) - min(xs)


def fmt(ms, digits=2):
    m, s = ms
    return f"{m:.{digits}f} ±{s:.{digits}f}"


def verdict(target, figure, met):
    verdicts.append((target, figure, "n/a" if met is None else "met" if met else "NOT met"))


# ---------------------------------------------------------------- processes

def spawn(args, logname, **kw):
    p = subprocess.Popen(args, stdout=open(os.path.join(work, logname), "w"), stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, **kw)
    procs.append(p)
    return p


def stop(p, sig=signal.SIGTERM, timeout=15):
    if p.poll() is None:
        try:
            p.send_signal(sig)
            p.wait(timeout=timeout)
        except Exception:
            p.kill()
            p.wait()


def cleanup():
    for p in reversed(procs):
        stop(p, timeout=10)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(work, ignore_errors=True)


class Redis:
    """A redis-server on a free port; redis-cli for the few commands we send."""

    def __init__(self, port=None, aof=False):
        self.port = port or free_port()
        self.dir = os.path.join(work, f"redis-{self.port}")
        os.makedirs(self.dir, exist_ok=True)
        self.start(aof)

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/"

    def start(self, aof=False):
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", self.dir,
                "--appendonly", "yes" if aof else "no"]
        if aof:
            args += ["--appendfsync", "always"]
        self.proc = spawn(args, f"redis-{self.port}.log")
        deadline = time.time() + 20
        while self.cli("PING").strip() != "PONG":
            if time.time() > deadline or self.proc.poll() is not None:
                raise SystemExit("redis-server did not start:\n" + open(os.path.join(work, f"redis-{self.port}.log")).read())
            time.sleep(0.05)

    def cli(self, *args):
        r = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True)
        return r.stdout

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def commandstats(self):
        calls = {}
        for line in self.cli("INFO", "commandstats").splitlines():
            m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line)
            if m:
                calls[m.group(1)] = int(m.group(2))
        return calls

    def hash(self, key):
        vals = self.cli("HGETALL", key).splitlines()
        return dict(zip(vals[0::2], vals[1::2]))

    def info(self, field):
        m = re.search(rf"^{field}:(\S+)", self.cli("INFO", "persistence"), re.M)
        return m.group(1) if m else None


class Gateway:
    """`tollgate run` with the mock provider: one Envoy, its collector, and
    (with --redis) its in-process quota service."""

    def __init__(self, name, policy, redis=None, quota=()):
        self.name = name
        self.state = os.path.join(work, name)
        args = [TOLLGATE, "run", "--policy", policy, "--upstream", "mock", "--listen", "127.0.0.1:0",
                "--admin", "127.0.0.1:0", "--collector", "127.0.0.1:0", "--collector-http", "127.0.0.1:0",
                "--state-dir", self.state, "--wasm", WASM, "--envoy", ENVOY, "--concurrency", "1",
                "--mock-event-delay-ms", "0", "--audit-flush-ms", "200"]
        if redis:
            args += ["--redis", redis]
        for q in quota:
            args += ["--quota", q]
        self.proc = spawn(args, f"{name}.log")
        ready = os.path.join(self.state, "ready.json")
        deadline = time.time() + 180
        while True:
            try:
                r = json.load(open(ready))
                break
            except (OSError, ValueError):
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"{name}: tollgate run failed:\n" + open(os.path.join(work, f"{name}.log")).read()[-4000:])
            time.sleep(0.1)
        self.port = int(r["listen"].rsplit(":", 1)[1])
        self.admin = int(r["admin"].rsplit(":", 1)[1])
        self.envoy_pid = r["envoy_pid"]
        self.audit_db = r["audit_db"]
        pids.append(self.envoy_pid)

    def stats(self):
        """The shared-store counters (`wasmcustom.tollgate.quota.*`)."""
        c = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=10)
        c.request("GET", "/stats?filter=tollgate.quota")
        text = c.getresponse().read().decode()
        vals = {}
        for line in text.splitlines():
            name, _, v = line.partition(": ")
            name = name.replace("wasmcustom.tollgate.quota.", "")
            if v.strip().isdigit():
                vals[name] = int(v)
            elif "P50(" in v:
                m50, m99 = re.search(r"P50\([^,]+,([^)]+)\)", v), re.search(r"P99\([^,]+,([^)]+)\)", v)
                vals[name] = (m50.group(1), m99.group(1))
        return vals

    def audit(self):
        r = subprocess.run([TOLLGATE, "audit", "tail", "--format", "json", "-n", "1000000", "--db", self.audit_db],
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"audit tail failed: {r.stderr}")
        return [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]

    def stop(self):
        stop(self.proc)
        try:
            os.kill(self.envoy_pid, signal.SIGKILL)
        except OSError:
            pass


# ---------------------------------------------------------------- policy

def key(name):
    return f"tg-bs-{name}"


def policy_json(keys):
    """keys: (id, limits or None, groups)."""
    entries = []
    for kid, limits, groups in keys:
        e = {"id": kid, "key_sha256": sha(key(kid))}
        if limits:
            e["limits"] = limits
        if groups:
            e["groups"] = groups
        entries.append(e)
    return {"version": 1, "defaults": {"models": ["claude-*"]},
            "groups": {"cold": {"limits": {"requests_per_minute": 1000, "output_tokens_per_minute": 1_000_000_000}}},
            "keys": entries, "prices": {"claude-*": {"input": PRICE_IN, "output": PRICE_OUT}}}


RPM_LIMIT = 300                 # requests per minute
TOK_LIMIT = RPM_LIMIT * OUT     # output tokens per minute: the same request rate at 1x
BURST_CAP = 100
BIG = 1_000_000_000


def failure_limits(mode, strict=False):
    def lim(n):
        return {"limit": n, "on_store_failure": mode, **({"strict": True} if strict else {})}
    return {"requests_per_minute": lim(1_000_000), "tokens_per_day": lim(BIG), "budget_usd_per_day": lim(1_000_000)}


def all_keys():
    ks = []
    for r in range(RUNS):
        for load in (2, 4):
            ks.append((f"oa-rpm{load}-r{r}", {"requests_per_minute": RPM_LIMIT}, None))
            ks.append((f"oa-tok{load}-r{r}", {"output_tokens_per_minute": TOK_LIMIT}, None))
        ks.append((f"burst-r{r}", {"requests_per_minute": BURST_CAP}, None))
    ks.append(("warm", {"requests_per_minute": BIG, "output_tokens_per_minute": BIG * 1000}, None))
    ks.append(("warm-rpm", {"requests_per_minute": BIG}, None))
    ks.append(("strict", {"requests_per_minute": {"limit": BIG, "strict": True},
                          "output_tokens_per_minute": {"limit": BIG * 1000, "strict": True}}, None))
    ks += [(f"rev-{i}", {"requests_per_minute": BIG}, None) for i in range(20)]
    ks += [(f"fail-{m}", failure_limits(m), None) for m in ("local", "closed", "open")]
    ks.append(("qk-lease", failure_limits("local"), None))
    ks.append(("qk-strict", {"requests_per_minute": {"limit": 1_000_000, "strict": True}}, None))
    ks.append(("qk-budget", {"budget_usd_per_day": {"limit": 1_000_000, "strict": True}}, None))
    ks.append(("ch-lease", {"requests_per_minute": 1_000_000, "tokens_per_day": BIG, "budget_usd_per_day": 1_000_000}, None))
    ks.append(("ch-strict", {"tokens_per_day": {"limit": BIG, "strict": True},
                             "budget_usd_per_day": {"limit": 1_000_000, "strict": True}}, None))
    ks += [(f"cold-{i}", None, ["cold"]) for i in range(COLD_KEYS)]
    return ks


# ---------------------------------------------------------------- client

def connect(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.connect()
    # http.client writes headers and body separately: without TCP_NODELAY
    # Nagle would hold the body for the headers' delayed ACK (~40 ms).
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def post(conns, port, kid, request_id=None):
    """One request on a kept-alive connection; 0 when the connection failed."""
    headers = {"content-type": "application/json", "x-api-key": key(kid)}
    if request_id:
        headers["x-request-id"] = request_id
    for attempt in (0, 1):
        try:
            c = conns.get(port) or conns.setdefault(port, connect(port))
            c.request("POST", "/v1/messages", BODY, headers)
            r = c.getresponse()
            r.read()
            if r.getheader("connection", "").lower() == "close":
                conns.pop(port, None).close()
            return r.status
        except (OSError, http.client.HTTPException):
            old = conns.pop(port, None)
            if old:
                old.close()
            if attempt:
                return 0
    return 0


def open_loop(schedule, workers=64):
    """schedule: sorted (t, port, key id, tag). Sends each at its time from a
    pool of workers (open loop: a slow answer does not delay the next
    arrival); returns (tag, key, port, sent, done, status), times in s."""
    results, jobs = [], queue.Queue()
    start = time.monotonic()

    def worker():
        conns = {}
        while True:
            job = jobs.get()
            if job is None:
                return
            _, port, kid, tag = job
            t0 = time.monotonic() - start
            status = post(conns, port, kid)
            results.append((tag, kid, port, t0, time.monotonic() - start, status))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for job in schedule:
        delay = start + job[0] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        jobs.put(job)
    for _ in threads:
        jobs.put(None)
    for t in threads:
        t.join()
    return results


def under_fault(schedule, fault):
    """Runs the schedule while `fault` (a function that sleeps, then breaks
    something) runs on a thread; returns the results and the start time."""
    t = threading.Thread(target=fault)
    t_start = time.monotonic()
    t.start()
    res = open_loop(schedule)
    t.join()
    return res, t_start


def statuses(results):
    counts = {}
    for x in results:
        counts[x[5]] = counts.get(x[5], 0) + 1
    return ", ".join(f"{c}: {n}" for c, n in sorted(counts.items()))


def poisson(rng, rate, t0, t1):
    t, out_ = t0, []
    while True:
        t += rng.expovariate(rate)
        if t >= t1:
            return out_
        out_.append(t)


# ---------------------------------------------------------------- exact buckets

def exact_requests(limit, arrivals):
    """Decisions of one exact token bucket (capacity = limit, refilled at
    limit/60 per s, continuously) for these arrival times, one unit each."""
    tokens, last, out_ = float(limit), arrivals[0] if arrivals else 0, []
    for t in arrivals:
        tokens = min(limit, tokens + (t - last) * limit / 60.0)
        last = t
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        out_.append(ok)
    return out_


def exact_tokens(limit, reqs, latency):
    """The same for an output-token bucket, as the meter does it: reserve
    max_tokens at arrival if the balance covers it, give back reserved -
    used when the request ends. reqs: (sent, done or None, used)."""
    events = []  # (time, order, kind, index)
    for i, (t, _, _) in enumerate(reqs):
        heapq.heappush(events, (t, 1, "arrive", i))
    tokens, last, out_ = float(limit), reqs[0][0] if reqs else 0, [False] * len(reqs)
    while events:
        t, _, kind, i = heapq.heappop(events)
        tokens = min(limit, tokens + (t - last) * limit / 60.0)
        last = t
        if kind == "refund":
            tokens = min(limit, tokens + MAX_TOKENS - reqs[i][2])
        elif tokens >= MAX_TOKENS:
            tokens -= MAX_TOKENS
            out_[i] = True
            done = reqs[i][1] if reqs[i][1] is not None else t + latency
            heapq.heappush(events, (done, 0, "refund", i))
    return out_


def window_extremes(times, diff, width=60.0):
    """Largest and smallest sum of diff over any window of `width` seconds:
    those that start at an arrival and those that end at one (the extremes
    of a step function are reached there). Windows reaching past either end
    of a shorter trace are its prefixes and suffixes."""
    pre = [0]
    for d in diff:
        pre.append(pre[-1] + d)
    sums = []
    j = 0
    for i, t in enumerate(times):        # [t_i, t_i + width)
        while j < len(times) and times[j] < t + width:
            j += 1
        sums.append(pre[j] - pre[i])
    i = 0
    for j, t in enumerate(times):        # (t_j - width, t_j]
        while times[i] <= t - width:
            i += 1
        sums.append(pre[j + 1] - pre[i])
    return max(sums + [0]), min(sums + [0])


# ---------------------------------------------------------------- 1. over-admission

def over_admission(gws):
    log(f"over-admission: {RUNS} runs; 4 keys at once (requests/min and output tokens/min, 2x and 4x), "
        f"3 s drain + {SECONDS} s steady each")
    rows = {}
    for r in range(RUNS):
        rng = random.Random(1000 + r)
        sched = []
        for kind in ("rpm", "tok"):
            for load in (2, 4):
                kid = f"oa-{kind}{load}-r{r}"
                rate1 = RPM_LIMIT / 60.0  # requests/s at 1x (both limits: 74 output tokens a request)
                # Drain: 1.2 capacities' worth in 3 s, so the steady phase
                # runs on an empty bucket, where replicas compete.
                n = int(1.2 * RPM_LIMIT)
                arr = [3.0 * k / n for k in range(n)] + poisson(rng, load * rate1, 3.0, 3.0 + SECONDS)
                sched += [(t, rng.choice(gws).port, kid, (kind, load)) for t in arr]
        sched.sort()
        res = open_loop(sched)
        fails = sum(1 for x in res if x[5] not in (200, 429))
        for kind in ("rpm", "tok"):
            for load in (2, 4):
                mine = sorted((x for x in res if x[0] == (kind, load)), key=lambda x: x[3])
                times = [x[3] for x in mine]
                got = [x[5] == 200 for x in mine]
                if kind == "rpm":
                    exact, limit, unit = exact_requests(RPM_LIMIT, times), RPM_LIMIT, 1
                else:
                    lat = statistics.median([x[4] - x[3] for x in mine if x[5] == 200] or [0.005])
                    exact = exact_tokens(TOK_LIMIT, [(x[3], x[4] if x[5] == 200 else None, OUT) for x in mine], lat)
                    limit, unit = TOK_LIMIT, OUT
                diff = [(int(a) - int(e)) * unit for a, e in zip(got, exact)]
                hi, lo = window_extremes(times, diff)
                row = rows.setdefault((kind, load), {"adm": [], "exact": [], "net": [], "over_w": [], "early_w": [], "n": [], "fail": []})
                row["adm"].append(sum(got))
                row["exact"].append(sum(exact))
                row["net"].append(100.0 * sum(diff) / limit)
                row["over_w"].append(100.0 * hi / limit)
                row["early_w"].append(100.0 * -lo / limit)
                row["n"].append(len(mine))
                row["fail"].append(sum(1 for x in mine if x[5] not in (200, 429)))
                log(f"  run {r + 1}: {kind} {load}x: {len(mine)} offered, admitted {sum(got)}, exact {sum(exact)}, "
                    f"worst window over {100.0 * hi / limit:+.2f}% / early {100.0 * -lo / limit:.2f}% of the limit")
        if fails:
            log(f"  run {r + 1}: {fails} requests failed (neither 200 nor 429)")
    span = 3 + SECONDS
    out(f"1. Over-admission, {REPLICAS} replicas, Poisson arrivals spread at random over them, {RUNS} runs "
        f"(a fresh key per run); each trace: {int(1.2 * RPM_LIMIT)} requests in 3 s (drains the bucket), then "
        f"{SECONDS} s at 2x or 4x the limit; the four traces run at once on four keys.")
    out(f"   Limits: requests_per_minute {RPM_LIMIT}; output_tokens_per_minute {TOK_LIMIT} (each request reserves "
        f"{MAX_TOKENS}, uses {OUT}: no settlement debt, a refund of {MAX_TOKENS - OUT}).")
    win = "60-s windows" if span > 60 else f"windows of the {span}-s trace (shorter than 60 s: its prefixes and suffixes)"
    out(f"   Exact = one token bucket replayed over the client's send (and, for tokens, completion) times. "
        f"Admitted - exact in % of the limit: net, and the worst of {win}; medians ±spread (worst run).")
    out(f"   {'limit':<22} {'load':>4} {'offered':>8} {'admitted':>9} {'exact':>7} {'net %':>16} {'worst over %':>20} {'worst early %':>20} {'failed':>6}")
    worst_over = 0.0
    for (kind, load), row in sorted(rows.items()):
        name = "requests/min" if kind == "rpm" else "output tokens/min"
        wo, we = max(row["over_w"]), max(row["early_w"])
        worst_over = max(worst_over, wo)
        out(f"   {name:<22} {load:>3}x {statistics.median(row['n']):>8.0f} {statistics.median(row['adm']):>9.0f} "
            f"{statistics.median(row['exact']):>7.0f} {fmt(med(row['net'])):>16} {fmt(med(row['over_w'])) + f' ({wo:.2f})':>20} "
            f"{fmt(med(row['early_w'])) + f' ({we:.2f})':>20} {sum(row['fail']):>6}")
    verdict("over-admission <= settlement debt (0 here) and <= 1% of the limit in any 60-s window",
            f"worst window {worst_over:+.2f}% of the limit", worst_over <= 1.0)
    out()


# ---------------------------------------------------------------- 2. burst

def burst(gws):
    log(f"burst: 200 concurrent requests on a full bucket of {BURST_CAP}, {RUNS} runs")
    # Warm every replica on each key (so each may hold a lease), then let
    # the buckets refill: 8 requests at 100/min are back in 4.8 s.
    t_start = time.monotonic()
    arrivals = {r: [] for r in range(RUNS)}
    conns = {}
    for r in range(RUNS):
        for g in gws + gws:
            arrivals[r].append(time.monotonic() - t_start)
            post(conns, g.port, f"burst-r{r}")
    time.sleep(6.0)
    rows = []
    for r in range(RUNS):
        kid = f"burst-r{r}"
        sockets = [connect(gws[i % len(gws)].port) for i in range(200)]
        barrier = threading.Barrier(200)
        got = [None] * 200

        def one(i):
            c = sockets[i]
            barrier.wait()
            t0 = time.monotonic() - t_start
            try:
                c.request("POST", "/v1/messages", BODY, {"content-type": "application/json", "x-api-key": key(kid)})
                resp = c.getresponse()
                resp.read()
                got[i] = (t0, resp.status)
            except (OSError, http.client.HTTPException):
                got[i] = (t0, 0)
            c.close()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - t0
        admitted = sum(1 for _, s in got if s == 200)
        failed = sum(1 for _, s in got if s not in (200, 429))
        times = sorted(arrivals[r] + [t for t, _ in got])
        exact = sum(exact_requests(BURST_CAP, times)[len(arrivals[r]):])
        rows.append((admitted, exact, failed, took))
        log(f"  run {r + 1}: admitted {admitted} of 200 (capacity {BURST_CAP}, exact bucket {exact}), {failed} failed, {took:.2f} s")
    out(f"2. Burst: 200 concurrent requests (50 per replica, sent together after a barrier) on a full bucket of "
        f"{BURST_CAP} (requests_per_minute {BURST_CAP}; each replica used the key twice 6 s before, so may hold a lease); {RUNS} runs.")
    out(f"   admitted per run: {', '.join(str(a) for a, _, _, _ in rows)}; exact bucket over the same times: "
        f"{', '.join(str(e) for _, e, _, _ in rows)}; failed: {sum(f for _, _, f, _ in rows)}; burst took {fmt(med(t for *_, t in rows))} s")
    worst = max(a for a, *_ in rows)
    worst_vs_exact = max(a - e for a, e, *_ in rows)
    verdict("a burst never admits more than one bucket's capacity",
            f"most admitted {worst} of capacity {BURST_CAP} (vs exact bucket: {worst_vs_exact:+d})",
            all(a <= max(BURST_CAP, e) for a, e, *_ in rows))
    out()


# ---------------------------------------------------------------- 3. latency and CPU

CASES = ("warm", "warm-rpm", "cold", "strict")

LUA = """
wrk.method = "POST"
wrk.body = io.open(os.getenv("BS_BODY"), "rb"):read("*a")
wrk.headers["content-type"] = "application/json"
local cold = tonumber(os.getenv("BS_COLD_N"))
local i = tonumber(os.getenv("BS_COLD_FROM"))
if cold > 0 then
  request = function()
    wrk.headers["x-api-key"] = "tg-bs-cold-" .. (i % cold)
    i = i + 1
    return wrk.format()
  end
else
  wrk.headers["x-api-key"] = os.getenv("BS_KEY")
end
"""


def wrk(port, kid, conns, seconds, cold_from=None):
    env = dict(os.environ, BS_BODY=os.path.join(work, "body.json"), BS_KEY=key(kid),
               BS_COLD_N=str(COLD_KEYS if cold_from is not None else 0), BS_COLD_FROM=str(cold_from or 0))
    r = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", os.path.join(work, "post.lua"),
                        f"http://127.0.0.1:{port}/v1/messages"], env=env, capture_output=True, text=True, check=True)
    text = r.stdout
    n = int(re.search(r"(\d+) requests in", text).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)

    def ms(label):
        m = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)\b", text)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
    return {"n": n, "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)), "p50": ms("50"), "p99": ms("99"),
            "bad": (int(bad.group(1)) if bad else 0) + (sum(int(x) for x in errs.groups()) if errs else 0)}


def latency_cpu(shared, single, redis):
    secs = max(2, min(4, SECONDS // 10))
    log(f"latency and CPU: warm, cold and strict keys, shared (replica 1 of {REPLICAS}) vs single Envoy; "
        f"{RUNS} runs x ({secs} s at 16 connections + {secs} s at 2)")
    res = {}
    cold_next = {"shared": 0, "single": 0}
    for case in CASES:
        for mode, gw in (("single", single), ("shared", shared)):
            # Strict means nothing without a shared store: in single mode
            # the same key is a plain local bucket.
            kid = case

            def run(conns, s):
                cf = None
                if case == "cold":
                    cf = cold_next[mode]
                r = wrk(gw.port, kid, conns, s, cf)
                if case == "cold":
                    cold_next[mode] += r["n"] + 64  # requests wrk started but did not count
                return r
            s0 = gw.stats() if mode == "shared" else {}
            run(16, 1)  # warm-up
            cpu, rcpu, rps, p50, p99, bad = [], [], [], [], [], 0
            for _ in range(RUNS):
                c0, r0 = cpu_seconds(gw.envoy_pid), cpu_seconds(redis.proc.pid)
                a = run(16, secs)
                cpu.append((cpu_seconds(gw.envoy_pid) - c0) / a["n"] * 1e6)
                rcpu.append((cpu_seconds(redis.proc.pid) - r0) / a["n"] * 1e6)
                rps.append(a["rps"])
                b = run(2, secs)
                p50.append(b["p50"])
                p99.append(b["p99"])
                bad += a["bad"] + b["bad"]
            st = gw.stats() if mode == "shared" else {}
            remote = st.get("remote_admits", 0) - s0.get("remote_admits", 0)
            res[(case, mode)] = {"cpu": med(cpu), "rcpu": med(rcpu), "rps": med(rps), "p50": med(p50), "p99": med(p99),
                                 "bad": bad, "remote": remote, "rtt": st.get("remote_admit_rtt_ms")}
            log(f"  {case:<6} {mode:<6} cpu/req {med(cpu)[0]:7.1f} us  rps {med(rps)[0]:6.0f}  p50 {med(p50)[0]:.2f} ms  "
                f"p99 {med(p99)[0]:.2f} ms  non-2xx/errors {bad}")
    if max(cold_next.values()) > COLD_KEYS:
        log(f"  note: cold keys wrapped around ({max(cold_next.values())} requests over {COLD_KEYS} keys)")
    out(f"3. Added latency and Envoy CPU per request: replica 1 of {REPLICAS} (shared, T = 100 ms) against a gateway "
        f"without --redis, same policy ({COLD_KEYS + 100:,} keys), 1 worker each, {RUNS} runs of {secs} s per cell, medians ±spread.")
    out("   warm: one key with requests/min and output tokens/min; warm-rpm: one key with requests/min only; cold: a new "
        "key for every request (both limits); strict: both limits strict (single mode: the same key, a local bucket).")
    out("   CPU and req/s at 16 connections, latency at 2 (wrk). remote admits: requests that paid a synchronous Admit.")
    out(f"   {'case':<7} {'mode':<7} {'Envoy CPU us/req':>17} {'req/s':>13} {'p50 ms':>12} {'p99 ms':>12} "
        f"{'added p50':>10} {'added p99':>10} {'CPU ratio':>9} {'Redis CPU us/req':>17} {'remote admits':>13}")
    for case in CASES:
        s, g = res[(case, "single")], res[(case, "shared")]
        for mode, v in (("single", s), ("shared", g)):
            extra = (f" {v['p50'][0] - s['p50'][0]:>+10.2f} {v['p99'][0] - s['p99'][0]:>+10.2f} {v['cpu'][0] / s['cpu'][0]:>9.2f} "
                     f"{fmt(v['rcpu'], 1):>17} {v['remote']:>13}") if mode == "shared" else ""
            out(f"   {case:<7} {mode:<7} {fmt(v['cpu'], 1):>17} {fmt(v['rps'], 0):>13} {fmt(v['p50']):>12} {fmt(v['p99']):>12}{extra}")
        if g["rtt"]:
            out(f"   {'':<7} {'':<7} remote admit round trip as the filter saw it (Envoy histogram, P50 / P99 ms): {g['rtt'][0]} / {g['rtt'][1]}")
    bad = sum(v["bad"] for v in res.values())
    if bad:
        out(f"   ({bad} responses were not 2xx or had socket errors)")
    for case in ("warm", "warm-rpm"):
        ratio = res[(case, "shared")]["cpu"][0] / res[(case, "single")]["cpu"][0]
        verdict(f"warm keys: Envoy CPU per request within 10% of single-Envoy mode ({case})", f"ratio {ratio:.2f}", ratio <= 1.10)
    added = res[("strict", "shared")]["p50"][0] - res[("strict", "single")]["p50"][0]
    verdict("strict limits: <= 1 ms added p50 on loopback", f"{added:+.2f} ms", added <= 1.0)
    out()


# ---------------------------------------------------------------- 4. Redis calls

def redis_calls(gws, redis):
    secs = max(3, min(5, SECONDS // 8))
    log(f"Redis calls per request: warm keys on all {REPLICAS} replicas at once, {RUNS} windows of {secs} s each")
    out(f"4. Redis calls per request at steady state: one key on all {REPLICAS} replicas at once (wrk, 2 connections each, "
        f"after 1 s of warm-up), {RUNS} windows of {secs} s, INFO commandstats deltas (INFO itself excluded). Scripts = "
        f"EVALSHA calls (round trips from the quota services); commands = all, those run inside scripts included.")
    for kid, desc in (("warm", "requests/min + output tokens/min"), ("warm-rpm", "requests/min only")):
        for g in gws:
            wrk(g.port, kid, 2, 1)
        rows = []
        for _ in range(RUNS):
            s0 = [g.stats() for g in gws]
            c0 = redis.commandstats()
            results = [None] * len(gws)

            def one(i):
                results[i] = wrk(gws[i].port, kid, 2, secs)
            ts = [threading.Thread(target=one, args=(i,)) for i in range(len(gws))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            c1 = redis.commandstats()
            s1 = [g.stats() for g in gws]
            n = sum(r["n"] for r in results)
            delta = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1}
            evals = sum(v for k, v in delta.items() if k.startswith("eval") or k.startswith("fcall"))
            total = sum(v for k, v in delta.items() if k != "info")
            remote = sum(s1[i].get("remote_admits", 0) - s0[i].get("remote_admits", 0) for i in range(len(gws)))
            rows.append((evals / n, total / n, n / secs, remote / n))
            log(f"  {kid}: {n} requests ({n / secs:.0f}/s): {evals} scripts ({evals / n:.4f}/req), "
                f"{total} commands ({total / n:.4f}/req), {remote} remote admits")
        out(f"   {kid:<9} ({desc}): load {fmt(med(r[2] for r in rows), 0)} req/s; scripts {fmt(med(r[0] for r in rows), 4)} "
            f"per request; commands {fmt(med(r[1] for r in rows), 3)} per request; synchronous Admits "
            f"{fmt(med(r[3] for r in rows), 3)} per request")
        calls = med(r[0] for r in rows)[0]
        verdict(f"warm keys: <= 0.05 Redis calls per request ({kid})", f"{calls:.4f} script calls/request "
                f"({med(r[1] for r in rows)[0]:.3f} commands incl. inside scripts)", calls <= 0.05)
    out()


# ---------------------------------------------------------------- 5. revocation

def revocation(gws, redis, policy_path):
    log("revocation: 20 trials on all replicas")
    copy = os.path.join(work, "security-copy.json")
    shutil.copy(policy_path, copy)  # the gateways do not watch this copy: only Redis can tell them
    conns = {}
    worst_each, cli = [], []
    for i in range(20):
        kid = f"rev-{i}"
        for g in gws:
            if post(conns, g.port, kid) != 200:
                raise SystemExit(f"revocation: {kid} refused before it was revoked")
        first401 = [None] * len(gws)
        t0 = time.monotonic()
        stop_at = t0 + 10

        def poll(j):
            c = {}
            while time.monotonic() < stop_at:
                if post(c, gws[j].port, kid) == 401:
                    first401[j] = time.monotonic() - t0
                    return
                time.sleep(0.005)
        r = subprocess.run([TOLLGATE, "key", "revoke", "--id", kid, "--policy", copy, "--redis", redis.url],
                           capture_output=True, text=True)
        cli.append(time.monotonic() - t0)
        if r.returncode:
            raise SystemExit(f"key revoke failed: {r.stderr}")
        ts = [threading.Thread(target=poll, args=(j,)) for j in range(len(gws))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if None in first401:
            worst_each.append(float("inf"))
            log(f"  trial {i + 1}: NOT refused by every replica within 10 s: {first401}")
        else:
            worst_each.append(max(first401))
    ms = sorted(1000 * w for w in worst_each)
    out(f"5. Revocation: `tollgate key revoke --id K --policy COPY --redis URL` (a copy the gateways do not watch), "
        f"then each of the {REPLICAS} replicas polled every 5 ms until its first 401; 20 trials, each key used on every replica first.")
    out(f"   time from starting the command to the last replica's first 401: median {statistics.median(ms):.0f} ms, "
        f"worst {ms[-1]:.0f} ms, best {ms[0]:.0f} ms (the command itself: median {1000 * statistics.median(cli):.0f} ms)")
    verdict("revocation <= 1 s, worst of 20", f"worst {ms[-1]:.0f} ms, median {statistics.median(ms):.0f} ms", ms[-1] <= 1000)
    out()


# ---------------------------------------------------------------- windows vs audit

def windows_vs_audit(redis, gws, kids):
    """Per key: Redis's day-token and day-USD windows (used, leased) against
    the usage audited by every collector."""
    recs = [r for g in gws for r in g.audit()]
    rows = {}
    for kid in kids:
        mine = [r for r in recs if r.get("key_id") == kid and r.get("complete")]
        tok = usd = tok_unc = usd_unc = 0
        for r in mine:
            t = r.get("tokens") or {}
            n = sum(t.get(c) or 0 for c in ("input", "output", "cache_write", "cache_read"))
            u = round((r.get("cost_usd") or 0) * 1e6)
            tok += n
            usd += u
            if r.get("reason") == "uncounted":
                tok_unc += n
                usd_unc += u
        day = redis.hash(f"tg:{{tg}}:b:key:{kid}:tokens_per_day")
        cash = redis.hash(f"tg:{{tg}}:b:key:{kid}:budget_usd_per_day")
        rows[kid] = {"records": len(mine), "tok": tok, "usd": usd, "tok_unc": tok_unc, "usd_unc": usd_unc,
                     "r_tok": int(float(day.get("u", 0))), "l_tok": int(float(day.get("l", 0))),
                     "r_usd": int(float(cash.get("u", 0))), "l_usd": int(float(cash.get("l", 0))),
                     "served": sum(1 for r in mine if r.get("status") == 200)}
    return rows


def print_windows(rows, indent="   "):
    out(f"{indent}{'key':<11} {'audited':>8} {'tokens: audit':>14} {'Redis':>10} {'diff':>7} {'leased':>7} "
        f"{'USD (micro): audit':>19} {'Redis':>9} {'diff':>6} {'uncounted tok':>14}")
    for kid, v in rows.items():
        out(f"{indent}{kid:<11} {v['records']:>8} {v['tok']:>14} {v['r_tok']:>10} {v['r_tok'] - v['tok']:>+7} {v['l_tok']:>7} "
            f"{v['usd']:>19} {v['r_usd']:>9} {v['r_usd'] - v['usd']:>+6} {v['tok_unc']:>14}")


def settle_windows(redis, gws, kids, timeout=20):
    """Waits until every admitted request is audited and the Redis windows
    stop moving (syncs and retried settlements done)."""
    last, stable_since = None, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.0)
        rows = windows_vs_audit(redis, gws, kids)
        sig = json.dumps(rows, sort_keys=True)
        if sig == last and time.monotonic() - stable_since >= 2.0:
            return rows
        if sig != last:
            last, stable_since = sig, time.monotonic()
    return windows_vs_audit(redis, gws, kids)


# ---------------------------------------------------------------- 6. Redis killed

def redis_killed(gws, redis):
    log("Redis SIGKILLed for 10 s under load (local / closed / open keys at 20 req/s each)")
    # Persistence on, every write fsynced, so the restarted Redis has every
    # acknowledged debit: what is left to check is the replicas' accounting.
    redis.cli("CONFIG", "SET", "appendfsync", "always")
    redis.cli("CONFIG", "SET", "appendonly", "yes")
    deadline = time.time() + 30
    while redis.info("aof_rewrite_in_progress") != "0" or redis.info("aof_enabled") != "1":
        if time.time() > deadline:
            raise SystemExit("redis: AOF did not start")
        time.sleep(0.1)
    before, down, after = 4.0, 10.0, 8.0
    rng = random.Random(7)
    sched = []
    for m in ("local", "closed", "open"):
        sched += [(t, rng.choice(gws).port, f"fail-{m}", m) for t in poisson(rng, 20.0, 0, before + down + after)]
    sched.sort()
    s0 = [g.stats() for g in gws]
    result = {}

    def chaos():
        time.sleep(before)
        log("  SIGKILL redis-server")
        redis.kill()
        result["killed"] = time.monotonic()
        time.sleep(down)
        redis.start(aof=True)
        result["back"] = time.monotonic()
        log("  redis-server restarted (from its AOF)")
    res, t_start = under_fault(sched, chaos)
    k, b = result["killed"] - t_start, result["back"] - t_start
    s1 = [g.stats() for g in gws]
    delta = {n: sum(s1[i].get(n, 0) - s0[i].get(n, 0) for i in range(len(gws)))
             for n in ("sync_failed", "remote_admits", "remote_admit_failed", "fallback_admits")}
    rows = settle_windows(redis, gws, [f"fail-{m}" for m in ("local", "closed", "open")])
    out(f"6. Redis SIGKILLed for 10 s under load: {REPLICAS} replicas, three keys at 20 req/s each (Poisson), "
        f"{before:.0f} s before, {down:.0f} s down, {after:.0f} s after; each key's three limits (requests/min, tokens/day, "
        f"USD/day) set to its on_store_failure. Redis runs with appendfsync always and restarts from its AOF.")
    out(f"   {'mode':<7} {'requests':>8} {'failed':>7} {'failed while down':>18} {'after restart':>14} {'statuses':<40}")
    failed = {}
    for m in ("local", "closed", "open"):
        mine = [x for x in res if x[0] == m]
        bad = [x for x in mine if x[5] not in (200, 429)]
        failed[m] = len(bad)
        out(f"   {m:<7} {len(mine):>8} {len(bad):>7} {sum(1 for x in bad if k <= x[3] < b):>18} "
            f"{sum(1 for x in bad if x[3] >= b):>14} {statuses(mine):<40}")
    out(f"   Envoy counters over the test (all replicas): " + ", ".join(f"{n} {v}" for n, v in delta.items()))
    out("   After recovery (load stopped, windows stable for 2 s): day windows in Redis ('u' used; 'l' leased, "
        "not used) against the usage audited by the four collectors")
    print_windows(rows)
    out("   (open: requests admitted while Redis was down are audited `uncounted` and by design never reach Redis)")
    def gap(m):
        v = rows[f"fail-{m}"]
        return v["r_tok"] - v["tok"] + v["tok_unc"], v["r_usd"] - v["usd"] + v["usd_unc"]
    verdict("Redis killed 10 s: 0 failed requests under `local`", f"{failed['local']} failed", failed["local"] == 0)
    diffs = ", ".join(f"{m} {rows[f'fail-{m}']['r_tok'] - rows[f'fail-{m}']['tok']:+d} tok / "
                      f"{rows[f'fail-{m}']['r_usd'] - rows[f'fail-{m}']['usd']:+d} micro-USD" for m in ("local", "closed", "open"))
    verdict("Redis killed 10 s: day/USD windows equal audited usage after recovery (open: minus uncounted)",
            diffs, all(gap(m) == (0, 0) for m in ("local", "closed", "open")))
    redis.cli("CONFIG", "SET", "appendonly", "no")
    out()


# ---------------------------------------------------------------- 7. quota replica killed

def quota_killed(policy_path, redis):
    log("quota replica killed: two `tollgate quota` replicas, two gateways with --quota A --quota B")
    qs = []
    for i in range(2):
        port = free_port()
        p = spawn([TOLLGATE, "quota", "--redis", redis.url, "--listen", f"127.0.0.1:{port}",
                   "--redis-log", os.path.join(work, f"quota-{i}-redis.log")], f"quota-{i}.log")
        wait_port(port, p, f"quota-{i}.log")
        qs.append((p, port))
    gws = [Gateway(f"qk-{i}", policy_path, quota=[f"127.0.0.1:{port}" for _, port in qs]) for i in range(2)]
    for g in gws:
        for kid in ("qk-lease", "qk-strict", "qk-budget"):
            post({}, g.port, kid)
    before, after = 4.0, 8.0
    rng = random.Random(11)
    sched = []
    for kid in ("qk-lease", "qk-strict", "qk-budget"):
        sched += [(t, rng.choice(gws).port, kid, kid) for t in poisson(rng, 20.0, 0, before + after)]
    sched.sort()
    s0 = [g.stats() for g in gws]
    result = {}

    def kill():
        time.sleep(before)
        result["at"] = time.monotonic()
        qs[0][0].send_signal(signal.SIGKILL)
        qs[0][0].wait()
        log("  SIGKILL quota replica A")
    res, t_start = under_fault(sched, kill)
    k = result["at"] - t_start
    s1 = [g.stats() for g in gws]
    delta = {n: sum(s1[i].get(n, 0) - s0[i].get(n, 0) for i in range(len(gws)))
             for n in ("sync_ok", "sync_failed", "remote_admits", "remote_admit_failed", "fallback_admits")}
    out(f"7. One quota service killed: with `tollgate run --redis` the quota service runs inside each gateway's process, "
        f"so it cannot be killed alone. Instead: two `tollgate quota --redis URL` replicas, two gateways with "
        f"`--quota A --quota B`; replica A SIGKILLed after {before:.0f} s, {after:.0f} s more; three keys at 20 req/s each.")
    out(f"   {'key':<10} {'limits':<48} {'requests':>8} {'failed':>7} {'after kill':>10}  statuses")
    desc = {"qk-lease": "rpm, tokens/day, USD/day, leased, local", "qk-strict": "rpm strict (local on failure)",
            "qk-budget": "USD/day strict (closed on failure)"}
    failed = failed_closed = 0
    for kid in ("qk-lease", "qk-strict", "qk-budget"):
        mine = [x for x in res if x[0] == kid]
        bad = [x for x in mine if x[5] not in (200, 429)]
        failed += len(bad)
        failed_closed += len(bad) if kid == "qk-budget" else 0
        out(f"   {kid:<10} {desc[kid]:<48} {len(mine):>8} {len(bad):>7} {sum(1 for x in bad if x[3] >= k):>10}  "
            + statuses(mine))
    out("   Envoy counters over the test (both gateways): " + ", ".join(f"{n} {v}" for n, v in delta.items()))
    verdict("(no target) one of two quota replicas killed: failed requests; the design says a few calls at most",
            f"{failed} failed, all on the closed budget" if failed == failed_closed else f"{failed} failed", None)
    for g in gws:
        g.stop()
    out()
    return qs[1]


def wait_port(port, proc, logname, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} not listening:\n" + open(os.path.join(work, logname)).read())


# ---------------------------------------------------------------- 8. dropped / duplicated

def pb_fields(b):
    """Protocol Buffers wire format, one level: [(field number, value)]
    (varints as ints, length-delimited as bytes). Enough to read the
    quota calls without generated code."""
    def varint(i):
        r = shift = 0
        while True:
            x = b[i]
            i += 1
            r |= (x & 0x7F) << shift
            shift += 7
            if x < 0x80:
                return r, i
    i, fields = 0, []
    while i < len(b):
        k, i = varint(i)
        f, t = k >> 3, k & 7
        if t == 0:
            v, i = varint(i)
        elif t == 2:
            n, i = varint(i)
            v, i = b[i:i + n], i + n
        else:
            n = 8 if t == 1 else 4
            v, i = b[i:i + n], i + n
        fields.append((f, v))
    return fields


def zigzag(v):
    return (v >> 1) ^ -(v & 1)


def ledger_add(ledger, name, req, resp):
    """What the filters sent and the quota service applied, per bucket id
    (quota.proto): Admit charges when ADMITTED (first answer per request
    id), Settle deltas when applied, Sync consumption once per (replica,
    bucket, seq)."""
    f = pb_fields(req)
    answer = dict(pb_fields(resp))

    def bucket_id(msg):
        return dict(pb_fields(dict(pb_fields(msg))[1]))[1].decode()
    if name in ("Admit", "Settle"):
        rid = dict(f).get(1, b"").decode()
        if answer.get(1, 0) != 1 or (name, rid) in ledger["seen"]:
            return
        ledger["seen"].add((name, rid))
        for field, v in f:
            if field == 2:
                ledger["sent"][bucket_id(v)] = ledger["sent"].get(bucket_id(v), 0) + zigzag(dict(pb_fields(v)).get(2, 0))
    elif name == "Sync":
        replica = dict(f).get(1, b"").decode()
        for field, v in f:
            if field == 2:
                d = dict(pb_fields(v))
                seen = (replica, bucket_id(v), d.get(2, 0))
                if seen not in ledger["seen"]:
                    ledger["seen"].add(seen)
                    ledger["sent"][seen[1]] = ledger["sent"].get(seen[1], 0) + zigzag(d.get(3, 0))


def chaos_proxy(listen, upstream, drop, dup, counts, ledger):
    """A gRPC proxy (raw bytes, any method) in front of a quota service.
    For Sync and Settle: with probability `drop` the call is forwarded and
    applied but its answer is replaced by UNAVAILABLE (a lost response); with
    probability `dup` the call is applied twice (the client gets the second,
    replayed answer) and a third copy arrives 150 ms later (a late
    duplicate, typically after the next sequence number)."""
    import grpc
    from concurrent import futures
    channel = grpc.insecure_channel(upstream)
    rng = random.Random(42)
    lock = threading.Lock()

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            method = details.method
            name = method.rsplit("/", 1)[-1]
            call = channel.unary_unary(method)

            def late(req):
                try:
                    call(req, timeout=5)
                except grpc.RpcError:
                    pass

            def handle(req, ctx):
                with lock:
                    roll = rng.random()
                    counts[name] = counts.get(name, 0) + 1
                try:
                    resp = call(req, timeout=5)
                except grpc.RpcError as e:
                    ctx.abort(e.code(), e.details() or "upstream failed")
                with lock:
                    ledger_add(ledger, name, req, resp)
                if name in ("Sync", "Settle"):
                    if roll < drop:
                        with lock:
                            counts[f"{name} dropped"] = counts.get(f"{name} dropped", 0) + 1
                        ctx.abort(grpc.StatusCode.UNAVAILABLE, "bench chaos: response dropped")
                    elif roll < drop + dup:
                        with lock:
                            counts[f"{name} duplicated"] = counts.get(f"{name} duplicated", 0) + 1
                        try:
                            resp = call(req, timeout=5)
                        except grpc.RpcError as e:
                            ctx.abort(e.code(), e.details() or "upstream failed")
                        threading.Timer(0.15, late, args=(req,)).start()
                return resp
            return grpc.unary_unary_rpc_method_handler(handle)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((Handler(),))
    server.add_insecure_port(listen)
    server.start()
    return server


def dropped_duplicated(policy_path, redis, quota):
    try:
        import grpc  # noqa: F401
    except ImportError:
        out("8. Dropped/duplicated responses: skipped (no grpcio; `make bench-scale` installs it into .venv)")
        verdict("5% of sync/settle responses dropped or duplicated: Redis totals equal audit totals", "not run", False)
        return
    log("dropped/duplicated Sync and Settle responses: gRPC proxy in front of one quota replica, two gateways")
    port = free_port()
    counts, ledger = {}, {"seen": set(), "sent": {}}
    server = chaos_proxy(f"127.0.0.1:{port}", f"127.0.0.1:{quota[1]}", CHAOS_DROP, CHAOS_DUP, counts, ledger)
    try:
        gws = [Gateway(f"ch-{i}", policy_path, quota=[f"127.0.0.1:{port}"]) for i in range(2)]
        secs = max(8, min(20, SECONDS // 2))
        rng = random.Random(13)
        sched = []
        for kid in ("ch-lease", "ch-strict"):
            sched += [(t, rng.choice(gws).port, kid, kid) for t in poisson(rng, 25.0, 0, secs)]
        sched.sort()
        res = open_loop(sched)
        rows = settle_windows(redis, gws, ["ch-lease", "ch-strict"])
        stats = [g.stats() for g in gws]
        for g in gws:
            g.stop()
    finally:
        server.stop(0)
    failed = sum(1 for x in res if x[5] not in (200, 429))
    out(f"8. {100 * CHAOS_DROP:.0f}% of Sync and Settle responses dropped and {100 * CHAOS_DUP:.0f}% duplicated, by a gRPC proxy in this script (grpcio) between "
        f"two gateways (--quota PROXY) and one `tollgate quota`: a dropped call is applied but answered UNAVAILABLE; "
        f"a duplicated one is applied twice (the second, replayed answer returned) and a third copy sent 150 ms later.")
    out(f"   {len(res)} requests in {secs} s on two keys (ch-lease: leased tokens/day and USD/day; ch-strict: both strict, "
        f"one Admit and one Settle per request), {failed} failed; proxy: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    out("   Envoy counters: " + ", ".join(f"{n} {sum(s.get(n, 0) for s in stats)}" for n in
                                      ("sync_ok", "sync_failed", "remote_admits", "remote_admit_failed", "fallback_admits")))
    print_windows(rows)
    out("   What the filters sent, decoded at the proxy (Admit charges admitted + Settle deltas applied + Sync "
        "consumption once per replica, bucket and seq), against Redis:")
    for kid, v in rows.items():
        tok, usd = ledger["sent"].get(f"key:{kid}:tokens_per_day", 0), ledger["sent"].get(f"key:{kid}:budget_usd_per_day", 0)
        out(f"   {kid:<11} tokens sent {tok} (Redis {v['r_tok'] - tok:+d}, audit {v['tok'] - tok:+d}); micro-USD sent {usd} "
            f"(Redis {v['r_usd'] - usd:+d}, audit {v['usd'] - usd:+d})")
    equal = all(v["r_tok"] == v["tok"] and v["r_usd"] == v["usd"] for v in rows.values())
    verdict(f"{100 * CHAOS_DROP:.0f}% of sync/settle responses dropped + {100 * CHAOS_DUP:.0f}% duplicated: "
            f"Redis totals equal audit totals exactly",
            ", ".join(f"{k} {v['r_tok'] - v['tok']:+d} tok / {v['r_usd'] - v['usd']:+d} micro-USD" for k, v in rows.items()),
            equal)
    out()


# ---------------------------------------------------------------- main

def main():
    for path, what in ((TOLLGATE, "release tollgate"), (ENVOY, "envoy"), (WASM, "tollgate.wasm")):
        if not os.path.exists(path):
            raise SystemExit(f"{what} missing at {path}: run `make bench-scale`")
    t_all = time.monotonic()
    log(f"bench-scale: working in {work}; {RUNS} runs, steady phase {SECONDS} s")
    open(os.path.join(work, "post.lua"), "w").write(LUA)
    open(os.path.join(work, "body.json"), "wb").write(BODY)
    pol = os.path.join(work, "policy.json")
    json.dump(policy_json(all_keys()), open(pol, "w"))
    redis = Redis()
    log(f"redis-server on {redis.port}; starting {REPLICAS} shared gateways and one single")
    gws = []
    for i in range(REPLICAS):
        gws.append(Gateway(f"replica-{i + 1}", pol, redis=redis.url))
        log(f"  replica-{i + 1} ready (listen {gws[-1].port}, Envoy pid {gws[-1].envoy_pid})")
    single = Gateway("single", pol)
    log(f"  single ready (listen {single.port})")
    envoy_version = subprocess.run([ENVOY, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"/(\d+\.\d+\.\d+)/", envoy_version)
    out(f"Shared limits: {REPLICAS} Envoy replicas ({m.group(1) if m else '?'}, 1 worker each, tollgate.wasm "
        f"{os.path.getsize(WASM):,} bytes) on one redis-server "
        f"({subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split()[2]}), "
        f"loopback, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; "
        f"sync period 100 ms; {RUNS} runs per figure; medians ±spread (max - min).")
    out()
    if wanted("over"):
        over_admission(gws)
    if wanted("burst"):
        burst(gws)
    if wanted("latency"):
        latency_cpu(gws[0], single, redis)
    if wanted("calls"):
        redis_calls(gws, redis)
    if wanted("revocation"):
        revocation(gws, redis, pol)
    if wanted("redis-killed"):
        redis_killed(gws, redis)
    single.stop()
    for g in gws:
        g.stop()
    q = quota_killed(pol, redis) if wanted("quota-killed") or wanted("chaos") else None
    if wanted("chaos"):
        dropped_duplicated(pol, redis, q)
    out("Targets:")
    w = max(len(t) for t, _, _ in verdicts)
    for t, fig, v in verdicts:
        out(f"  {v:<8} {t:<{w}}  {fig}")
    out()
    out(f"(whole run {time.monotonic() - t_all:.0f} s; load average {os.getloadavg()[0]:.1f} at the end)")
    print("\n".join(report), flush=True)


def on_signal(sig, _frame):
    raise SystemExit(f"bench-scale: stopped by signal {sig}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        main()
    except BaseException:
        if report:
            print("\n".join(report + ["(incomplete: the run stopped here)"]), flush=True)
        raise
    finally:
        cleanup()
