//! End-to-end harness: starts `tollgate run --upstream mock` (the pinned real
//! Envoy with the real tollgate.wasm, the real collector and the mock
//! provider) on free ports in a temporary directory, and stops it on drop.
//! Logs are printed only when a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod cdp;
pub mod pki;

use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use reqwest::blocking::Response;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `tollgate` binary under test.
/// Runs a command to completion and returns its output; fails the test
/// with the command's stderr unless it succeeded.
pub fn cli_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn tollgate_bin() -> PathBuf {
    artifact("TOLLGATE_BIN", "target/debug/tollgate")
}

fn artifact(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(default));
    assert!(
        path.exists(),
        "{} not found at {} — run the tests with `make test`, which builds it",
        var,
        path.display()
    );
    path
}

/// Runs the `tollgate` CLI, asserts it succeeded, and returns its stdout.
pub fn tollgate_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(tollgate_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "tollgate failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// SHA-256 hex of a virtual key, as policies store it.
pub fn sha(key: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(key.as_bytes()))
}

pub struct Gateway {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub base: String,
    pub admin: String,
    pub mock: String,
    /// The in-process collector's HTTP address (dashboard, metrics, API).
    pub collector_http: Option<String>,
    pub audit_db: PathBuf,
    pub audit_log: PathBuf,
    pub policy: PathBuf,
    http: reqwest::blocking::Client,
}

/// Options for starting a gateway.
pub struct Options {
    pub mock_event_delay_ms: u64,
    pub concurrency: u32,
    /// Send audit records to this collector instead of an in-process one.
    pub external_collector: Option<String>,
    /// Another filter build (the test-only trapping one).
    pub wasm: Option<PathBuf>,
    /// Envoy's stream idle timeout in seconds (`tollgate run`'s default when unset).
    pub stream_idle_timeout_s: Option<u64>,
    /// Share limits through this Redis (`tollgate run --redis URL`).
    pub redis: Option<String>,
    /// More `tollgate run` arguments (`--audit-log-max-bytes 4096`).
    pub extra_args: Vec<String>,
    /// Environment of `tollgate run` beside the inherited one.
    pub env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mock_event_delay_ms: 5,
            concurrency: 2,
            external_collector: None,
            wasm: None,
            stream_idle_timeout_s: None,
            redis: None,
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

impl Gateway {
    pub fn start(policy_json: &str) -> Gateway {
        Gateway::start_with(policy_json, Options::default())
    }

    /// `tollgate run` as every gateway of the tests starts it.
    fn command(policy: &Path, state: &Path, opts: &Options) -> Command {
        let mut cmd = Command::new(artifact("TOLLGATE_BIN", "target/debug/tollgate"));
        cmd.arg("run");
        if let Some(addr) = &opts.external_collector {
            cmd.arg("--external-collector").arg(addr);
        }
        if let Some(s) = opts.stream_idle_timeout_s {
            cmd.arg("--stream-idle-timeout").arg(s.to_string());
        }
        if let Some(url) = &opts.redis {
            cmd.arg("--redis").arg(url);
        }
        cmd.args(&opts.extra_args);
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        cmd.current_dir(workspace())
            .args([
                "--upstream",
                "mock",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ])
            .args([
                "--collector",
                "127.0.0.1:0",
                "--collector-http",
                "127.0.0.1:0",
                "--audit-flush-ms",
                "100",
                "--envoy-log-level",
                "info",
            ])
            .arg("--concurrency")
            .arg(opts.concurrency.to_string())
            .arg("--mock-event-delay-ms")
            .arg(opts.mock_event_delay_ms.to_string())
            .arg("--policy")
            .arg(policy)
            .arg("--state-dir")
            .arg(state)
            .arg("--wasm")
            .arg(
                opts.wasm
                    .clone()
                    .unwrap_or_else(|| artifact("TOLLGATE_WASM", "target/tollgate.wasm")),
            )
            .arg("--envoy")
            .arg(artifact("TOLLGATE_ENVOY", ".venv/bin/envoy"));
        cmd
    }

    /// Starts `tollgate run` with a policy it must refuse: waits for it to
    /// exit (at most 60 s), checks it left nothing running and no ready
    /// file, and returns its exit code and stderr.
    pub fn start_refused(policy_json: &str) -> (Option<i32>, String) {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.json");
        std::fs::write(&policy, policy_json).unwrap();
        let state = dir.path().join("state");
        let stderr = dir.path().join("tollgate.err");
        let mut child = Gateway::command(&policy, &state, &Options::default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("starting tollgate run");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("tollgate run did not exit on a refused policy");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!state.join("ready.json").exists(), "ready.json written");
        // No process of this gateway (an Envoy started while the policy was
        // checked) outlives it: each names the state directory.
        let mine = state.to_string_lossy().into_owned();
        let left: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&mine))
            .collect();
        assert!(left.is_empty(), "left running: {left:?}");
        (
            status.code(),
            std::fs::read_to_string(stderr).unwrap_or_default(),
        )
    }

    pub fn start_with(policy_json: &str, opts: Options) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.json");
        std::fs::write(&policy, policy_json).unwrap();
        let state = dir.path().join("state");
        let stdout = std::fs::File::create(dir.path().join("tollgate.out")).unwrap();
        let stderr = std::fs::File::create(dir.path().join("tollgate.err")).unwrap();
        let child = Gateway::command(&policy, &state, &opts)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("starting tollgate run");
        let mut gw = Gateway {
            child: Some(child),
            base: String::new(),
            admin: String::new(),
            mock: String::new(),
            collector_http: None,
            audit_db: state.join("audit.db"),
            audit_log: state.join("audit.jsonl"),
            policy,
            dir,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        let ready = state.join("ready.json");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    gw.base = format!("http://{}", v["listen"].as_str().unwrap());
                    gw.admin = format!("http://{}", v["admin"].as_str().unwrap());
                    gw.mock = format!("http://{}", v["mock"].as_str().unwrap());
                    gw.collector_http = v["collector_http"].as_str().map(|a| format!("http://{a}"));
                    return gw;
                }
            }
            if let Some(status) = gw.child.as_mut().unwrap().try_wait().unwrap() {
                gw.dump_logs();
                panic!("tollgate run exited early: {status}");
            }
            if Instant::now() > deadline {
                gw.dump_logs();
                panic!("gateway not ready after 90s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// POSTs JSON with the virtual key in `x-api-key` (Anthropic style).
    pub fn post(&self, path: &str, key: Option<&str>, body: &str) -> Response {
        let mut req = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        req.send().unwrap()
    }

    /// POSTs JSON with extra headers.
    pub fn post_with(&self, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
        let mut req = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string());
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        req.send().unwrap()
    }

    /// Sends `request` as raw bytes on a fresh connection, exactly as
    /// written (paths no HTTP client would send), and reads to the end:
    /// `(status, whole response text)`.
    pub fn raw(&self, request: &[u8]) -> (u16, String) {
        use std::io::Write;
        let addr = self.base.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(request).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, text)
    }

    pub fn client(&self) -> &reqwest::blocking::Client {
        &self.http
    }

    /// Every request the mock provider received.
    pub fn mock_requests(&self) -> Vec<Value> {
        self.http
            .get(format!("{}/__mock/requests", self.mock))
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    pub fn mock_violations(&self) -> Vec<Value> {
        self.http
            .get(format!("{}/__mock/violations", self.mock))
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    /// Replaces the policy file (by rename, as an editor's save would).
    pub fn write_policy(&self, json: &str) {
        let tmp = self.dir.path().join(".policy.json.tmp");
        std::fs::write(&tmp, json).unwrap();
        std::fs::rename(&tmp, &self.policy).unwrap();
    }

    /// All audit records in the collector's database (via `tollgate audit tail`).
    pub fn audit_records(&self) -> Vec<Value> {
        let out = Command::new(artifact("TOLLGATE_BIN", "target/debug/tollgate"))
            .args(["audit", "tail", "--format", "json", "-n", "100000", "--db"])
            .arg(&self.audit_db)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "audit tail failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Polls the collector until the complete record of `request_id` is stored.
    pub fn audit_record(&self, request_id: &str) -> Value {
        self.poll_record(request_id, true)
    }

    /// Polls the collector until a record of `request_id` is stored, complete
    /// or provisional (a request that never finished keeps the record
    /// published before it went upstream).
    pub fn any_audit_record(&self, request_id: &str) -> Value {
        self.poll_record(request_id, false)
    }

    fn poll_record(&self, request_id: &str, complete: bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(r) = self
                .audit_records()
                .into_iter()
                .find(|r| r["request_id"] == request_id && (!complete || r["complete"] == true))
            {
                return r;
            }
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("no audit record for request {request_id} after 15s (complete only: {complete})");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Envoy's stats from the admin interface, filtered by prefix.
    pub fn stats(&self, filter: &str) -> String {
        self.http
            .get(format!("{}/stats?filter={filter}", self.admin))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    /// The value of the filter's stat `name` (`tollgate.…`), once it
    /// satisfies `ok`. The filter hands its counts to Envoy from a timer
    /// (at least once a second), so a count lags its request: polled for up
    /// to 10 s.
    pub fn wait_for_stat(&self, name: &str, ok: impl Fn(i64) -> bool) -> i64 {
        let line = format!("wasmcustom.{name}: ");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = self.stats(name);
            let value = stats
                .lines()
                .find_map(|l| l.strip_prefix(&line)?.trim().parse().ok());
            match value {
                Some(v) if ok(v) => return v,
                _ if Instant::now() > deadline => {
                    panic!("stat {name} is {value:?} after 10s:\n{stats}")
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// A file of the gateway's state directory.
    pub fn state_file(&self, name: &str) -> PathBuf {
        self.dir.path().join("state").join(name)
    }

    pub fn log(&self, name: &str) -> String {
        let path = match name {
            "envoy" => self.dir.path().join("state/envoy.log"),
            other => self.dir.path().join(other),
        };
        std::fs::read_to_string(path).unwrap_or_default()
    }

    fn dump_logs(&self) {
        for name in ["tollgate.out", "tollgate.err", "envoy"] {
            eprintln!("----- {name} -----\n{}", self.log(name));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        self.stop();
    }
}

/// Reads a streamed body, returning each chunk with its arrival time since
/// the request was sent.
pub fn read_chunks(mut resp: Response, started: Instant) -> Vec<(Duration, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match resp.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.push((started.elapsed(), buf[..n].to_vec())),
            Err(e) => panic!("stream read failed: {e}"),
        }
    }
}

/// A policy with the given keys (`(id, virtual key, extra JSON fields)`) and
/// default limits.
pub fn policy(defaults: &str, keys: &[(&str, &str, &str)]) -> String {
    let keys: Vec<String> = keys
        .iter()
        .map(|(id, key, extra)| {
            let extra = if extra.is_empty() {
                String::new()
            } else {
                format!(", {extra}")
            };
            format!(r#"{{"id": "{id}", "key_sha256": "{}"{extra}}}"#, sha(key))
        })
        .collect();
    format!(
        r#"{{"version": 1, "defaults": {defaults}, "keys": [{}]}}"#,
        keys.join(",\n")
    )
}
