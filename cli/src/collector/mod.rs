//! The audit collector: Envoy's gRPC AccessLogService. Envoy streams batches
//! of access-log entries and expects no answer (the protocol is lossy by
//! design), so the service never blocks the stream on the database: entries
//! go into a bounded queue drained by one writer that inserts in batches.
//! A full queue drops the entry and counts it; the file access log keeps the
//! durable copy.

pub mod alerts;
pub mod auth;
pub mod burndown;
pub mod drilldown;
pub mod filter;
pub mod gaps;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod report;
pub mod retention;
pub mod series;
pub mod sheet;
pub mod store;
pub mod wire;

#[cfg(test)]
mod cpu_bench;
#[cfg(test)]
mod disk_bench;

use anyhow::Result;
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsResponse;
use envoy_types::pb::google::protobuf::Any;
use futures_util::FutureExt;
use prost::Message;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{AuditStore, Stored};
use tokio::sync::{mpsc, watch};
use tollgate_core::audit::{AuditRecord, Outcome, Reason, FILTER_STATE_KEY};

/// Records waiting for the writer; past this, new ones are dropped (counted).
pub const QUEUE_CAPACITY: usize = 65_536;
/// Records per transaction at most.
const BATCH: usize = 512;
/// How long the writer waits for more records before committing a short
/// batch. A commit costs about the same for one record as for hundreds (the
/// touched pages appended to SQLite's WAL, one round trip to PostgreSQL),
/// and Envoy sends a message per flush of its buffer: gathering what arrives
/// within a few milliseconds into one transaction divides that cost under
/// steady load, and delays a record by far less than Envoy's own flush
/// interval already does.
const LINGER: Duration = Duration::from_millis(50);

/// The HTTP/2 flow-control window of each access-log stream and of the
/// connection, in bytes.
const WINDOW: u32 = 1 << 20;

/// Counters of what the collector saw, for metrics and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub stored: AtomicU64,
    /// Entries without Tollgate's filter state (another filter's traffic).
    pub without_record: AtomicU64,
    pub invalid: AtomicU64,
    pub dropped: AtomicU64,
    /// Usage counters behind `/metrics`; `None` until seeded from the store
    /// (the writer does that before storing its first batch).
    pub usage: Mutex<Option<metrics::Usage>>,
    /// Missing audit records per Envoy, most first, as last computed from
    /// the store ([`maintain`]); `None` before the first computation.
    pub missing: Mutex<Option<Vec<(String, u64)>>>,
    /// Budget and quota alerts (counting only once a policy is set).
    pub alerts: alerts::Alerts,
}

/// How far back the missing-records gauge looks, and how often it is
/// computed again from the store (one indexed pass over the window).
pub const GAPS_WINDOW: Duration = Duration::from_secs(7 * 86_400);
pub const GAPS_EVERY: Duration = Duration::from_secs(60);
/// How long after the request that follows a gap the gap counts: until
/// then the missing request may still be streaming (Envoy logs a request's
/// record when it ends).
pub const GAPS_SETTLE: Duration = Duration::from_secs(30 * 60);
/// How often retention runs (when the collector has a `--retain-days`).
pub const RETAIN_EVERY: Duration = Duration::from_secs(3_600);

/// The payload of an encoded `google.protobuf.BytesValue` or `StringValue`
/// (field 1, length-delimited: tag byte 0x0A, a varint length, the bytes),
/// borrowed instead of copied. `None` for any other layout (unknown or
/// repeated fields), which prost then decodes.
fn wrapped_payload(value: &[u8]) -> Option<&[u8]> {
    let Some((&tag, mut rest)) = value.split_first() else {
        // The default wrapper: an empty payload.
        return Some(value);
    };
    if tag != 0x0A {
        return None;
    }
    let len = usize::try_from(prost::encoding::decode_varint(&mut rest).ok()?).ok()?;
    (rest.len() == len).then_some(rest)
}

/// The audit record inside the filter state value. Envoy wraps a wasm
/// property (raw bytes) as `google.protobuf.BytesValue`; a `StringValue`
/// works too. A producer that put the JSON straight into the `Any` is
/// accepted as well: JSON can happen to decode as a wrapper message (`{` reads
/// as a protobuf group tag), so the raw value is tried whenever the
/// unwrapped one is not a record. The error names the first attempt.
fn record_from_any(any: &Any) -> Result<AuditRecord, String> {
    let wrapper = any.type_url.ends_with("google.protobuf.BytesValue")
        || any.type_url.ends_with("google.protobuf.StringValue");
    let first = if wrapper {
        let parsed = match wrapped_payload(&any.value) {
            Some(json) => Some(AuditRecord::from_json(json)),
            None => <Vec<u8> as Message>::decode(any.value.as_slice())
                .ok()
                .map(|json| AuditRecord::from_json(&json)),
        };
        match parsed {
            Some(Ok(r)) => return Ok(r),
            Some(Err(e)) => Some(e),
            None => None,
        }
    } else {
        None
    };
    AuditRecord::from_json(&any.value)
        .map_err(|raw| format!("invalid audit record: {}", first.unwrap_or(raw)))
}

/// The HTTP entries of one message.
fn entries_in(msg: &wire::LogMessage) -> &[wire::HttpEntry] {
    msg.http_logs
        .as_ref()
        .map_or(&[], |logs| logs.log_entry.as_slice())
}

/// The Tollgate records carried by one message, each decoded once; `Err`
/// for an entry whose filter state is not a valid record. Entries without
/// the state are skipped.
fn records_in(msg: &wire::LogMessage) -> impl Iterator<Item = Result<AuditRecord, String>> + '_ {
    entries_in(msg).iter().filter_map(|entry| {
        let any = entry.filter_state(FILTER_STATE_KEY)?;
        let code = entry.response_code().map(|c| c as u16);
        Some(record_from_any(any).map(|r| with_envoy_status(r, code)))
    })
}

/// The Tollgate records carried by one message as Envoy encodes it (see
/// [`records_in`]).
#[cfg(test)]
pub fn records_from_message(
    msg: &envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage,
) -> Vec<Result<AuditRecord, String>> {
    records_in(&tests::lean(msg)).collect()
}
/// A record the filter never completed (Envoy answered itself, or the client
/// or upstream went away) takes its status from Envoy's access-log entry.
/// A 413 is Envoy refusing a body over the buffer limit.
pub fn with_envoy_status(mut r: AuditRecord, code: Option<u16>) -> AuditRecord {
    if r.complete {
        return r;
    }
    if let Some(code) = code.filter(|c| *c > 0) {
        if r.status == 0 {
            r.status = code;
        }
        if code == 413 && r.reason == Reason::Ok {
            r.decision = Outcome::Denied;
            r.reason = Reason::BodyTooLarge;
            r.detail =
                Some("request body over the gateway's buffer limit (refused by Envoy)".to_string());
        }
    }
    r
}

struct Service {
    queue: mpsc::Sender<AuditRecord>,
    stats: Arc<Stats>,
    /// Streams without it are refused.
    token: auth::WriteToken,
    /// Becomes `true` when the collector shuts down.
    stopping: watch::Receiver<bool>,
}

impl Service {
    fn accept(&self, msg: &wire::LogMessage) {
        let entries = entries_in(msg).len() as u64;
        self.stats.received.fetch_add(entries, Ordering::Relaxed);
        let mut with_record = 0u64;
        for r in records_in(msg) {
            with_record += 1;
            match r {
                Ok(record) => {
                    if self.queue.try_send(record).is_err() {
                        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            "audit queue full: record dropped (the file access log keeps it)"
                        );
                    }
                }
                Err(e) => {
                    self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("{e}");
                }
            }
        }
        self.stats
            .without_record
            .fetch_add(entries.saturating_sub(with_record), Ordering::Relaxed);
    }
}

/// Resolves once `stopping` turns `true`; never if its sender goes away
/// without saying so.
async fn stopped(mut stopping: watch::Receiver<bool>) {
    if stopping.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl wire::Sink for Service {
    fn stream_access_logs(
        self: Arc<Self>,
        request: tonic::Request<tonic::Streaming<wire::LogMessage>>,
    ) -> tonic::codegen::BoxFuture<tonic::Response<StreamAccessLogsResponse>, tonic::Status> {
        Box::pin(async move { self.stream(request).await })
    }
}

impl Service {
    async fn stream(
        &self,
        request: tonic::Request<tonic::Streaming<wire::LogMessage>>,
    ) -> Result<tonic::Response<StreamAccessLogsResponse>, tonic::Status> {
        let authorization = request.metadata().get("authorization");
        if !self.token.allows(authorization.map(|v| v.as_bytes())) {
            tracing::warn!("access-log stream without the write token refused");
            return Err(tonic::Status::unauthenticated(auth::REFUSED));
        }
        let mut stream = request.into_inner();
        // Envoy keeps one stream per worker open for the life of the process
        // and never half-closes it, so graceful shutdown (which waits for open
        // streams) would wait forever: on shutdown the server ends the stream
        // itself. Envoy reopens it on its next flush.
        let stop = stopped(self.stopping.clone());
        tokio::pin!(stop);
        loop {
            tokio::select! {
                biased;
                () = &mut stop => break,
                msg = stream.message() => match msg? {
                    Some(msg) => self.accept(&msg),
                    None => return Ok(tonic::Response::new(StreamAccessLogsResponse {})),
                },
            }
        }
        // Keep what has already arrived; anything Envoy writes after this is
        // lost, as on any stream reset (the file access log has it).
        while let Some(Ok(Some(msg))) = stream.message().now_or_never() {
            self.accept(&msg);
        }
        Ok(tonic::Response::new(StreamAccessLogsResponse {}))
    }
}

/// Seeds the usage counters from what the store holds (one aggregate
/// query); says whether they are seeded.
async fn seed(store: &AuditStore, stats: &Arc<Stats>) -> bool {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || store.series_totals()).await {
        Ok(Ok(rows)) => match stats.usage.lock() {
            Ok(mut usage) => {
                *usage = Some(metrics::Usage::seeded(&rows));
                true
            }
            Err(_) => false,
        },
        Ok(Err(e)) => {
            tracing::error!("reading the audit store for metrics failed: {e:#}");
            false
        }
        Err(e) => {
            tracing::error!("audit metrics task failed: {e}");
            false
        }
    }
}

/// Stores records in one transaction and, once the usage counters are
/// seeded, counts each record into them by what storing it did.
pub fn store_counted(
    store: &AuditStore,
    stats: &Stats,
    records: &[AuditRecord],
) -> Result<Vec<Stored>> {
    store_counted_at(store, stats, records, crate::clock::now_ms())
}

/// [`store_counted`] at `now` (what the alerts take as the present).
pub fn store_counted_at(
    store: &AuditStore,
    stats: &Stats,
    records: &[AuditRecord],
    now: u64,
) -> Result<Vec<Stored>> {
    // Held across the insert: alerts that start counting a window from the
    // store must not then count this batch into it again.
    let held = stats.alerts.hold();
    let stored = store.insert_batch(records)?;
    stats
        .stored
        .fetch_add(records.len() as u64, Ordering::Relaxed);
    if let Ok(mut usage) = stats.usage.lock() {
        if let Some(usage) = usage.as_mut() {
            for (record, stored) in records.iter().zip(&stored) {
                usage.count(record, stored);
            }
        }
    }
    stats.alerts.observe(held, store, records, &stored, now);
    Ok(stored)
}

/// Stores queued records in batches until every sender is gone and the
/// queue is empty, counting each into the usage metrics once stored.
async fn write_loop(mut rx: mpsc::Receiver<AuditRecord>, store: AuditStore, stats: Arc<Stats>) {
    // Seeded before the first insert, so what the seed read and what the
    // writer counts never overlap; a failed seed is retried before each
    // batch (the batches stored meanwhile are in what it then reads).
    let mut seeded = seed(&store, &stats).await;
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        // A short batch waits out the linger once (one timer wake-up, not
        // one per arriving message), then takes what came meanwhile.
        if batch.len() < BATCH {
            tokio::time::sleep(LINGER).await;
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(record) => batch.push(record),
                    Err(_) => break,
                }
            }
        }
        if !seeded {
            seeded = seed(&store, &stats).await;
        }
        let records = std::mem::take(&mut batch);
        let (store, stats) = (store.clone(), stats.clone());
        let n = records.len() as u64;
        let done = tokio::task::spawn_blocking(move || -> Result<()> {
            store_counted(&store, &stats, &records).map(drop)
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("storing {n} audit records failed: {e:#}"),
            Err(e) => tracing::error!("audit writer task failed: {e}"),
        }
    }
}

/// Keeps the missing-records gauge from the store, and with `retain_days`
/// runs retention, until `stop` resolves: retention at once and every
/// [`RETAIN_EVERY`], the gaps after it and every [`GAPS_EVERY`].
pub async fn maintain(
    store: AuditStore,
    stats: Arc<Stats>,
    retain_days: Option<u32>,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut gaps = tokio::time::interval(GAPS_EVERY);
    let mut retain = tokio::time::interval(RETAIN_EVERY);
    let tracker = Arc::new(Mutex::new(gaps::Tracker::default()));
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        tokio::select! {
            biased;
            () = &mut stop => return,
            _ = retain.tick(), if retain_days.is_some() => {
                let days = retain_days.unwrap_or_default();
                let (store, flag) = (store.clone(), stopping.clone());
                let now = crate::clock::now_ms();
                let pass = tokio::task::spawn_blocking(move || {
                    store.retain(days, now, &flag)
                });
                tokio::pin!(pass);
                let done = tokio::select! {
                    done = &mut pass => done,
                    () = &mut stop => {
                        // The pass ends at its next step; then stop.
                        stopping.store(true, Ordering::Relaxed);
                        let _ = pass.await;
                        return;
                    }
                };
                match done {
                    Ok(Ok(r)) if r.days > 0 || r.deleted > 0 => crate::output::status(format_args!(
                        "audit retention: {} day(s) rolled up, {} records deleted, raw records kept from {}",
                        r.days,
                        r.deleted,
                        tollgate_core::time::format_rfc3339(u64::try_from(r.horizon_ms).unwrap_or(0))
                    )),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::error!("audit retention failed: {e:#}"),
                    Err(e) => tracing::error!("audit retention task failed: {e}"),
                }
                gaps.reset_immediately();
            }
            _ = gaps.tick() => refresh_missing(&store, &stats, &tracker).await,
        }
    }
}

/// Brings the missing-records gauge up to date from the store (see
/// [`gaps::Tracker`]).
pub async fn refresh_missing(
    store: &AuditStore,
    stats: &Arc<Stats>,
    tracker: &Arc<Mutex<gaps::Tracker>>,
) {
    let (store, stats, tracker) = (store.clone(), stats.clone(), tracker.clone());
    let done = tokio::task::spawn_blocking(move || -> Result<()> {
        let now = crate::clock::now_ms();
        let since = now.saturating_sub(GAPS_WINDOW.as_millis() as u64);
        let settled = now.saturating_sub(GAPS_SETTLE.as_millis() as u64);
        let mut tracker = tracker
            .lock()
            .map_err(|_| anyhow::anyhow!("gap tracker lock poisoned"))?;
        tracker.refresh(&*store, since)?;
        let missing = gaps::missing_by_envoy(&tracker.gaps(since, settled));
        if let Ok(mut m) = stats.missing.lock() {
            *m = Some(missing);
        }
        Ok(())
    })
    .await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("reading audit gaps failed: {e:#}"),
        Err(e) => tracing::error!("audit gaps task failed: {e}"),
    }
}

/// Serves the AccessLogService on `listener` until `shutdown` resolves, then
/// flushes every queued record to the store before returning.
pub async fn serve_with_stats(
    listener: tokio::net::TcpListener,
    store: AuditStore,
    stats: Arc<Stats>,
    token: auth::WriteToken,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let writer = tokio::spawn(write_loop(rx, store, stats.clone()));
    let (stop_tx, stopping) = watch::channel(false);
    let service = Service {
        queue: tx,
        stats,
        token,
        stopping,
    };
    tonic::transport::Server::builder()
        // HTTP/2 windows of 1 MiB rather than 64 KiB: the server grants a
        // window update each time half of one is read, a write and a
        // wake-up every few of Envoy's 16 KiB messages otherwise.
        .initial_stream_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .add_service(wire::AccessLogServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                shutdown.await;
                // Tell open streams too: tonic only stops accepting and
                // waits for them.
                let _ = stop_tx.send(true);
            },
        )
        .await?;
    // The server (and with it the last sender) is gone: the writer drains
    // what is queued and ends.
    writer.await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::data::accesslog::v3::{AccessLogCommon, HttpAccessLogEntry};
    use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
    use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
        HttpAccessLogEntries, LogEntries,
    };
    use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;

    /// `msg` as the collector decodes it from the wire.
    pub fn lean(msg: &StreamAccessLogsMessage) -> wire::LogMessage {
        wire::LogMessage::decode(msg.encode_to_vec().as_slice()).unwrap()
    }

    fn entry(state: Option<Any>) -> HttpAccessLogEntry {
        let mut common = AccessLogCommon::default();
        if let Some(any) = state {
            common
                .filter_state_objects
                .insert(FILTER_STATE_KEY.to_string(), any);
        }
        HttpAccessLogEntry {
            common_properties: Some(common),
            ..Default::default()
        }
    }

    fn bytes_value(json: &str) -> Any {
        Any {
            type_url: "type.googleapis.com/google.protobuf.BytesValue".into(),
            value: json.as_bytes().to_vec().encode_to_vec(),
        }
    }

    fn message(entries: Vec<HttpAccessLogEntry>) -> StreamAccessLogsMessage {
        StreamAccessLogsMessage {
            identifier: None,
            log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
                log_entry: entries,
            })),
        }
    }

    fn json(id: &str) -> String {
        serde_json::to_string(&AuditRecord {
            request_id: id.into(),
            complete: true,
            route: "anthropic.messages".into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn extracts_records_from_bytes_and_string_values_and_skips_other_entries() {
        let string_value = Any {
            type_url: "type.googleapis.com/google.protobuf.StringValue".into(),
            value: json("s").encode_to_vec(),
        };
        let bad = bytes_value("{not json");
        let out = records_from_message(&message(vec![
            entry(Some(bytes_value(&json("b")))),
            entry(Some(string_value)),
            entry(None),
            entry(Some(bad)),
        ]));
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].as_ref().unwrap().request_id, "b");
        assert_eq!(out[1].as_ref().unwrap().request_id, "s");
        assert_eq!(
            out[2].as_ref().unwrap_err(),
            "invalid audit record: key must be a string at line 1 column 2"
        );
    }

    #[test]
    fn accepts_an_any_whose_value_is_the_json_itself() {
        let raw = |type_url: &str| Any {
            type_url: type_url.into(),
            value: json("raw").into_bytes(),
        };
        let out = records_from_message(&message(vec![
            entry(Some(raw(""))),
            entry(Some(raw("type.googleapis.com/google.protobuf.BytesValue"))),
            entry(Some(raw("type.googleapis.com/google.protobuf.StringValue"))),
        ]));
        let ids: Vec<_> = out
            .iter()
            .map(|r| r.as_ref().map(|r| r.request_id.as_str()))
            .collect();
        assert_eq!(ids, [Ok("raw"), Ok("raw"), Ok("raw")]);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking_envoy() {
        let (queue, mut rx) = mpsc::channel(1);
        let (_stop, stopping) = watch::channel(false);
        let service = Service {
            queue,
            stats: Arc::new(Stats::default()),
            token: auth::WriteToken::open(),
            stopping,
        };
        service.accept(&lean(&message(vec![
            entry(Some(bytes_value(&json("kept")))),
            entry(Some(bytes_value(&json("lost1")))),
            entry(None),
            entry(Some(bytes_value(&json("lost2")))),
        ])));
        let stats = &service.stats;
        assert_eq!(stats.received.load(Ordering::Relaxed), 4);
        assert_eq!(stats.without_record.load(Ordering::Relaxed), 1);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(rx.try_recv().unwrap().request_id, "kept");
    }

    #[tokio::test]
    async fn a_stream_without_the_write_token_is_refused_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path().join("a.db")).unwrap();
        let token = "0123456789abcdef0123456789abcdef";
        let running = start_with(&store, auth::WriteToken::new(token)).await;
        let mut client = AccessLogServiceClient::connect(format!("http://{}", running.addr))
            .await
            .unwrap();
        let msgs = || tokio_stream::iter(vec![message(vec![entry(Some(bytes_value(&json("x"))))])]);
        let refused = client.stream_access_logs(msgs()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert_eq!(refused.message(), auth::REFUSED);
        let mut wrong = tonic::Request::new(msgs());
        wrong.metadata_mut().insert(
            "authorization",
            "Bearer 0123456789abcdef0123456789abcdeX".parse().unwrap(),
        );
        assert_eq!(
            client.stream_access_logs(wrong).await.unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut right = tonic::Request::new(msgs());
        right
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        client.stream_access_logs(right).await.unwrap();
        let stats = running.stop().await;
        assert_eq!(
            stats.received.load(Ordering::Relaxed),
            1,
            "only the third stream's"
        );
        assert_eq!(store.count().unwrap(), 1);
    }

    #[tokio::test]
    async fn stores_streamed_entries_and_flushes_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path().join("a.db")).unwrap();
        let stats = serve_stream(
            &store,
            vec![
                message(vec![
                    entry(Some(bytes_value(&json("r1")))),
                    entry(Some(bytes_value(&json("r2")))),
                ]),
                message(vec![entry(Some(bytes_value(&json("r3")))), entry(None)]),
            ],
        )
        .await;
        assert_eq!(store.count().unwrap(), 3);
        assert!(store.get("r3").unwrap().is_some());
        assert_eq!(stats.received.load(Ordering::Relaxed), 4);
        assert_eq!(stats.without_record.load(Ordering::Relaxed), 1);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn shutdown_ends_a_stream_envoy_keeps_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path().join("a.db")).unwrap();
        let Running {
            addr,
            stats,
            stop: stop_tx,
            server,
        } = start(&store).await;
        let mut client = AccessLogServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(message(vec![entry(Some(bytes_value(&json("open"))))]))
            .await
            .unwrap();
        let call = tokio::spawn(async move {
            client
                .stream_access_logs(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        while stats.received.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let _ = stop_tx.send(());
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("serve returned while the stream was open")
            .unwrap()
            .unwrap();
        assert_eq!(store.count().unwrap(), 1);
        drop(tx);
        let _ = call.await;
    }

    /// A collector serving on a loopback port, until `stop` is sent.
    pub(super) struct Running {
        pub(super) addr: std::net::SocketAddr,
        pub(super) stats: Arc<Stats>,
        pub(super) stop: tokio::sync::oneshot::Sender<()>,
        pub(super) server: tokio::task::JoinHandle<Result<()>>,
    }

    pub(super) async fn start(store: &AuditStore) -> Running {
        start_with(store, auth::WriteToken::open()).await
    }

    pub(super) async fn start_with(store: &AuditStore, token: auth::WriteToken) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stats = Arc::new(Stats::default());
        let server = tokio::spawn(serve_with_stats(
            listener,
            store.clone(),
            stats.clone(),
            token,
            async move {
                let _ = stop_rx.await;
            },
        ));
        Running {
            addr,
            stats,
            stop,
            server,
        }
    }

    impl Running {
        /// Stops the collector once it has stored everything it received.
        pub(super) async fn stop(self) -> Arc<Stats> {
            let _ = self.stop.send(());
            self.server.await.unwrap().unwrap();
            self.stats
        }
    }

    /// What `serve_with_stats` stores and counts from a stream, stopped.
    async fn serve_stream(store: &AuditStore, msgs: Vec<StreamAccessLogsMessage>) -> Arc<Stats> {
        let running = start(store).await;
        let mut client = AccessLogServiceClient::connect(format!("http://{}", running.addr))
            .await
            .unwrap();
        client
            .stream_access_logs(tokio_stream::iter(msgs))
            .await
            .unwrap();
        running.stop().await
    }

    fn usage_lines(text: &str) -> Vec<&str> {
        text.lines()
            .filter(|l| !l.contains("tollgate_collector_"))
            .collect()
    }

    #[tokio::test]
    async fn metrics_start_from_the_store_and_count_each_request_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path().join("a.db")).unwrap();
        let record = |id: &str, complete: bool, cost: f64| AuditRecord {
            request_id: id.into(),
            complete,
            team: Some("payments".into()),
            route: "anthropic.messages".into(),
            model_requested: Some("claude-sonnet-4-5".into()),
            tokens: tollgate_core::audit::Tokens {
                output: complete.then_some(100),
                ..Default::default()
            },
            cost_usd: complete.then_some(cost),
            ..Default::default()
        };
        // Stored before the collector starts (an import, a previous run).
        store
            .insert_batch(&[record("old", true, 0.5), record("p1", false, 0.0)])
            .unwrap();
        let value = |r: &AuditRecord| entry(Some(bytes_value(&serde_json::to_string(r).unwrap())));
        let stats = serve_stream(
            &store,
            vec![
                message(vec![
                    value(&record("p1", true, 0.25)),
                    value(&record("new", true, 0.25)),
                ]),
                // Replayed: stored already, counted already.
                message(vec![
                    value(&record("new", true, 0.25)),
                    value(&record("p1", false, 0.0)),
                ]),
            ],
        )
        .await;
        let live = metrics::render(&stats);
        let labels =
            r#"team="payments",app="",agent="",model="claude-sonnet-4-5",decision="allowed""#;
        assert!(
            live.contains(&format!("tollgate_requests_total{{{labels}}} 3\n")),
            "{live}"
        );
        assert!(
            live.contains(&format!(
                "tollgate_tokens_total{{{labels},class=\"output\"}} 300\n"
            )),
            "{live}"
        );
        assert!(
            live.contains(&format!("tollgate_cost_usd_total{{{labels}}} 1\n")),
            "{live}"
        );
        assert!(live.contains("tollgate_collector_records_stored_total 4\n"));
        // What was counted live is what a restart would read from the store.
        let restarted = Stats::default();
        *restarted.usage.lock().unwrap() =
            Some(metrics::Usage::seeded(&store.series_totals().unwrap()));
        assert_eq!(
            usage_lines(&live),
            usage_lines(&metrics::render(&restarted))
        );
    }

    #[tokio::test]
    async fn upkeep_runs_retention_at_once_and_publishes_the_missing_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path().join("a.db")).unwrap();
        let numbered = |id: &str, seq: u64, t: u64| AuditRecord {
            request_id: id.into(),
            complete: true,
            route: "anthropic.messages".into(),
            timestamp_ms: t,
            origin: Some(tollgate_core::audit::Origin {
                envoy: "e".into(),
                seq,
            }),
            ..Default::default()
        };
        let day = 86_400_000;
        // Two requests long expired, and number 3 missing between two
        // requests of last week (settled long ago).
        let week_ago = crate::clock::now_ms() - 7 * day + 3_600_000;
        store
            .insert_batch(&[
                numbered("old-1", 1, day),
                numbered("old-2", 2, day + 1),
                numbered("w-4", 4, week_ago),
                numbered("w-5", 5, week_ago + 1),
                numbered("w-7", 7, week_ago + 2),
            ])
            .unwrap();
        let stats = Arc::new(Stats::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let upkeep = tokio::spawn(maintain(store.clone(), stats.clone(), Some(30), async {
            let _ = stop_rx.await;
        }));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stats.missing.lock().unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "no gauge");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // Retention ran first: the old day is rolled up and its numbers are
        // not missing; 3 (after the expired 2) and 6 are.
        assert_eq!(store.count().unwrap(), 3);
        assert_eq!(
            stats.missing.lock().unwrap().clone(),
            Some(vec![("e".to_string(), 2)])
        );
        assert!(metrics::render(&stats).contains("tollgate_audit_missing_records{envoy=\"e\"} 2\n"));
        let _ = stop_tx.send(());
        upkeep.await.unwrap();
    }

    #[tokio::test]
    async fn metrics_are_served_from_memory_without_reading_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let store = AuditStore::open(&db).unwrap();
        let stats = serve_stream(
            &store,
            vec![message(vec![entry(Some(bytes_value(&json("m1"))))])],
        )
        .await;
        // Without its table, any query fails: a scrape must not need one.
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch("DROP TABLE audit")
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let web = tokio::spawn(http::serve(
            listener,
            store,
            stats,
            None,
            auth::WriteToken::open(),
            None,
            async move {
                let _ = stop_rx.await;
            },
        ));
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains(
            "tollgate_requests_total{team=\"\",app=\"\",agent=\"\",model=\"\",decision=\"allowed\"} 1\n"
        ), "{response}");
        let _ = stop_tx.send(());
        web.await.unwrap().unwrap();
    }
}
