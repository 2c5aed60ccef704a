//! The per-request state machine. The filter maps each proxy-wasm callback to
//! one method here and turns the returned [`Decision`] into an `Action`.
//!
//! 1. Request headers: classify the route, authenticate the virtual key,
//!    strip it (Envoy injects the real key), drop `accept-encoding` so the
//!    provider's `usage` stays readable.
//! 2. Request body (buffered to its end): read model / max_tokens / stream,
//!    estimate input tokens, check the allowlist, admit against every bucket
//!    and reserve. Publish a provisional audit record so that a request that
//!    never completes is still audited.
//! 3. Response: add the caller's rate-limit headers, read usage from the JSON
//!    body or incrementally from the SSE stream (never buffered). A
//!    `/v1/models` list is the exception: held to its end and cut to the
//!    key's allowlist ([`models`]).
//! 4. End of response: settle reservations against actual usage, price it,
//!    publish the final audit record (before Envoy's access loggers run).
//! 5. A request that ends early (client abort, upstream reset, idle
//!    timeout) gets no callback before Envoy's access loggers read the
//!    record: only `on_log`, which runs after them. So the provisional
//!    record always says what the request would be charged if it ended now
//!    (republished as a stream is relayed, [`REPUBLISH_TOKENS`],
//!    [`REPUBLISH_MS`]), and an early end settles with exactly the figures
//!    last published: the audit record and the buckets agree by
//!    construction.

// A refusal carries the refusing bucket (as `meter`'s `Denial` does): a
// large `Err`, moved once on the refusal path into the reply it becomes.
#![allow(clippy::result_large_err)]

mod headers;
pub mod headroom;
mod ladder;
mod models;
mod refusal;
mod sessions;

pub use headers::rate_limit_headers;
pub use models::{empty_list, filter_list, Filtered, MAX_MODELS_LIST};
pub use refusal::Refusal;

use crate::audit::{AuditRecord, Origin, Outcome, Reason, TokenSource, Tokens, SCHEMA_VERSION};
use crate::host::{header, Decision, Host, LocalReply, Stat};
use crate::host::{Queue, QuotaMethod};
use crate::mesh::{self, Method};
use crate::meter::shared::{self, Plan, RemoteRefusal, SharedOptions, Source};
use crate::meter::{self, Admission, BucketState, Clock, Demand, Denial};
use crate::policy::{Key, KeyRefusal, Policy, Price, Secret, UnknownRoutes};
use crate::reply::error_reply;
use crate::route::{Provider, Route};
use crate::usage::{self, RequestInfo, StreamUsage, Usage};
use crate::vkey::{self, Presented};
use std::rc::Rc;

/// A request id for a request Envoy gave none (its `x-request-id` is
/// generated unless the HCM says otherwise): the time and a count of this
/// VM's such requests, since many share one clock tick and the store keeps
/// one record per id and start.
fn fallback_request_id(now: u64) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static UNNAMED: AtomicU64 = AtomicU64::new(0);
    let n = UNNAMED.fetch_add(1, Ordering::Relaxed);
    format!("tg-{now:x}-{n:x}")
}

/// Output tokens reserved when a request names no `max_tokens` (OpenAI makes
/// it optional). Settlement corrects it to the actual count.
pub const DEFAULT_OUTPUT_RESERVATION: u64 = 4_096;

/// While a stream is relayed, the provisional audit record is republished
/// once what the request would be charged if it ended now has moved by this
/// many tokens since the last publication (or its sources changed: the
/// provider's counts arrived). An early end is charged the last published
/// figures, so it is under-charged by fewer than this many estimated output
/// tokens. Each publication serialises the record (about 1 KB) and replaces
/// the filter state: about 32 tokens per publication keeps that to a few a
/// second at provider speeds.
pub const REPUBLISH_TOKENS: u64 = 32;

/// ... or by any amount, when this much stream time has passed since the
/// last publication: a slow stream's record is never older than this at
/// its last chunk.
pub const REPUBLISH_MS: u64 = 200;

/// Non-streamed response bodies are copied (not buffered by Envoy) up to this
/// size to read `usage`; beyond it the reservation is charged.
pub const MAX_JSON_RESPONSE: usize = 8 << 20;

/// The environment variable the filter reads its VM options from when the
/// VM configuration is empty. Istio's `WasmPlugin` (`vmConfig.env`) and
/// Envoy Gateway's `EnvoyExtensionPolicy` (`env.hostKeys`) can hand the VM
/// environment variables (WASI `environ_get`) but never set
/// `vm_config.configuration`, so this is how shared limits reach a filter
/// they deliver.
pub const VM_OPTIONS_ENV: &str = "TOLLGATE_VM_OPTIONS";

/// Deployment options that are not policy (read from the VM configuration,
/// or from [`VM_OPTIONS_ENV`] where a control plane cannot set it).
#[derive(Debug, Clone, Copy)]
pub struct FilterOptions {
    /// Whether request headers are held until the body decision. Needs Envoy's
    /// `allow_on_headers_stop_iteration: true`, without which pausing at the
    /// headers stops this filter's body callbacks (ABI 0.2). When false the
    /// headers go upstream at once and a denial resets the upstream request.
    pub hold_request_headers: bool,
    /// Buckets shared by every replica through the quota service (Redis);
    /// `None`: this Envoy's shared data only.
    pub shared: Option<SharedOptions>,
}

impl Default for FilterOptions {
    fn default() -> Self {
        FilterOptions {
            hold_request_headers: true,
            shared: None,
        }
    }
}

#[derive(Debug, Default)]
struct Response {
    status: u16,
    stream: bool,
    /// Content-encoding other than identity: usage cannot be read.
    encoded: bool,
    sse: Option<StreamUsage>,
    /// A `GET /v1/models` list held to its end to be cut to the allowlist.
    models_list: bool,
    /// Set when Tollgate added `include_usage` for a client that did not ask.
    strip: Option<usage::inject::UsageChunkStripper>,
    body: Vec<u8>,
    truncated: bool,
}

/// How a request's charge is worked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The response is complete: the provider's usage, else the
    /// reservation (or nothing for an upstream error).
    Complete,
    /// If it ended now: input from the provider's count when it arrived,
    /// else the input estimate reserved; output from the provider's count
    /// when it arrived, else estimated from the text relayed so far.
    Early,
}

/// Where the figures of a charge came from (input, output), and the token
/// total they add up to: what tells when a provisional record is due again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Mark {
    tokens: u64,
    sources: Option<(TokenSource, TokenSource)>,
}

/// The last provisional record published: Envoy's access loggers read it
/// if the request ends early, and the buckets are then settled with its
/// demand.
#[derive(Debug, Clone, Copy, Default)]
struct Published {
    demand: Demand,
    mark: Mark,
    at_ms: u64,
}

/// Where a request stands. Each callback acts on the phase it finds and
/// moves it on; what a phase needs travels inside it.
#[derive(Debug)]
enum Phase {
    /// Before the request headers' decision.
    Start,
    /// The key is accepted; the body buffers until the admission decision.
    Authenticated { key: usize },
    /// Paused for a synchronous admission by the shared store.
    Admitting {
        key: usize,
        demand: Demand,
        body_size: usize,
        request: Vec<u8>,
        since: u64,
        /// Whether the call was already repeated once after a failure.
        retried: bool,
    },
    /// Held for a limit to refill (`max_wait_ms`) instead of a 429; the
    /// host retries it from its timer ([`RequestFlow::on_wait_tick`]).
    Waiting {
        key: usize,
        demand: Demand,
        body_size: usize,
        /// When the refusing bucket should have room again.
        until: u64,
        /// The bucket it waits for, so later requests queue behind it.
        bucket: String,
    },
    /// Forwarded upstream with its reservations, which the end of the
    /// response settles.
    Admitted { key: usize, admission: Admission },
    /// Answered by Tollgate, or settled and finally audited: later callbacks
    /// pass everything through.
    Done,
}

pub struct RequestFlow {
    policy: Rc<Policy>,
    options: FilterOptions,
    phase: Phase,
    route: Route,
    /// `GET /v1/models/{id}`: the model asked about.
    model_asked: Option<String>,
    info: RequestInfo,
    response: Response,
    audit: AuditRecord,
    /// SHA-256 of the presented virtual key, once identified.
    key_sha256: Option<[u8; 32]>,
    /// Whether the record has been published (and numbered) once.
    published: bool,
    /// What the admission under way asks for, should it have to wait.
    pending: Option<(Demand, usize)>,
    /// When a held request must be answered, from its first hold.
    hold_deadline: Option<u64>,
    /// The last provisional record, which an early end is charged.
    provisional: Published,
    /// The rungs of the ladder this request took ([`ladder`]).
    ladder: ladder::Ladder,
    /// The session pools whose header this request carries ([`sessions`]).
    sessions: Vec<sessions::Session>,
}

impl RequestFlow {
    pub fn new(policy: Rc<Policy>) -> RequestFlow {
        RequestFlow::with_options(policy, FilterOptions::default())
    }

    pub fn with_options(policy: Rc<Policy>, options: FilterOptions) -> RequestFlow {
        RequestFlow {
            policy,
            options,
            phase: Phase::Start,
            route: Route::Other,
            model_asked: None,
            info: RequestInfo::default(),
            response: Response::default(),
            audit: AuditRecord {
                schema: SCHEMA_VERSION,
                ..Default::default()
            },
            key_sha256: None,
            published: false,
            pending: None,
            hold_deadline: None,
            provisional: Published::default(),
            ladder: ladder::Ladder::default(),
            sessions: Vec::new(),
        }
    }

    /// Headers are held only when the deployment can (VM option) and the
    /// policy does not say otherwise (Istio's WasmPlugin cannot hold).
    fn holds_headers(&self) -> bool {
        self.options.hold_request_headers && self.policy.settings.hold_request_headers
    }

    fn provider(&self) -> Provider {
        self.route.provider()
    }

    fn clock(&self, now: u64) -> Clock {
        Clock {
            now,
            utc_offset_min: self.policy.settings.utc_offset_minutes,
        }
    }

    /// The authenticated key's position in the policy, in the phases that have one.
    fn key_index(&self) -> Option<usize> {
        match self.phase {
            Phase::Authenticated { key }
            | Phase::Admitting { key, .. }
            | Phase::Waiting { key, .. }
            | Phase::Admitted { key, .. } => Some(key),
            Phase::Start | Phase::Done => None,
        }
    }

    pub fn on_request_headers(&mut self, host: &mut impl Host, end_of_stream: bool) -> Decision {
        let now = host.now_ms();
        let headers = host.request_headers();
        let path = header(&headers, ":path").unwrap_or_default();
        let method = header(&headers, ":method").unwrap_or_default();
        let family = Provider::models_family(&headers);
        let bad_path = match Route::classify(method, path, family) {
            Ok(target) => {
                self.route = target.route;
                self.audit.model_requested = target.model.clone();
                self.model_asked = target.model;
                None
            }
            Err(e) => Some(e),
        };
        self.audit.timestamp_ms = now;
        self.audit.route = self.route.name().to_string();
        self.audit.provider = self.provider().name().to_string();
        self.audit.request_id = header(&headers, "x-request-id")
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_else(|| fallback_request_id(now));

        let presented = vkey::presented(&headers);
        // The virtual key never goes upstream, whatever happens next.
        // Compressed responses would hide `usage`: drop accept-encoding so
        // the provider answers in identity. One host call per header present.
        for name in ["x-api-key", "authorization", "accept-encoding"] {
            if header(&headers, name).is_some() {
                host.set_request_header(name, None);
            }
        }
        let policy = self.policy.clone();
        let secret = match self.identify(host, &policy, presented) {
            Ok(secret) => secret,
            Err(refusal) => return self.refuse(host, refusal, &[]),
        };
        let key = secret.key;
        self.find_sessions(&policy, key, &headers);
        // From here the caller is known: refusals carry its bucket states.
        let bad_path = bad_path.map(|error| Refusal::BadPath {
            path: String::from_utf8_lossy(path).into_owned(),
            error,
        });
        // The key's own state first: a revoked or expired key is refused as
        // such whichever of its secrets is presented.
        let valid = |k: &Key| k.check_valid(now).and_then(|()| secret.check_valid(now));
        let mesh = self.audit.identified_by.is_some_and(|m| m != Method::Key);
        let refusal = match policy.key(key).map(|k| {
            let v = valid(&k);
            (k, v)
        }) {
            Some((k, Err(KeyRefusal::Revoked))) if mesh => {
                Some(Refusal::RevokedIdentity { id: k.id.clone() })
            }
            Some((k, Err(KeyRefusal::Expired(at_ms)))) if mesh => Some(Refusal::ExpiredIdentity {
                id: k.id.clone(),
                at_ms,
            }),
            Some((_, Err(KeyRefusal::Revoked))) => Some(Refusal::RevokedKey),
            Some((_, Err(KeyRefusal::Expired(at_ms)))) => Some(Refusal::ExpiredKey { at_ms }),
            Some((_, Err(KeyRefusal::SecretRotated(at_ms)))) => Some(Refusal::RotatedKey { at_ms }),
            // Revoked through the shared store: every replica learns it
            // within a sync period, before the policy file reaches it.
            Some((_, Ok(())))
                if self.options.shared.is_some() && self.revoked_everywhere(host, key) =>
            {
                Some(Refusal::RevokedKey)
            }
            _ if bad_path.is_some() => bad_path,
            _ if self.route == Route::Other
                && policy.settings.unknown_routes == UnknownRoutes::Deny =>
            {
                let path = String::from_utf8_lossy(path).into_owned();
                Some(Refusal::UnknownRoute { path })
            }
            _ if end_of_stream && self.route.is_llm() => Some(Refusal::BodyRequired),
            Some((key, Ok(()))) => self.model_not_listed(&key),
            None => None,
        };
        self.phase = Phase::Authenticated { key };
        if let Some(refusal) = refusal {
            let states = self.states_now(host);
            return self.refuse(host, refusal, &states);
        }
        if end_of_stream {
            return self.admit(host, Demand::one_request(), 0);
        }
        // Nothing is published yet: the body usually follows in the same
        // read, and its decision publishes. A request that stops before
        // then is published where it stops ([`Self::publish_waiting`]).
        if self.holds_headers() {
            Decision::Pause
        } else {
            Decision::Continue
        }
    }

    /// The presented secret and its key's position in the policy; the
    /// audit record then carries the key's identity (its one id, whichever
    /// of its secrets was presented), whatever is decided next.
    ///
    /// A virtual key, when one is presented, decides alone: the caller chose
    /// it, and falling back to the mesh on an unknown key would bill some
    /// other identity for it. Without one, the policy's identities are
    /// tried in file order against what the mesh says of the caller
    /// ([`crate::mesh`]).
    fn identify(
        &mut self,
        host: &impl Host,
        policy: &Policy,
        presented: Presented,
    ) -> Result<Secret, Refusal> {
        let hash = match presented {
            Presented::Key(hash) => hash,
            Presented::Missing => return self.identify_from_mesh(host, policy),
            Presented::Conflicting => return Err(Refusal::ConflictingKeys),
        };
        let secret = match policy.resolve(host, &hash) {
            Ok(Some(secret)) => secret,
            Ok(None) => return Err(Refusal::UnknownKey),
            Err(_) => return Err(Refusal::KeysUnavailable),
        };
        let key = policy.key(secret.key).ok_or(Refusal::UnknownKey)?;
        self.key_sha256 = Some(hash);
        self.fill_identity(&key);
        self.audit.identified_by = Some(Method::Key);
        Ok(secret)
    }

    /// The first identity the mesh's evidence matches. A caller the mesh
    /// vouches for but no identity names is refused as an unknown key is,
    /// naming the principal it came with; with no evidence at all, the key
    /// is missing.
    fn identify_from_mesh(&mut self, host: &impl Host, policy: &Policy) -> Result<Secret, Refusal> {
        if policy.identities().is_empty() {
            return Err(Refusal::MissingKey);
        }
        let evidence = mesh::Evidence::read(host, policy);
        let Some(found) = mesh::identify(policy, &evidence) else {
            let principal = evidence.describe().ok_or(Refusal::MissingKey)?;
            self.audit.principal = Some(principal.clone());
            return Err(Refusal::UnknownIdentity { principal });
        };
        let caller = policy.key(found.caller).ok_or(Refusal::UnknownKey)?;
        self.fill_identity(&caller);
        self.audit.identified_by = Some(found.method);
        self.audit.principal = Some(found.principal);
        Ok(Secret {
            key: found.caller,
            not_after_ms: None,
        })
    }

    fn fill_identity(&mut self, key: &Key) {
        let id = &key.identity;
        let a = &mut self.audit;
        a.key_id = Some(key.id.clone());
        a.user = id.user.clone();
        a.team = id.team.clone();
        a.project = id.project.clone();
        a.app = id.app.clone();
        a.agent = id.agent.clone();
        a.environment = id.environment.clone();
        a.cost_center = id.cost_center.clone();
        a.groups = id.groups.clone();
    }

    pub fn on_request_body(
        &mut self,
        host: &mut impl Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Decision {
        let Phase::Authenticated { key } = self.phase else {
            return Decision::Continue;
        };
        if !end_of_stream {
            // Keep buffering: the decision needs the whole body.
            self.publish_waiting(host);
            return Decision::Pause;
        }
        if !self.route.is_llm() {
            return self.admit(host, Demand::one_request(), body_size);
        }
        let body = host.request_body(body_size).unwrap_or_default();
        let demand = match self.inspect(&body, key) {
            Ok(demand) => demand,
            Err(refusal) => {
                let states = self.states_now(host);
                return self.refuse(host, refusal, &states);
            }
        };
        let decision = self.admit(host, demand, body_size);
        if decision == Decision::Continue {
            self.prepare_upstream(host, body);
        }
        decision
    }

    /// Whether the key's record says it was revoked through the shared store.
    fn revoked_everywhere(&self, host: &impl Host, key: usize) -> bool {
        self.policy.key(key).is_some_and(|k| {
            shared::revoked(host, &meter::record::store_key(&format!("key:{}", k.id)))
        })
    }

    /// Reads the body, checks the model, and works out what the request
    /// reserves in each kind of bucket.
    fn inspect(&mut self, body: &[u8], key: usize) -> Result<Demand, Refusal> {
        let info =
            usage::inspect_request(self.route, body).map_err(|e| Refusal::InvalidBody(e.0))?;
        self.audit.stream = info.stream;
        self.audit.model_requested = info.model.clone();
        self.info = info;
        let model = self.info.model.clone().ok_or(Refusal::ModelMissing)?;
        let policy = self.policy.clone();
        let key = policy.key(key).ok_or(Refusal::UnknownKey)?;
        if !key.models.allows(&model) {
            return Err(Refusal::ModelNotAllowed {
                model,
                allowed: key.models.describe(),
            });
        }
        if self.route == Route::AnthropicCountTokens {
            // Counting tokens takes nothing from any bucket (docs/metering.md).
            return Ok(Demand::none());
        }
        let price = policy.price(&model);
        if price.is_none() && meter::budget_applies(&policy, &key) {
            return Err(Refusal::UnpricedModel { model });
        }
        let input = self.info.input_estimate;
        let output = self.info.max_tokens.unwrap_or(DEFAULT_OUTPUT_RESERVATION);
        self.audit.tokens.input_estimated = input;
        self.audit.tokens.output_reserved = output;
        let usd = price.map_or(0.0, |p| {
            p.cost(&Usage {
                input,
                output,
                ..Default::default()
            })
        });
        Ok(Demand {
            requests: 1.0,
            input_tokens: input as f64,
            output_tokens: output as f64,
            all_tokens: (input + output) as f64,
            usd,
        })
    }

    /// OpenAI chat streams carry usage only if asked: ask on the client's
    /// behalf. The body grows, so content-length is rewritten; that is only
    /// possible while the headers are held (otherwise they already left and
    /// the reservation is charged instead, see docs/metering.md).
    fn ask_for_stream_usage(&mut self, host: &mut impl Host, body: &[u8]) {
        if self.route != Route::OpenAiChat
            || !self.info.stream
            || self.info.include_usage == Some(true)
        {
            return;
        }
        if !self.holds_headers() {
            return;
        }
        if let Some(new_body) = usage::inject::include_usage(body) {
            host.replace_request_body(&new_body);
            host.set_request_header(
                "content-length",
                Some(new_body.len().to_string().as_bytes()),
            );
            self.response.strip = Some(usage::inject::UsageChunkStripper::default());
        }
    }

    /// Publishes the record, once, when a request waits before its
    /// decision (for the rest of its body, a refill, the quota service):
    /// a request that ends there (a client that goes away, Envoy's own 413
    /// over the buffer limit) is then audited with its identity, and the
    /// collector adds Envoy's status. A request decided in its first body
    /// callback, the usual case, publishes only its decision.
    fn publish_waiting(&mut self, host: &mut impl Host) {
        if !self.published {
            self.publish(host);
        }
    }

    /// Publishes the record. The first publication numbers it in this
    /// worker VM's audit stream (no host call after the VM's first): a
    /// number is taken only by a request whose record
    /// Envoy will log, so a number the collector never sees is a lost
    /// record, and the final record keeps the same number.
    fn publish(&mut self, host: &mut impl Host) {
        if !self.published {
            self.published = true;
            let (id, start) = (&self.audit.request_id, self.audit.timestamp_ms);
            self.audit.origin = host.next_origin(&|| Origin::propose_envoy(id, start));
            if self.audit.origin.is_none() {
                host.stat(Stat::CasExhausted, 1);
            }
        }
        host.set_audit_record(&self.audit.to_json());
    }

    /// Every bucket the request touches: its key's, and from the body
    /// decision on the provider pools of its model.
    fn buckets(&self) -> Vec<meter::Bucket> {
        let Some(key) = self.key_index().and_then(|i| self.policy.key(i)) else {
            return Vec::new();
        };
        let mut out = meter::buckets_for(&self.policy, &key, self.info.model.as_deref());
        out.extend(self.session_buckets(&key));
        self.ladder.apply(out, self.options.shared.is_some())
    }

    /// The key's buckets as they stand, for the headers of a refusal that
    /// came before admission (a bad body, a model outside the allowlist).
    fn states_now(&self, host: &impl Host) -> Vec<BucketState> {
        meter::states(host, &self.buckets(), self.clock(host.now_ms()))
    }

    /// Checks the demand against every bucket and reserves it: in shared
    /// data alone, or with a shared store from this Envoy's leases, else
    /// through a synchronous `Admit` (the request pauses for its answer).
    fn admit(&mut self, host: &mut impl Host, demand: Demand, body_size: usize) -> Decision {
        let Phase::Authenticated { key } = self.phase else {
            return Decision::Continue;
        };
        let now = host.now_ms();
        let clock = self.clock(now);
        if let Err(refusal) = self.track_sessions(host, clock) {
            return self.refuse(host, refusal, &[]);
        }
        let buckets = self.buckets();
        self.pending = Some((demand, body_size));
        // Requests held for a bucket go first, in arrival order: a new one
        // that may wait for that bucket queues behind them.
        if self.hold_deadline.is_none() {
            if let Some(b) = buckets
                .iter()
                .find(|b| b.max_wait_ms.is_some() && host.held_for(&b.label()))
            {
                let deadline = now + b.max_wait_ms.unwrap_or(0);
                if let Some(d) = self.hold(host, key, b.label(), now, deadline) {
                    return d;
                }
            }
        }
        let Some(opts) = self.options.shared else {
            let result = meter::admit(host, &buckets, &demand, clock);
            return self.admitted(host, key, result);
        };
        let ctx = shared::Ctx {
            plane: &*host,
            clock,
            opts,
        };
        let plan = shared::admit(
            ctx,
            &buckets,
            &demand,
            &self.audit.request_id,
            &self.key_hash(key),
        );
        match plan {
            Ok(Plan::Admitted(admission)) => self.admitted(host, key, Ok(admission)),
            Ok(Plan::Remote(request)) => {
                host.stat(Stat::RemoteAdmits, 1);
                match host.call_quota(QuotaMethod::Admit, &request, opts.admit_timeout_ms) {
                    Ok(()) => {
                        self.publish_waiting(host);
                        self.phase = Phase::Admitting {
                            key,
                            demand,
                            body_size,
                            request,
                            since: now,
                            retried: false,
                        };
                        Decision::Pause
                    }
                    Err(_) => self.remote_answer(host, key, demand, None),
                }
            }
            Err(denial) => self.admitted(host, key, Err(denial)),
        }
    }

    /// The SHA-256 the shared store knows a key by (for its revocation
    /// list): the hash of the key this request presented.
    fn key_hash(&self, _key: usize) -> Vec<u8> {
        self.key_sha256.map(|h| h.to_vec()).unwrap_or_default()
    }

    /// The quota service answered a call of this request (`None`: the call
    /// failed or timed out). For the synchronous admission the request
    /// paused for, returns what the host does next: resume it, or answer
    /// it; `None` for an answer nothing waits for (a settlement's).
    pub fn on_quota_response(
        &mut self,
        host: &mut impl Host,
        response: Option<&[u8]>,
    ) -> Option<Decision> {
        if !matches!(self.phase, Phase::Admitting { .. }) {
            return None;
        }
        // A failed call is repeated once: Admit is idempotent by request id,
        // and with several quota replicas the repeat goes to another one
        // (round robin), so one replica's death costs a round trip, not the
        // request's admission.
        if let (
            None,
            Phase::Admitting {
                request,
                retried: retried @ false,
                ..
            },
        ) = (response, &mut self.phase)
        {
            let timeout = self.options.shared.map_or(0, |o| o.admit_timeout_ms);
            if host
                .call_quota(QuotaMethod::Admit, request, timeout)
                .is_ok()
            {
                *retried = true;
                return Some(Decision::Pause);
            }
        }
        let Phase::Admitting {
            key,
            demand,
            body_size,
            since,
            ..
        } = std::mem::replace(&mut self.phase, Phase::Done)
        else {
            return None;
        };
        self.phase = Phase::Authenticated { key };
        host.stat(
            Stat::RemoteAdmitRttMs,
            host.now_ms().saturating_sub(since) as i64,
        );
        let decision = self.remote_answer(host, key, demand, response);
        if decision == Decision::Continue && self.route.is_llm() {
            if let Some(body) = host.request_body(body_size) {
                self.prepare_upstream(host, body);
            }
        }
        Some(decision)
    }

    fn remote_answer(
        &mut self,
        host: &mut impl Host,
        key: usize,
        demand: Demand,
        response: Option<&[u8]>,
    ) -> Decision {
        let Some(opts) = self.options.shared else {
            return Decision::Continue;
        };
        if response.is_none() {
            host.stat(Stat::RemoteAdmitFailed, 1);
        }
        let clock = self.clock(host.now_ms());
        let buckets = self.buckets();
        let replicas = crate::sync::replicas(host);
        let ctx = shared::Ctx {
            plane: &*host,
            clock,
            opts,
        };
        let result = shared::on_admit_response(ctx, &buckets, &demand, replicas, response);
        match result {
            Ok(admission) => {
                if admission
                    .reservations
                    .iter()
                    .any(|r| r.source == Source::Fallback)
                {
                    host.stat(Stat::FallbackAdmits, 1);
                }
                self.admitted(host, key, Ok(admission))
            }
            Err(RemoteRefusal::Limited(denial)) => self.admitted(host, key, Err(denial)),
            Err(RemoteRefusal::Revoked) => {
                let states = self.states_now(host);
                self.refuse(host, Refusal::RevokedKey, &states)
            }
            Err(RemoteRefusal::Unavailable(bucket)) => {
                self.refuse(host, Refusal::StoreUnavailable { bucket }, &[])
            }
        }
    }

    /// The outcome of an admission: forward the request with its
    /// reservations, or refuse it.
    fn admitted(
        &mut self,
        host: &mut impl Host,
        key: usize,
        result: Result<Admission, Denial>,
    ) -> Decision {
        match result {
            Ok(admission) => {
                self.release_hold(host);
                let uncounted = admission
                    .reservations
                    .iter()
                    .any(|r| r.source == Source::Uncounted);
                self.phase = Phase::Admitted { key, admission };
                self.audit.decision = Outcome::Allowed;
                self.audit.reason = if uncounted {
                    Reason::Uncounted
                } else {
                    Reason::Ok
                };
                self.publish_provisional(host);
                host.stat(Stat::Decision(self.audit.reason), 1);
                host.stat(Stat::ReservationsOutstanding, 1);
                Decision::Continue
            }
            Err(Denial::Limited {
                bucket,
                wait_ms,
                states,
            }) => {
                if let Some(d) = self.climb(host, key, &bucket, &states) {
                    return d;
                }
                if let Some(max) = bucket.max_wait_ms {
                    let now = host.now_ms();
                    let deadline = self.hold_deadline.unwrap_or(now + max);
                    if now + wait_ms <= deadline {
                        if let Some(d) =
                            self.hold(host, key, bucket.label(), now + wait_ms, deadline)
                        {
                            return d;
                        }
                    }
                }
                self.release_hold(host);
                self.refuse(host, Refusal::Limited { bucket, wait_ms }, &states)
            }
            Err(Denial::Contention) => {
                self.release_hold(host);
                host.stat(Stat::CasExhausted, 1);
                let states = self.states_now(host);
                self.refuse(host, Refusal::Contention, &states)
            }
        }
    }

    /// Holds the request until `until` (at most `deadline`) for `bucket` to
    /// refill, if the host has room for one more; `None` when it has not.
    fn hold(
        &mut self,
        host: &mut impl Host,
        key: usize,
        bucket: String,
        until: u64,
        deadline: u64,
    ) -> Option<Decision> {
        let (demand, body_size) = self.pending?;
        if self.hold_deadline.is_none() {
            if !host.may_hold() {
                return None;
            }
            host.stat(Stat::Held, 1);
        }
        self.hold_deadline = Some(deadline);
        self.publish_waiting(host);
        self.phase = Phase::Waiting {
            key,
            demand,
            body_size,
            until,
            bucket,
        };
        Some(Decision::Pause)
    }

    /// A held request leaves the queue (admitted, refused or gone).
    fn release_hold(&mut self, host: &mut impl Host) {
        if self.hold_deadline.take().is_some() {
            host.stat(Stat::Held, -1);
        }
    }

    /// When a held request should be retried, and the bucket it waits for.
    pub fn held(&self) -> Option<(u64, &str)> {
        match &self.phase {
            Phase::Waiting { until, bucket, .. } => Some((*until, bucket.as_str())),
            _ => None,
        }
    }

    /// The host's timer, for a held request whose time has come: admits it
    /// (the host resumes it), refuses it past its deadline (the host answers
    /// it), or keeps it held (`None`). With a shared store the retry may
    /// pause for a synchronous admission instead (`Some(Pause)`).
    pub fn on_wait_tick(&mut self, host: &mut impl Host) -> Option<Decision> {
        let Phase::Waiting {
            key,
            demand,
            body_size,
            until,
            ..
        } = self.phase
        else {
            return None;
        };
        if host.now_ms() < until {
            return None;
        }
        self.phase = Phase::Authenticated { key };
        let decision = self.admit(host, demand, body_size);
        if matches!(self.phase, Phase::Waiting { .. }) {
            return None;
        }
        if decision == Decision::Continue {
            self.release_hold(host);
            host.stat(Stat::HeldAdmitted, 1);
            if self.route.is_llm() {
                if let Some(body) = host.request_body(body_size) {
                    self.prepare_upstream(host, body);
                }
            }
        }
        Some(decision)
    }

    /// Answers the client in its provider's error shape, with the caller's
    /// bucket states as rate-limit headers, and audits the refusal.
    fn refuse(
        &mut self,
        host: &mut impl Host,
        refusal: Refusal,
        states: &[BucketState],
    ) -> Decision {
        let message = refusal.message();
        let mut reply = error_reply(
            self.provider(),
            refusal.kind(),
            &message,
            &self.audit.request_id,
            refusal.retry_after_s(),
        );
        let now = host.now_ms();
        reply.headers.extend(
            rate_limit_headers(self.provider(), states, now)
                .into_iter()
                .map(|(n, v)| (n.to_string(), v)),
        );
        let reason = refusal.reason();
        self.audit.decision = Outcome::Denied;
        self.audit.reason = reason;
        self.audit.detail = Some(message);
        self.audit.status = reply.status;
        self.audit.bucket = refusal.bucket();
        self.audit.complete = true;
        self.audit.latency_ms = Some(now.saturating_sub(self.audit.timestamp_ms));
        self.publish(host);
        host.stat(Stat::Decision(reason), 1);
        self.phase = Phase::Done;
        Decision::Reply(reply)
    }

    pub fn on_response_headers(&mut self, host: &mut impl Host, end_of_stream: bool) -> Decision {
        if matches!(self.phase, Phase::Done) {
            return Decision::Continue;
        }
        let headers = host.response_headers();
        let status = header(&headers, ":status")
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        self.response.status = status;
        self.response.stream = header(&headers, "content-type").is_some_and(|ct| {
            ct.windows(17)
                .any(|w| w.eq_ignore_ascii_case(b"text/event-stream"))
        });
        self.response.encoded = header(&headers, "content-encoding")
            .is_some_and(|e| !e.eq_ignore_ascii_case(b"identity"));
        if self.response.stream {
            self.response.sse = Some(StreamUsage::new(self.route));
        }
        // The provider's headroom, read before the caller's own headers
        // replace the provider's in the same names.
        headroom::observe(
            host,
            &self.policy,
            self.provider(),
            self.info.model.as_deref(),
            &headers,
        );
        if let Phase::Admitted { admission, .. } = &self.phase {
            // As of the admission (when the provisional record was
            // published): no clock read in this callback, and a reset
            // shown a response's duration early is still a true bound.
            let ours =
                rate_limit_headers(self.provider(), &admission.states, self.provisional.at_ms);
            if !ours.is_empty() {
                // One host call for all of them (a dozen single-header
                // calls were a third of an allowed request's host calls):
                // the whole map goes back, ours in place of the provider's
                // headers of the same names.
                let mut all = headers;
                all.retain(|(n, _)| !ours.iter().any(|(o, _)| n.eq_ignore_ascii_case(o)));
                all.extend(
                    ours.into_iter()
                        .map(|(n, v)| (n.to_string(), v.into_bytes())),
                );
                host.set_response_headers(&all);
            }
            if let Some(d) = &self.audit.downgrade {
                host.set_response_header(ladder::DOWNGRADED_FROM, Some(d.from.as_bytes()));
            }
        }
        if end_of_stream {
            self.finish(host);
            return Decision::Continue;
        }
        // A compressed answer's text cannot be counted as it passes: should
        // it end early, it is charged the output reserved, and the record
        // Envoy's loggers may read must say so now.
        if self.response.encoded && matches!(self.phase, Phase::Admitted { .. }) {
            self.publish_provisional(host);
        }
        self.hold_models_list(host)
    }

    pub fn on_response_body(
        &mut self,
        host: &mut impl Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Decision {
        if matches!(self.phase, Phase::Done) {
            return Decision::Continue;
        }
        if self.response.models_list {
            return self.rewrite_models_list(host, body_size, end_of_stream);
        }
        let mut streamed = false;
        if !self.response.encoded && (body_size > 0 || end_of_stream) {
            if let Some(chunk) = host.response_body(body_size) {
                match &mut self.response.sse {
                    Some(sse) => {
                        sse.feed(&chunk);
                        streamed = true;
                        if let Some(strip) = &mut self.response.strip {
                            if let Some(out) = strip.filter(&chunk, end_of_stream) {
                                if out != chunk {
                                    host.replace_response_body(&out);
                                }
                            }
                        }
                    }
                    None if self.response.body.len() + chunk.len() <= MAX_JSON_RESPONSE => {
                        self.response.body.extend_from_slice(&chunk)
                    }
                    None => self.response.truncated = true,
                }
            }
        }
        if end_of_stream {
            self.finish(host);
        } else if streamed {
            self.republish_if_due(host);
        }
        Decision::Continue
    }

    /// The stream ended without a complete response (client abort, upstream
    /// reset, idle timeout). Envoy's access loggers have already read the
    /// last provisional record (they run before the filter's `on_log`), so
    /// the reservations are settled with exactly the figures it carries.
    pub fn on_end(&mut self, host: &mut impl Host) {
        if !self.published && !matches!(self.phase, Phase::Start) {
            host.stat(Stat::EndedUnpublished, 1);
        }
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Admitted { admission, .. } => {
                let charged = self.provisional.demand;
                self.settle(host, &admission, &charged);
            }
            // The client left while Redis was deciding: if it admitted, the
            // leader gives everything back (the Admit is idempotent, so the
            // leader's repeat learns the first answer).
            Phase::Admitting { request, .. } => host.enqueue(Queue::Cancel, &request),
            // Held and gone: nothing was taken, nothing to give back.
            Phase::Waiting { .. } => self.release_hold(host),
            _ => {}
        }
    }

    /// The response is complete: settle and publish the final record.
    fn finish(&mut self, host: &mut impl Host) {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Admitted { admission, .. } => {
                let now = host.now_ms();
                self.audit.latency_ms = Some(now.saturating_sub(self.audit.timestamp_ms));
                let charged = self.charge(host, End::Complete);
                self.settle(host, &admission, &charged);
            }
            Phase::Authenticated { .. } if self.response.status == 413 => {
                // Envoy refused the body (over the buffer limit) before this
                // filter could decide: the request was denied, not served.
                self.audit.decision = Outcome::Denied;
                self.audit.reason = Reason::BodyTooLarge;
                self.audit.detail = Some(
                    "request body over the gateway's buffer limit (refused by Envoy)".to_string(),
                );
            }
            _ => {}
        }
        self.audit.complete = true;
        self.audit.status = self.response.status;
        self.publish(host);
    }

    /// Publishes the provisional record with what the request is charged if
    /// it ends now, and remembers it: an early end settles with it.
    fn publish_provisional(&mut self, host: &mut impl Host) {
        let demand = self.charge(host, End::Early);
        self.provisional = Published {
            demand,
            mark: self.early_mark(),
            at_ms: host.now_ms(),
        };
        self.audit.complete = false;
        self.publish(host);
    }

    /// After a stream chunk: republishes the provisional record when its
    /// figures are due ([`REPUBLISH_TOKENS`], [`REPUBLISH_MS`]).
    fn republish_if_due(&mut self, host: &mut impl Host) {
        if !matches!(self.phase, Phase::Admitted { .. }) {
            return;
        }
        let mark = self.early_mark();
        let last = self.provisional;
        let moved = mark.tokens.abs_diff(last.mark.tokens);
        let due = mark.sources != last.mark.sources
            || moved >= REPUBLISH_TOKENS
            || (moved > 0 && host.now_ms().saturating_sub(last.at_ms) >= REPUBLISH_MS);
        if due {
            self.publish_provisional(host);
        }
    }

    /// The token total and sources an early end would charge now.
    fn early_mark(&self) -> Mark {
        match self.early_counts() {
            Some((u, input, output)) => Mark {
                tokens: u.total(),
                sources: Some((input, output)),
            },
            None => Mark::default(),
        }
    }

    /// What an early end charges, by class, and where input and output came
    /// from; `None` on routes that charge no tokens. The provider's tier and
    /// region are left out (they cost an allocation per chunk).
    fn early_counts(&self) -> Option<(Usage, TokenSource, TokenSource)> {
        if !self.route.is_llm() || self.route == Route::AnthropicCountTokens {
            return None;
        }
        let sse = self.response.sse.as_ref();
        let reported = sse.map(StreamUsage::reported).unwrap_or_default();
        let seen = sse.and_then(StreamUsage::usage);
        let mut u = Usage {
            web_search_requests: seen.map_or(0, |s| s.web_search_requests),
            ..Usage::default()
        };
        let input = match seen {
            Some(s) if reported.input => {
                u.input = s.input;
                u.cache_write = s.cache_write;
                u.cache_write_1h = s.cache_write_1h;
                u.cache_read = s.cache_read;
                TokenSource::Provider
            }
            _ => {
                u.input = self.audit.tokens.input_estimated;
                TokenSource::Reservation
            }
        };
        let output = match seen {
            Some(s) if reported.output => {
                u.output = s.output;
                u.reasoning = s.reasoning;
                TokenSource::Provider
            }
            // A compressed answer's text cannot be read: what was reserved.
            _ if self.response.encoded => {
                u.output = self.audit.tokens.output_reserved;
                TokenSource::Reservation
            }
            // Only the text the client was sent: nothing before the first
            // delta (a non-streamed answer cut in its body is charged no
            // output: its count is at the end of the body).
            _ => {
                u.output = sse.map_or(0, StreamUsage::relayed_tokens);
                TokenSource::Estimate
            }
        };
        Some((u, input, output))
    }

    /// Settles every reservation with what the request is charged.
    fn settle(&mut self, host: &mut impl Host, admission: &Admission, actual: &Demand) {
        host.stat(Stat::ReservationsOutstanding, -1);
        let clock = self.clock(host.now_ms());
        let settled = match self.options.shared {
            None => meter::settle(host, &admission.reservations, actual, clock),
            Some(opts) => shared::settle(
                shared::Ctx {
                    plane: &*host,
                    clock,
                    opts,
                },
                &admission.reservations,
                actual,
                &self.audit.request_id,
            )
            .map(|settle| {
                // Sent now as well as queued for the leader: the Settle is
                // idempotent, and the copy that arrives second changes
                // nothing. Its answer is not awaited.
                if let Some(message) = settle {
                    let _ = host.call_quota(QuotaMethod::Settle, &message, opts.admit_timeout_ms);
                }
            }),
        };
        if settled.is_err() {
            host.stat(Stat::CasExhausted, 1);
            log::warn!(
                "tollgate: settlement of {} hit shared-data contention",
                self.audit.request_id
            );
        }
    }

    /// What the request is charged, as it ended or if it ended now, written
    /// into the audit record (tokens by class, where each came from, the
    /// price): the demand the buckets are settled with.
    fn charge(&mut self, host: &mut impl Host, end: End) -> Demand {
        let seen = match &self.response.sse {
            Some(sse) => {
                if let Some(m) = sse.model() {
                    if self.audit.model_served.as_deref() != Some(m) {
                        self.audit.model_served = Some(m.to_string());
                    }
                }
                sse.usage().cloned()
            }
            None if end == End::Complete
                && !self.response.body.is_empty()
                && !self.response.truncated =>
            {
                usage::parse_json_usage(self.route, &self.response.body).map(|(u, model)| {
                    self.audit.model_served = model;
                    u
                })
            }
            None => None,
        };
        if self.route == Route::AnthropicCountTokens {
            return Demand::none();
        }
        if !self.route.is_llm() {
            return Demand::one_request();
        }
        // The provider's own refusal (429: its rate limit, 529: overloaded)
        // served nothing: nothing is charged, not even the request, so a
        // client retrying after `retry-after` is not also refused by
        // Tollgate for requests the provider never served.
        if end == End::Complete && seen.is_none() {
            if let Some(reason) = Reason::of_upstream_status(self.response.status) {
                self.audit.reason = reason;
                host.stat(Stat::Decision(reason), 1);
                self.record_charge(None);
                return Demand::none();
            }
        }
        let charged = match (end, seen) {
            (End::Early, seen) => self.early_counts().map(|(mut u, input, output)| {
                if let Some(s) = seen {
                    u.service_tier = s.service_tier;
                    u.inference_geo = s.inference_geo;
                }
                (u, input, output)
            }),
            (End::Complete, Some(u)) => Some((u, TokenSource::Provider, TokenSource::Provider)),
            // An upstream error without usage consumed nothing: refund.
            (End::Complete, None) if self.response.status >= 400 => None,
            // Success without readable usage: charge the reservation.
            (End::Complete, None) => {
                host.stat(Stat::UsageUnreadable, 1);
                self.audit.detail = Some(if self.response.encoded {
                    "response was compressed; charged the reservation".to_string()
                } else {
                    "no usage in response; charged the reservation".to_string()
                });
                let reserved = Usage {
                    input: self.audit.tokens.input_estimated,
                    output: self.audit.tokens.output_reserved,
                    ..Default::default()
                };
                Some((reserved, TokenSource::Reservation, TokenSource::Reservation))
            }
        };
        self.record_charge(charged)
    }

    /// Writes a charge into the audit record and returns its demand;
    /// `None` charges one request and no tokens, and clears what a
    /// provisional record said.
    fn record_charge(&mut self, charged: Option<(Usage, TokenSource, TokenSource)>) -> Demand {
        let count_cache_reads = self.policy.settings.cache_reads_count_toward_input_limit;
        let Some((u, input_source, output_source)) = charged else {
            let t = &mut self.audit.tokens;
            (
                t.input,
                t.output,
                t.cache_write,
                t.cache_write_1h,
                t.cache_read,
            ) = (None, None, None, None, None);
            (t.reasoning, t.web_search_requests) = (None, None);
            (t.input_source, t.output_source) = (None, None);
            let a = &mut self.audit;
            (a.cost_usd, a.price_multiplier, a.long_context) = (None, None, None);
            return Demand::one_request();
        };
        let t = &mut self.audit.tokens;
        t.input = Some(u.input);
        t.output = Some(u.output);
        t.cache_write = Some(u.cache_write);
        t.cache_write_1h = Some(u.cache_write_1h);
        t.cache_read = Some(u.cache_read);
        t.reasoning = Some(u.reasoning);
        t.web_search_requests = Some(u.web_search_requests);
        t.input_source = Some(input_source);
        t.output_source = Some(output_source);
        let policy = self.policy.clone();
        let quote = self.price_in(&policy).map(|p| p.quote(&u));
        let a = &mut self.audit;
        a.cost_usd = quote.map(|q| q.usd);
        a.price_multiplier = quote.map(|q| q.multiplier);
        a.long_context = quote.map(|q| q.long_context);
        a.service_tier = u.service_tier.clone();
        a.inference_geo = u.inference_geo.clone();
        Demand {
            requests: 1.0,
            input_tokens: u.input_for_limit(count_cache_reads) as f64,
            output_tokens: u.output as f64,
            all_tokens: u.total() as f64,
            usd: a.cost_usd.unwrap_or(0.0),
        }
    }

    /// The price of the model that served the request (else the one asked
    /// for) in a policy.
    fn price_in<'p>(&self, policy: &'p Policy) -> Option<&'p Price> {
        // The model sent upstream (a downgrade's) before the one asked for.
        let model = self
            .audit
            .model_served
            .as_deref()
            .or(self.info.model.as_deref())
            .or(self.audit.model_requested.as_deref())?;
        policy.price(model)
    }

    /// The audit record as it stands (for the filter's logs and tests).
    pub fn audit(&self) -> &AuditRecord {
        &self.audit
    }

    pub fn tokens(&self) -> &Tokens {
        &self.audit.tokens
    }
}

/// Turns a local reply into header pairs for hosts that need `&str`s.
pub fn reply_headers(reply: &LocalReply) -> Vec<(&str, &str)> {
    reply
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect()
}

#[cfg(test)]
mod cost_tests;
#[cfg(test)]
mod hold_tests;
#[cfg(test)]
mod identity_tests;
#[cfg(test)]
mod ladder_tests;
#[cfg(test)]
mod tests;
