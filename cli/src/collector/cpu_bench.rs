//! CPU the collector spends per audited request, measured in process:
//! N records streamed over loopback gRPC in messages of a few entries (as
//! Envoy's buffered access logger sends them), stored in a SQLite file.
//! Not a pass/fail test (timings depend on the machine); run it alone:
//!
//! ```text
//! cargo test -p tollgate --release -- --ignored --nocapture collector_cpu_per_record
//! ```
//!
//! The figure is the collector's process CPU (user + system) from the first
//! entry received to the last row stored, divided by N. The client that
//! builds, encodes and sends the messages is this same test run again in a
//! child process, so its CPU is not counted.
//!
//! `TOLLGATE_BENCH_PREFILLED=<file>` measures on a store that already holds
//! [`PREFILLED`] older rows, as a collector does after weeks: each run
//! starts from a copy of `<file>`, which the first run fills (slowly) when
//! it does not exist. A file is made by one schema; give another binary
//! its own. The collector's start (it seeds its metrics from the whole
//! store) is left out of the figure, and said apart.

use super::store::AuditStore;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address, Address, SocketAddress};
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, LogEntries,
};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, Timestamp, UInt32Value};
use prost::Message;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tollgate_core::audit::{AuditRecord, Tokens, FILTER_STATE_KEY};

const N: usize = 50_000;
/// Rows of a pre-filled store (`TOLLGATE_BENCH_PREFILLED`).
const PREFILLED: usize = 1_000_000;
/// Entries per message: Envoy flushes its 16 KiB buffer, ~1 KiB per entry.
const PER_MESSAGE: usize = 10;

fn cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn socket(ip: &str, port: u32) -> Option<Address> {
    Some(Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    })
}

fn ms(n: i32) -> Option<PbDuration> {
    Some(PbDuration {
        seconds: 0,
        nanos: n * 1_000_000,
    })
}

/// Record `i`'s request id as Envoy makes them: a random (version 4) UUID,
/// here drawn from a hash of `i` so that runs are alike. Ids in order
/// flattered the store while its key was `request_id` alone (random ids
/// went all over that index's pages: about 4 µs more per record paced);
/// the key now leads with the start time, but the ids stay as Envoy's.
fn request_id(i: usize) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest((i as u64).to_le_bytes());
    let hex = hex::encode(h.get(..16).unwrap_or_default());
    let (a, rest) = hex.split_at(8);
    let (b, rest) = rest.split_at(4);
    let (c, rest) = rest.split_at(4);
    let (d, e) = rest.split_at(4);
    format!("{a}-{b}-4{}-{d}-{e}", c.get(1..).unwrap_or_default())
}

/// A complete record with identity, models, tokens and cost: what a
/// served request's audit record holds.
pub(super) fn record(i: usize) -> AuditRecord {
    AuditRecord {
        schema: 1,
        request_id: request_id(i),
        timestamp_ms: 1_790_000_000_000 + i as u64,
        complete: true,
        key_id: Some(format!("key-{}", i % 500)),
        user: Some(format!("user-{}", i % 300)),
        team: Some(format!("team-{}", i % 12)),
        project: Some("checkout".into()),
        app: Some("assistant".into()),
        agent: None,
        groups: vec!["engineering".into()],
        route: "anthropic.messages".into(),
        provider: "anthropic".into(),
        model_requested: Some("claude-sonnet-4-5".into()),
        model_served: Some("claude-sonnet-4-5-20250929".into()),
        stream: i.is_multiple_of(3),
        status: 200,
        tokens: Tokens {
            input_estimated: 4100,
            output_reserved: 1024,
            input: Some(4021),
            output: Some(310),
            cache_write: Some(0),
            cache_read: Some(1207),
            ..Default::default()
        },
        cost_usd: Some(0.017_124),
        latency_ms: Some(850),
        ..Default::default()
    }
}

/// One entry as Envoy sends it: connection, timing and HTTP properties
/// beside the record in the filter state.
fn entry(i: usize) -> HttpAccessLogEntry {
    let record = record(i);
    let mut common = AccessLogCommon {
        sample_rate: 1.0,
        downstream_remote_address: socket("10.0.3.17", 52_000 + (i % 1000) as u32),
        downstream_local_address: socket("10.0.0.2", 8080),
        upstream_remote_address: socket("160.79.104.10", 443),
        upstream_local_address: socket("10.0.0.2", 40_000 + (i % 1000) as u32),
        start_time: Some(Timestamp {
            seconds: 1_790_000_000 + i as i64,
            nanos: 0,
        }),
        time_to_last_rx_byte: ms(2),
        time_to_first_upstream_tx_byte: ms(3),
        time_to_last_upstream_tx_byte: ms(3),
        time_to_first_upstream_rx_byte: ms(400),
        time_to_last_upstream_rx_byte: ms(850),
        time_to_first_downstream_tx_byte: ms(401),
        time_to_last_downstream_tx_byte: ms(851),
        upstream_cluster: "anthropic".into(),
        route_name: "llm".into(),
        ..Default::default()
    };
    common.filter_state_objects.insert(
        FILTER_STATE_KEY.to_string(),
        Any {
            type_url: "type.googleapis.com/google.protobuf.BytesValue".into(),
            value: record.to_json().encode_to_vec(),
        },
    );
    HttpAccessLogEntry {
        common_properties: Some(common),
        request: Some(HttpRequestProperties {
            request_method: 3,
            scheme: "http".into(),
            authority: "gateway.internal:8080".into(),
            path: "/v1/messages".into(),
            user_agent: "anthropic-sdk-python/0.40.0".into(),
            request_id: request_id(i),
            request_headers_bytes: 412,
            request_body_bytes: 16_384,
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: 200 }),
            response_headers_bytes: 380,
            response_body_bytes: 1_024,
            response_code_details: "via_upstream".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn messages() -> Vec<StreamAccessLogsMessage> {
    (0..N)
        .collect::<Vec<_>>()
        .chunks(PER_MESSAGE)
        .map(|ids| StreamAccessLogsMessage {
            identifier: None,
            log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
                log_entry: ids.iter().map(|i| entry(*i)).collect(),
            })),
        })
        .collect()
}

/// How the messages reach the collector.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pace {
    /// All at once: the writer fills its batches.
    Burst,
    /// One message every `ms` milliseconds, as Envoy flushes under steady
    /// load: the writer stores a few records per transaction.
    Every(u64),
}

impl Pace {
    fn from_env(v: &str) -> Pace {
        match v.parse() {
            Ok(0) | Err(_) => Pace::Burst,
            Ok(ms) => Pace::Every(ms),
        }
    }

    fn to_env(self) -> String {
        match self {
            Pace::Burst => "0".into(),
            Pace::Every(ms) => ms.to_string(),
        }
    }
}

/// The client half, in a process of its own so that its CPU is not counted:
/// streams the N records to `addr` at `pace`.
async fn send(addr: &str, pace: Pace) {
    let msgs = messages();
    let mut client = AccessLogServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let sender = tokio::spawn(async move {
        let mut tick = match pace {
            Pace::Burst => None,
            Pace::Every(ms) => Some(tokio::time::interval(Duration::from_millis(ms))),
        };
        for m in msgs {
            if let Some(t) = tick.as_mut() {
                t.tick().await;
            }
            tx.send(m).await.unwrap();
        }
    });
    client
        .stream_access_logs(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    sender.await.unwrap();
}

/// The collector's process CPU per record for N records fed at `pace` by a
/// client process, and the records stored per second.
async fn measure(pace: Pace) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bench.db");
    let prefilled = match std::env::var_os("TOLLGATE_BENCH_PREFILLED") {
        Some(template) => {
            prefill(std::path::Path::new(&template));
            std::fs::copy(&template, &db).unwrap();
            // Written out now: else the first checkpoint's fsync would
            // write the whole copy, in this process's CPU time.
            std::fs::File::open(&db).unwrap().sync_all().unwrap();
            PREFILLED
        }
        None => 0,
    };
    let store = AuditStore::open(&db).unwrap();
    let started = Instant::now();
    let collector = super::tests::start(&store).await;
    let (addr, stats) = (collector.addr, collector.stats.clone());
    // The writer first seeds the usage metrics from the whole store, once
    // per start: not a cost per record, so not counted.
    while stats.usage.lock().unwrap().is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if prefilled > 0 {
        println!(
            "collector start: metrics seeded from {prefilled} rows in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    // This same test, run again as the client (see below).
    let mut client = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "--nocapture"])
        .arg(
            module_path!().trim_start_matches("tollgate::").to_string()
                + "::collector_cpu_per_record",
        )
        .env("TOLLGATE_BENCH_CLIENT", addr.to_string())
        .env("TOLLGATE_BENCH_CLIENT_PACE", pace.to_env())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The client builds its messages before connecting: count from the
    // first record received.
    while stats.received.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let (wall, before) = (Instant::now(), cpu());
    // Polled rarely: these wake-ups are CPU of this process too.
    while stats.stored.load(Ordering::Relaxed) < N as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (spent, wall) = (cpu() - before, wall.elapsed());
    assert!(client.wait().await.unwrap().success());
    collector.stop().await;
    assert_eq!(store.count().unwrap(), (prefilled + N) as u64);
    (
        spent.as_secs_f64() * 1e6 / N as f64,
        N as f64 / wall.as_secs_f64(),
    )
}

/// Makes the store at `template` with [`PREFILLED`] rows if it does not
/// exist: the benchmark's records with other random ids, in the time before
/// the measured ones.
fn prefill(template: &std::path::Path) {
    if template.exists() {
        return;
    }
    let started = Instant::now();
    let partial = template.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    let store = AuditStore::open(&partial).unwrap();
    let batch: Vec<usize> = (0..PREFILLED).collect();
    for chunk in batch.chunks(10_000) {
        let records: Vec<AuditRecord> = chunk
            .iter()
            .map(|j| {
                let mut r = record(N + j);
                r.timestamp_ms -= (N + PREFILLED) as u64;
                r
            })
            .collect();
        store.insert_batch(&records).unwrap();
    }
    drop(store);
    std::fs::rename(&partial, template).unwrap();
    eprintln!(
        "pre-filled {} with {PREFILLED} rows in {:.0?}",
        template.display(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: run alone with --nocapture"]
async fn collector_cpu_per_record() {
    if let Ok(addr) = std::env::var("TOLLGATE_BENCH_CLIENT") {
        let pace = Pace::from_env(&std::env::var("TOLLGATE_BENCH_CLIENT_PACE").unwrap());
        return send(&addr, pace).await;
    }
    let bytes = entry(0).encoded_len();
    // TOLLGATE_BENCH_RUNS=1 for a quick look; `make bench` takes the median
    // of three, with their spread.
    let runs: usize = std::env::var("TOLLGATE_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .max(1);
    for (name, pace) in [
        ("burst", Pace::Burst),
        ("paced, a message every 2 ms", Pace::Every(2)),
    ] {
        // TOLLGATE_BENCH_PACE=burst (or paced) runs one, e.g. under perf.
        if std::env::var("TOLLGATE_BENCH_PACE").is_ok_and(|p| !name.starts_with(p.as_str())) {
            continue;
        }
        let mut cpus = Vec::with_capacity(runs);
        for _ in 0..runs {
            let (cpu, rate) = measure(pace).await;
            println!(
                "collector, {name}: {N} records in messages of {PER_MESSAGE} ({bytes} bytes/entry): \
                 {cpu:.1} µs CPU/record, {rate:.0} records/s"
            );
            cpus.push(cpu);
        }
        cpus.sort_by(f64::total_cmp);
        let (median, low, high) = (cpus[cpus.len() / 2], cpus[0], cpus[cpus.len() - 1]);
        println!(
            "collector, {name}, median of {runs}: {median:.1} µs CPU/record ({low:.1}–{high:.1}); \
             target ≤ {TARGET_US} µs per audited request: {}",
            if median <= TARGET_US {
                "met"
            } else {
                "NOT met"
            }
        );
    }
}

/// Issue #14's target for the collector's CPU per audited request (µs).
const TARGET_US: f64 = 15.0;
