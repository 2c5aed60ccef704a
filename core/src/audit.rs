//! The audit record: one per request, allowed or denied. The filter publishes
//! it as filter state `wasm.tollgate_audit` (JSON); Envoy's gRPC and file
//! access loggers ship it to the collector. Never contains the virtual key,
//! the prompt or the completion.

use crate::host::SharedStore;
use serde::{Deserialize, Serialize};

/// Version of the record layout; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// Bytes reserved for a record's JSON (see [`AuditRecord::to_json`]).
const JSON_CAPACITY: usize = 2048;

/// Filter-state name Envoy's access loggers are configured to read.
pub const FILTER_STATE_KEY: &str = "wasm.tollgate_audit";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    #[default]
    Allowed,
    Denied,
}

/// Why a request was allowed or denied, as a stable machine-readable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Forwarded to the provider.
    #[default]
    Ok,
    MissingKey,
    UnknownKey,
    RevokedKey,
    ExpiredKey,
    /// A rotated key's previous secret, presented after its grace period.
    RotatedKey,
    ModelNotAllowed,
    InvalidRequest,
    BodyTooLarge,
    RateLimited,
    QuotaExhausted,
    BudgetExhausted,
    UnknownRoute,
    NoPolicy,
    /// Shared data kept refusing the bucket update (bounded CAS retries ran out).
    StoreContention,
    /// The shared store (Redis, through the quota service) could not be
    /// reached and a limit with `on_store_failure: closed` applied.
    QuotaStoreUnavailable,
    /// Allowed without counting: the shared store could not be reached and
    /// every limit that needed it says `on_store_failure: open`.
    Uncounted,
    /// Forwarded, and the provider answered 429: its own limit refused the
    /// request. The decision stays `allowed` (Tollgate let it through);
    /// nothing is charged, the request included (the provider served none).
    UpstreamRateLimited,
    /// Forwarded, and the provider answered 529 (overloaded); as
    /// [`Reason::UpstreamRateLimited`], allowed and charged nothing.
    UpstreamOverloaded,
    /// A session pool tracks its maximum of active sessions and this
    /// request's session is not among them.
    SessionPoolFull,
}

impl Reason {
    /// The reason of a provider's own refusal of a forwarded request, by
    /// the status it answered: 429 (its rate limit) or 529 (overloaded).
    pub fn of_upstream_status(status: u16) -> Option<Reason> {
        match status {
            429 => Some(Reason::UpstreamRateLimited),
            529 => Some(Reason::UpstreamOverloaded),
            _ => None,
        }
    }

    pub const ALL: [Reason; 20] = [
        Reason::Ok,
        Reason::MissingKey,
        Reason::UnknownKey,
        Reason::RevokedKey,
        Reason::ExpiredKey,
        Reason::RotatedKey,
        Reason::ModelNotAllowed,
        Reason::InvalidRequest,
        Reason::BodyTooLarge,
        Reason::RateLimited,
        Reason::QuotaExhausted,
        Reason::BudgetExhausted,
        Reason::UnknownRoute,
        Reason::NoPolicy,
        Reason::StoreContention,
        Reason::QuotaStoreUnavailable,
        Reason::Uncounted,
        Reason::UpstreamRateLimited,
        Reason::UpstreamOverloaded,
        Reason::SessionPoolFull,
    ];
    pub const COUNT: usize = Reason::ALL.len();

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::MissingKey => "missing_key",
            Reason::UnknownKey => "unknown_key",
            Reason::RevokedKey => "revoked_key",
            Reason::ExpiredKey => "expired_key",
            Reason::RotatedKey => "rotated_key",
            Reason::ModelNotAllowed => "model_not_allowed",
            Reason::InvalidRequest => "invalid_request",
            Reason::BodyTooLarge => "body_too_large",
            Reason::RateLimited => "rate_limited",
            Reason::QuotaExhausted => "quota_exhausted",
            Reason::BudgetExhausted => "budget_exhausted",
            Reason::UnknownRoute => "unknown_route",
            Reason::NoPolicy => "no_policy",
            Reason::StoreContention => "store_contention",
            Reason::QuotaStoreUnavailable => "quota_store_unavailable",
            Reason::Uncounted => "uncounted",
            Reason::UpstreamRateLimited => "upstream_rate_limited",
            Reason::UpstreamOverloaded => "upstream_overloaded",
            Reason::SessionPoolFull => "session_pool_full",
        }
    }
}

/// Where a charged token figure came from. The buckets and budgets are
/// settled with the same figures the record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// The provider's own count (its `usage`).
    Provider,
    /// Estimated by Tollgate from the text the stream relayed to the client
    /// (a stream that ended before the provider's count).
    Estimate,
    /// What was reserved before forwarding: the input estimate, or
    /// `max_tokens` (the default reservation when absent).
    Reservation,
}

/// Token counts by class. `*_estimated` / `output_reserved` are what was
/// reserved before forwarding; the others come from the provider's `usage`,
/// normalised as [`crate::usage::Usage`] says. Fields added after schema 1
/// carry serde defaults, so records written before them still read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tokens {
    pub input_estimated: u64,
    pub output_reserved: u64,
    pub input: Option<u64>,
    pub output: Option<u64>,
    /// 5-minute cache writes (or writes whose lifetime was not reported).
    pub cache_write: Option<u64>,
    pub cache_read: Option<u64>,
    /// 1-hour cache writes.
    #[serde(default)]
    pub cache_write_1h: Option<u64>,
    /// Reasoning / thinking tokens: part of `output`, never priced apart.
    #[serde(default)]
    pub reasoning: Option<u64>,
    /// Web searches the provider ran (and bills per 1,000).
    #[serde(default)]
    pub web_search_requests: Option<u64>,
    /// Where `input` and the cache classes came from; `None` when no tokens
    /// were charged (a denial, a refunded upstream error, a route that is
    /// not an LLM call) and in records written before this field.
    #[serde(default)]
    pub input_source: Option<TokenSource>,
    /// Where `output` (and `reasoning`) came from; `None` as for
    /// `input_source`.
    #[serde(default)]
    pub output_source: Option<TokenSource>,
}

impl Tokens {
    /// Every token class the record carries, summed (what a daily token
    /// quota counts, cache reads and writes included); `None` when it
    /// carries none (a denial, or a request that ended before its usage).
    pub fn counted(&self) -> Option<u64> {
        let classes = [
            self.input,
            self.output,
            self.cache_write,
            self.cache_write_1h,
            self.cache_read,
        ];
        classes
            .iter()
            .any(Option::is_some)
            .then(|| classes.iter().flatten().sum())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub schema: u32,
    pub request_id: String,
    /// Request start, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// `false` while the request is in flight: a record still provisional at
    /// log time means the client or upstream went away before the end. Its
    /// tokens and cost are then what the request was charged (republished
    /// as the stream progresses, see `flow`).
    pub complete: bool,
    pub key_id: Option<String>,
    /// How the caller was identified: `key` (a virtual key), `spiffe` (the
    /// mTLS peer's SPIFFE ID) or `jwt` (a JWT verified by Envoy's
    /// `jwt_authn`); `None` when it was not (and in older records).
    #[serde(default)]
    pub identified_by: Option<crate::mesh::Method>,
    /// The mesh principal the request came with: the SPIFFE ID, or the
    /// JWT's `iss/sub`; set for identities and for the refusal of a mesh
    /// caller no identity matches.
    #[serde(default)]
    pub principal: Option<String>,
    pub user: Option<String>,
    pub team: Option<String>,
    pub project: Option<String>,
    pub app: Option<String>,
    pub agent: Option<String>,
    pub environment: Option<String>,
    pub cost_center: Option<String>,
    pub groups: Vec<String>,
    pub route: String,
    pub provider: String,
    pub model_requested: Option<String>,
    pub model_served: Option<String>,
    pub stream: bool,
    pub decision: Outcome,
    pub reason: Reason,
    /// Human-readable detail of a denial (the message the client saw).
    pub detail: Option<String>,
    /// HTTP status returned to the client (0 if none yet).
    pub status: u16,
    pub tokens: Tokens,
    pub cost_usd: Option<f64>,
    /// The tier that served the request, as the response reported it
    /// (Anthropic `usage.service_tier`, OpenAI `service_tier`).
    #[serde(default)]
    pub service_tier: Option<String>,
    /// Where inference ran, as the response reported it (Anthropic
    /// `usage.inference_geo`).
    #[serde(default)]
    pub inference_geo: Option<String>,
    /// Tier × region multiplier the price applied to the token classes.
    #[serde(default)]
    pub price_multiplier: Option<f64>,
    /// Whether the price's long-context rates applied to the whole request.
    #[serde(default)]
    pub long_context: Option<bool>,
    /// From request start to the end of the response, milliseconds, on
    /// the filter's VM clock (`filter::CLOCK_TICK_MS`): within 10 ms
    /// without a shared store. Envoy's `%DURATION%` is exact.
    pub latency_ms: Option<u64>,
    /// The bucket that decided a denial (`key:alice-laptop:requests_per_minute`).
    pub bucket: Option<String>,
    /// The Envoy that published the record and its place in that Envoy's
    /// sequence, so the collector can tell which records never arrived
    /// (absent in records written before it, and when shared data refused
    /// the numbering).
    #[serde(default)]
    pub origin: Option<Origin>,
    /// Shadow limits that would have denied this request, which was
    /// admitted (and charged to them) anyway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub would_deny: Vec<String>,
    /// The limit that served this request with a cheaper model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downgrade: Option<Downgrade>,
    /// The limit whose overflow (`throttle`) admitted this request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttled: Option<String>,
    /// The session pools this request drew from, with its session.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<SessionRef>,
}

/// A downgrade: the model the client asked for, the one that served it
/// (the body sent upstream named it), and the limit that made the change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Downgrade {
    pub from: String,
    pub to: String,
    pub bucket: String,
}

/// A session pool and the request's value of its header (as sent when
/// short and printable, else `sha256:` and 16 hex digits).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRef {
    pub pool: String,
    pub value: String,
}

/// Which numbering stream published a record, and the record's number in
/// it: numbers start at 1 and are handed out without holes, one per
/// request, when its record is first published. The provisional and the
/// final record of a request carry the same number, so a number the store
/// never receives is a request whose every record was lost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The stream: the Envoy's replica id (`crate::sync::replica_id`,
    /// chosen once per process), `/`, and the number of the worker VM that
    /// numbered the record (`3f2a9c0d11e4b5a6/2`). Records written before
    /// streams were per worker carry the replica id alone.
    pub envoy: String,
    pub seq: u64,
}

/// Shared-data key of the last worker number handed out in this Envoy
/// (u64, little-endian): each worker VM takes the next one, once.
pub const WORKER_KEY: &str = "tollgate/2/audit-workers";

/// A worker VM's audit numbering. Each VM numbers its own requests in a
/// stream of its own: a VM runs one callback at a time, so its counter
/// needs no shared data and numbering a request costs no host call (one
/// Envoy-wide counter cost a shared-data read and CAS write per request).
/// The stream is named once, at the VM's first numbered request: the
/// replica id (shared with the sync leader) and the VM's worker number.
#[derive(Debug, Default)]
pub struct Numbering {
    stream: Option<String>,
    last: u64,
}

impl Numbering {
    /// The next number of this VM's stream. On the first call the stream is
    /// named: the replica id if a worker already chose one, else
    /// `proposal()`, and the next worker number (a CAS increment, retried
    /// on conflicts like every shared-data update). `None` when the retries
    /// run out or the host refuses the write: the record then goes
    /// unnumbered, no number is skipped, and the next request tries again.
    pub fn next(
        &mut self,
        store: &dyn SharedStore,
        proposal: &dyn Fn() -> String,
    ) -> Option<Origin> {
        let stream = match &self.stream {
            Some(stream) => stream.clone(),
            None => {
                let worker = crate::sync::increment(store, WORKER_KEY)?;
                let replica = crate::sync::replica_id(store, &proposal());
                let stream = format!("{replica}/{worker}");
                self.stream = Some(stream.clone());
                stream
            }
        };
        self.last += 1;
        Some(Origin {
            envoy: stream,
            seq: self.last,
        })
    }
}

impl Origin {
    /// A replica id to propose when this Envoy has none: 16 hex digits of a
    /// hash of the first numbered request's id (Envoy generates a random
    /// UUID per request) and its start time.
    pub fn propose_envoy(request_id: &str, now_ms: u64) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(request_id.as_bytes())
            .chain_update(now_ms.to_le_bytes())
            .finalize();
        hex::encode(digest.get(..8).unwrap_or_default())
    }
}

impl AuditRecord {
    /// The record as published, in one allocation: a record is about 1 KB
    /// (a served one with identity, models, tokens, cost and origin), and
    /// serde_json's own buffer would start at 128 bytes and grow by copying
    /// four times, three times per request.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(JSON_CAPACITY);
        match serde_json::to_writer(&mut out, self) {
            Ok(()) => out,
            Err(_) => Vec::new(),
        }
    }

    pub fn from_json(bytes: &[u8]) -> Result<AuditRecord, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::meter::store::MAX_ATTEMPTS;

    #[test]
    fn records_written_before_the_pricing_fields_still_read() {
        let old = br#"{"schema":1,"request_id":"r1","timestamp_ms":1,"complete":true,"key_id":"k","user":null,
            "team":null,"project":null,"app":null,"agent":null,"environment":null,"cost_center":null,"groups":[],
            "route":"anthropic.messages","provider":"anthropic","model_requested":"m","model_served":"m","stream":false,
            "decision":"allowed","reason":"ok","detail":null,"status":200,
            "tokens":{"input_estimated":1,"output_reserved":2,"input":3,"output":4,"cache_write":0,"cache_read":0},
            "cost_usd":0.5,"latency_ms":9,"bucket":null}"#;
        let r = AuditRecord::from_json(old).unwrap();
        assert_eq!((r.tokens.output, r.cost_usd), (Some(4), Some(0.5)));
        assert_eq!(
            (
                r.tokens.cache_write_1h,
                r.service_tier.as_deref(),
                r.long_context
            ),
            (None, None, None)
        );
        // Nor do they say where their figures came from.
        assert_eq!(
            (r.tokens.input_source, r.tokens.output_source),
            (None, None)
        );
        // And a new record round-trips with them.
        let mut new = r.clone();
        new.tokens.web_search_requests = Some(3);
        new.tokens.input_source = Some(TokenSource::Provider);
        new.tokens.output_source = Some(TokenSource::Estimate);
        let json = String::from_utf8(new.to_json()).unwrap();
        assert!(
            json.contains(r#""input_source":"provider","output_source":"estimate""#),
            "{json}"
        );
        new.service_tier = Some("priority".into());
        new.price_multiplier = Some(2.0);
        assert_eq!(AuditRecord::from_json(&new.to_json()).unwrap(), new);
        assert_eq!(r.origin, None, "records before the sequence have no origin");
    }

    #[test]
    fn each_worker_numbers_its_own_stream_named_after_the_replica() {
        let store = crate::testing::MemStore::new();
        let (mut one, mut two) = (Numbering::default(), Numbering::default());
        let origin = |envoy: &str, seq| Origin {
            envoy: envoy.into(),
            seq,
        };
        assert_eq!(
            one.next(&*store, &|| "proposed".to_string()),
            Some(origin("proposed/1", 1))
        );
        // The second worker takes the next worker number; later proposals
        // lose: the replica id was chosen once for the process.
        assert_eq!(
            two.next(&*store, &|| "other".to_string()),
            Some(origin("proposed/2", 1))
        );
        assert_eq!(
            one.next(&*store, &|| "other".to_string()),
            Some(origin("proposed/1", 2))
        );
        assert_eq!(crate::sync::replica_id(&*store, "x"), "proposed");
        // Numbering after the first costs no shared-data access at all.
        store.inject_conflicts(MAX_ATTEMPTS);
        assert_eq!(
            two.next(&*store, &|| "x".to_string()),
            Some(origin("proposed/2", 2))
        );
    }

    #[test]
    fn numbering_reuses_a_replica_id_the_sync_leader_chose() {
        let store = crate::testing::MemStore::new();
        assert_eq!(crate::sync::replica_id(&*store, "leader-vm"), "leader-vm");
        let o = Numbering::default()
            .next(&*store, &|| "worker".to_string())
            .unwrap();
        assert_eq!((o.envoy.as_str(), o.seq), ("leader-vm/1", 1));
    }

    #[test]
    fn a_stream_shared_data_could_not_name_skips_no_number() {
        let store = crate::testing::MemStore::new();
        let mut n = Numbering::default();
        store.inject_conflicts(3);
        assert_eq!(n.next(&*store, &|| "e".to_string()).unwrap().seq, 1);
        assert_eq!(store.mismatches.get(), 3, "conflicts are retried");
        let mut late = Numbering::default();
        store.inject_conflicts(MAX_ATTEMPTS);
        assert_eq!(late.next(&*store, &|| "e".to_string()), None);
        assert_eq!(
            late.next(&*store, &|| "e".to_string()),
            Some(Origin {
                envoy: "e/2".into(),
                seq: 1
            }),
            "a request that got no number took none"
        );
    }

    #[test]
    fn the_origin_round_trips_in_the_record() {
        let r = AuditRecord {
            request_id: "r".into(),
            origin: Some(Origin {
                envoy: "0123abcd".into(),
                seq: 7,
            }),
            ..Default::default()
        };
        let json = String::from_utf8(r.to_json()).unwrap();
        assert!(
            json.contains(r#""origin":{"envoy":"0123abcd","seq":7}"#),
            "{json}"
        );
        assert_eq!(AuditRecord::from_json(json.as_bytes()).unwrap(), r);
        let proposal = Origin::propose_envoy("req-1", 5);
        assert_eq!(proposal.len(), 16);
        assert_ne!(proposal, Origin::propose_envoy("req-2", 5));
    }
}
