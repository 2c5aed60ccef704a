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
//!    body or incrementally from the SSE stream (never buffered).
//! 4. End of response: settle reservations against actual usage, price it,
//!    publish the final audit record (before Envoy's access loggers run).

use crate::audit::{AuditRecord, Outcome, Reason, Tokens, SCHEMA_VERSION};
use crate::host::{header, Decision, Host, LocalReply, Stat};
use crate::meter::{self, Admission, BucketState, Clock, Demand, Denial, Metric};
use crate::policy::{KeyRefusal, Policy, Price, UnknownRoutes};
use crate::reply::{error_reply, ErrorKind};
use crate::route::{Provider, Route};
use crate::time::format_rfc3339;
use crate::usage::{self, RequestInfo, StreamUsage, Usage};
use crate::vkey::{self, Presented};
use std::rc::Rc;

/// Output tokens reserved when a request names no `max_tokens` (OpenAI makes
/// it optional). Settlement corrects it to the actual count.
pub const DEFAULT_OUTPUT_RESERVATION: u64 = 4_096;

/// Non-streamed response bodies are copied (not buffered by Envoy) up to this
/// size to read `usage`; beyond it the reservation is charged.
pub const MAX_JSON_RESPONSE: usize = 8 << 20;

/// Deployment options that are not policy (read from the VM configuration).
#[derive(Debug, Clone, Copy)]
pub struct FilterOptions {
    /// Whether request headers are held until the body decision. Needs Envoy's
    /// `allow_on_headers_stop_iteration: true`, without which pausing at the
    /// headers stops this filter's body callbacks (ABI 0.2). When false the
    /// headers go upstream at once and a denial resets the upstream request.
    pub hold_request_headers: bool,
}

impl Default for FilterOptions {
    fn default() -> Self {
        FilterOptions {
            hold_request_headers: true,
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
    /// Set when Tollgate added `include_usage` for a client that did not ask.
    strip: Option<usage::inject::UsageChunkStripper>,
    body: Vec<u8>,
    truncated: bool,
}

pub struct RequestFlow {
    policy: Rc<Policy>,
    options: FilterOptions,
    route: Route,
    key: Option<usize>,
    info: RequestInfo,
    admission: Option<Admission>,
    response: Response,
    audit: AuditRecord,
    /// Set once reservations are settled and the final record is published.
    finished: bool,
}

impl RequestFlow {
    pub fn new(policy: Rc<Policy>) -> RequestFlow {
        RequestFlow::with_options(policy, FilterOptions::default())
    }

    pub fn with_options(policy: Rc<Policy>, options: FilterOptions) -> RequestFlow {
        RequestFlow {
            policy,
            options,
            route: Route::Other,
            key: None,
            info: RequestInfo::default(),
            admission: None,
            response: Response::default(),
            audit: AuditRecord {
                schema: SCHEMA_VERSION,
                ..Default::default()
            },
            finished: false,
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

    pub fn on_request_headers(&mut self, host: &mut impl Host, end_of_stream: bool) -> Decision {
        let now = host.now_ms();
        let headers = host.request_headers();
        self.route = Route::classify(header(&headers, ":path").unwrap_or_default());
        self.audit.timestamp_ms = now;
        self.audit.route = self.route.name().to_string();
        self.audit.provider = self.provider().name().to_string();
        self.audit.request_id = header(&headers, "x-request-id")
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_else(|| format!("tg-{now:x}"));

        let presented = vkey::presented(&headers);
        // The virtual key never goes upstream, whatever happens next.
        // Compressed responses would hide `usage`: drop accept-encoding so
        // the provider answers in identity. One host call per header present.
        for name in ["x-api-key", "authorization", "accept-encoding"] {
            if header(&headers, name).is_some() {
                host.set_request_header(name, None);
            }
        }

        let hash = match presented {
            Presented::Key(hash) => hash,
            Presented::Missing => {
                return self.deny(host, ErrorKind::Unauthenticated, Reason::MissingKey,
                    "missing API key: send your Tollgate virtual key in x-api-key or Authorization: Bearer".to_string(), None, None);
            }
            Presented::Conflicting => {
                return self.deny(
                    host,
                    ErrorKind::Unauthenticated,
                    Reason::UnknownKey,
                    "x-api-key and Authorization carry different keys: send one virtual key"
                        .to_string(),
                    None,
                    None,
                );
            }
        };
        let Some(index) = self.policy.lookup_index(&hash) else {
            return self.deny(
                host,
                ErrorKind::Unauthenticated,
                Reason::UnknownKey,
                "invalid x-api-key".to_string(),
                None,
                None,
            );
        };
        self.key = Some(index);
        let policy = self.policy.clone();
        let Some(key) = policy.key(index) else {
            return self.deny(
                host,
                ErrorKind::Internal,
                Reason::NoPolicy,
                "key index out of range".to_string(),
                None,
                None,
            );
        };
        self.fill_identity(index);
        match key.check_valid(now) {
            Ok(()) => {}
            Err(KeyRefusal::Revoked) => {
                return self.deny(
                    host,
                    ErrorKind::Unauthenticated,
                    Reason::RevokedKey,
                    "this API key has been revoked".to_string(),
                    None,
                    None,
                );
            }
            Err(KeyRefusal::Expired(at)) => {
                let msg = format!("this API key expired at {}", format_rfc3339(at));
                return self.deny(
                    host,
                    ErrorKind::Unauthenticated,
                    Reason::ExpiredKey,
                    msg,
                    None,
                    None,
                );
            }
        }

        if self.route == Route::Other && policy.settings.unknown_routes == UnknownRoutes::Deny {
            let path = header(&headers, ":path")
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default();
            let msg = format!("{path} is not an LLM API route served by this gateway");
            return self.deny(
                host,
                ErrorKind::NotFound,
                Reason::UnknownRoute,
                msg,
                None,
                None,
            );
        }

        if end_of_stream {
            if self.route.is_llm() {
                return self.deny(
                    host,
                    ErrorKind::InvalidRequest,
                    Reason::InvalidRequest,
                    "request body is required".to_string(),
                    None,
                    None,
                );
            }
            let buckets = self.buckets();
            return self.admit(host, Demand::one_request(), &buckets);
        }
        // Published now so that a request that never reaches the body
        // decision (Envoy's own 413, a client that goes away) is still
        // audited with its identity; the collector adds Envoy's status.
        host.set_audit_record(&self.audit.to_json());
        if self.holds_headers() {
            Decision::Pause
        } else {
            Decision::Continue
        }
    }

    fn fill_identity(&mut self, index: usize) {
        let Some(key) = self.policy.key(index) else {
            return;
        };
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
        if self.finished || self.key.is_none() {
            return Decision::Continue;
        }
        if !end_of_stream {
            // Keep buffering: the decision needs the whole body.
            return Decision::Pause;
        }
        if !self.route.is_llm() {
            let buckets = self.buckets();
            return self.admit(host, Demand::one_request(), &buckets);
        }
        let body = host.request_body(body_size).unwrap_or_default();
        let info = match usage::inspect_request(self.route, &body) {
            Ok(info) => info,
            Err(e) => {
                return self.deny(
                    host,
                    ErrorKind::InvalidRequest,
                    Reason::InvalidRequest,
                    e.0,
                    None,
                    None,
                )
            }
        };
        self.audit.stream = info.stream;
        self.audit.model_requested = info.model.clone();
        self.info = info;
        let Some(model) = self.info.model.clone() else {
            return self.deny(
                host,
                ErrorKind::InvalidRequest,
                Reason::InvalidRequest,
                "model: field required".to_string(),
                None,
                None,
            );
        };
        let policy = self.policy.clone();
        let Some(key) = self.key.and_then(|i| policy.key(i)) else {
            return Decision::Continue;
        };
        if !key.models.allows(&model) {
            let msg = format!(
                "model {model} is not allowed for this key (allowed: {})",
                key.models.describe()
            );
            return self.deny(
                host,
                ErrorKind::ModelNotAllowed,
                Reason::ModelNotAllowed,
                msg,
                None,
                None,
            );
        }

        let buckets = self.buckets();
        let budgets = buckets
            .iter()
            .any(|b| matches!(b.metric, Metric::UsdPerDay | Metric::UsdPerMonth));
        if budgets && policy.price(&model).is_none() && self.route != Route::AnthropicCountTokens {
            let msg = format!(
                "model {model} has no price in the policy and a USD budget applies to this key; add it under \"prices\" or set settings.default_price"
            );
            return self.deny(
                host,
                ErrorKind::ModelNotAllowed,
                Reason::ModelNotAllowed,
                msg,
                None,
                None,
            );
        }
        let demand = if self.route == Route::AnthropicCountTokens {
            // Counting tokens costs a request, never tokens.
            Demand::one_request()
        } else {
            let input = self.info.input_estimate as f64;
            let output = self.info.max_tokens.unwrap_or(DEFAULT_OUTPUT_RESERVATION) as f64;
            let usd = policy.price(&model).map(|p| {
                cost(
                    &p,
                    &Usage {
                        input: input as u64,
                        output: output as u64,
                        ..Default::default()
                    },
                )
            });
            Demand {
                requests: 1.0,
                input_tokens: input,
                output_tokens: output,
                day_tokens: input + output,
                usd: usd.unwrap_or(0.0),
            }
        };
        self.audit.tokens.input_estimated = demand.input_tokens as u64;
        self.audit.tokens.output_reserved = demand.output_tokens as u64;
        let decision = self.admit(host, demand, &buckets);
        if decision == Decision::Continue {
            self.ask_for_stream_usage(host, &body);
        }
        decision
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

    /// Every bucket the authenticated key touches (computed once per request).
    fn buckets(&self) -> Vec<meter::Bucket> {
        self.key
            .and_then(|i| self.policy.key(i))
            .map(|key| meter::buckets_for(&self.policy, key))
            .unwrap_or_default()
    }

    fn admit(
        &mut self,
        host: &mut impl Host,
        demand: Demand,
        buckets: &[meter::Bucket],
    ) -> Decision {
        let now = host.now_ms();
        if self.key.is_none() {
            return Decision::Continue;
        }
        match meter::admit(host, buckets, &demand, self.clock(now)) {
            Ok(admission) => {
                self.admission = Some(admission);
                self.audit.decision = Outcome::Allowed;
                self.audit.reason = Reason::Ok;
                self.audit.complete = false;
                host.set_audit_record(&self.audit.to_json());
                host.stat(Stat::Decision(Reason::Ok), 1);
                host.stat(Stat::ReservationsOutstanding, 1);
                Decision::Continue
            }
            Err(Denial::Limited {
                bucket,
                wait_ms,
                states,
            }) => {
                let retry = wait_ms.div_ceil(1000).max(1);
                let quota = bucket.metric.is_quota();
                let unit = if matches!(bucket.metric, Metric::UsdPerDay | Metric::UsdPerMonth) {
                    "USD "
                } else {
                    ""
                };
                let msg = format!(
                    "{} limit of {unit}{} reached for {}; {} in {}s",
                    bucket.metric.name(),
                    trim_num(bucket.limit),
                    bucket.scope,
                    if quota { "resets" } else { "retry" },
                    retry
                );
                let (kind, reason) = match bucket.metric {
                    Metric::UsdPerDay | Metric::UsdPerMonth => {
                        (ErrorKind::QuotaExhausted, Reason::BudgetExhausted)
                    }
                    Metric::TokensPerDay => (ErrorKind::QuotaExhausted, Reason::QuotaExhausted),
                    _ => (ErrorKind::RateLimited, Reason::RateLimited),
                };
                self.admission = Some(Admission {
                    reservations: Vec::new(),
                    states,
                });
                self.deny(host, kind, reason, msg, Some(retry), Some(bucket.label()))
            }
            Err(Denial::Contention) => {
                host.stat(Stat::CasExhausted, 1);
                self.deny(
                    host,
                    ErrorKind::RateLimited,
                    Reason::StoreContention,
                    "rate limiter busy; retry shortly".to_string(),
                    Some(1),
                    None,
                )
            }
        }
    }

    fn deny(
        &mut self,
        host: &mut impl Host,
        kind: ErrorKind,
        reason: Reason,
        message: String,
        retry_after: Option<u64>,
        bucket: Option<String>,
    ) -> Decision {
        let mut reply = error_reply(
            self.provider(),
            kind,
            &message,
            &self.audit.request_id,
            retry_after,
        );
        let now = host.now_ms();
        let states = match (&self.admission, self.key.and_then(|i| self.policy.key(i))) {
            (Some(admission), _) => admission.states.clone(),
            // Refused before admission (bad body, model): still tell a known
            // caller where their buckets stand.
            (None, Some(_)) => meter::states(host, &self.buckets(), self.clock(now)),
            (None, None) => Vec::new(),
        };
        reply.headers.extend(
            rate_limit_headers(self.provider(), &states, now)
                .into_iter()
                .map(|(n, v)| (n.to_string(), v)),
        );
        self.audit.decision = Outcome::Denied;
        self.audit.reason = reason;
        self.audit.detail = Some(message);
        self.audit.status = reply.status;
        self.audit.bucket = bucket;
        self.audit.complete = true;
        self.audit.latency_ms = Some(host.now_ms().saturating_sub(self.audit.timestamp_ms));
        host.set_audit_record(&self.audit.to_json());
        host.stat(Stat::Decision(reason), 1);
        self.finished = true;
        Decision::Reply(reply)
    }

    pub fn on_response_headers(&mut self, host: &mut impl Host, end_of_stream: bool) -> Decision {
        if self.finished {
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
        if let Some(admission) = &self.admission {
            for (name, value) in
                rate_limit_headers(self.provider(), &admission.states, host.now_ms())
            {
                host.set_response_header(name, Some(value.as_bytes()));
            }
        }
        if end_of_stream {
            self.finish(host);
        }
        Decision::Continue
    }

    pub fn on_response_body(
        &mut self,
        host: &mut impl Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Decision {
        if self.finished {
            return Decision::Continue;
        }
        if !self.response.encoded && (body_size > 0 || end_of_stream) {
            if let Some(chunk) = host.response_body(body_size) {
                match &mut self.response.sse {
                    Some(sse) => {
                        sse.feed(&chunk);
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
        }
        Decision::Continue
    }

    /// The stream ended without a complete response (client abort, upstream
    /// reset). Reservations are settled against what was seen; the record
    /// published at request time (marked incomplete) stays the audit record.
    pub fn on_end(&mut self, host: &mut impl Host) {
        if self.finished {
            return;
        }
        self.settle(host, false);
        self.finished = true;
    }

    fn finish(&mut self, host: &mut impl Host) {
        if self.finished {
            return;
        }
        if self.admission.is_none() && self.response.status == 413 {
            // Envoy refused the body (over the buffer limit) before this
            // filter could decide: the request was denied, not served.
            self.audit.decision = Outcome::Denied;
            self.audit.reason = Reason::BodyTooLarge;
            self.audit.detail =
                Some("request body over the gateway's buffer limit (refused by Envoy)".to_string());
        }
        self.settle(host, true);
        self.audit.complete = true;
        self.audit.status = self.response.status;
        host.set_audit_record(&self.audit.to_json());
        self.finished = true;
    }

    /// Works out actual usage and settles every reservation.
    fn settle(&mut self, host: &mut impl Host, complete: bool) {
        let Some(admission) = self.admission.take() else {
            return;
        };
        host.stat(Stat::ReservationsOutstanding, -1);
        let now = host.now_ms();
        self.audit.latency_ms = Some(now.saturating_sub(self.audit.timestamp_ms));
        let seen = match &self.response.sse {
            Some(sse) => {
                if let Some(m) = sse.model() {
                    self.audit.model_served = Some(m.to_string());
                }
                sse.usage()
            }
            None if !self.response.body.is_empty() && !self.response.truncated => {
                usage::parse_json_usage(self.route, &self.response.body).map(|(u, model)| {
                    self.audit.model_served = model;
                    u
                })
            }
            None => None,
        };
        let reserved = Demand {
            requests: 1.0,
            input_tokens: self.audit.tokens.input_estimated as f64,
            output_tokens: self.audit.tokens.output_reserved as f64,
            day_tokens: (self.audit.tokens.input_estimated + self.audit.tokens.output_reserved)
                as f64,
            usd: 0.0,
        };
        let count_cache_reads = self.policy.settings.cache_reads_count_toward_input_limit;
        let actual = match seen {
            _ if self.route == Route::AnthropicCountTokens || !self.route.is_llm() => {
                Demand::one_request()
            }
            Some(u) => {
                let t = &mut self.audit.tokens;
                t.input = Some(u.input);
                t.output = Some(u.output);
                t.cache_write = Some(u.cache_write);
                t.cache_read = Some(u.cache_read);
                let usd = self.price().map(|p| cost(&p, &u));
                self.audit.cost_usd = usd;
                Demand {
                    requests: 1.0,
                    input_tokens: u.input_for_limit(count_cache_reads) as f64,
                    output_tokens: u.output as f64,
                    day_tokens: u.total() as f64,
                    usd: usd.unwrap_or(0.0),
                }
            }
            // An upstream error without usage consumed nothing: refund.
            None if complete && self.response.status >= 400 => Demand::one_request(),
            // Success (or an abort) without readable usage: charge the reservation.
            None => {
                host.stat(Stat::UsageUnreadable, 1);
                self.audit.detail = Some(if self.response.encoded {
                    "response was compressed; charged the reservation".to_string()
                } else {
                    "no usage in response; charged the reservation".to_string()
                });
                let usd = self.price().map(|p| {
                    cost(
                        &p,
                        &Usage {
                            input: self.audit.tokens.input_estimated,
                            output: self.audit.tokens.output_reserved,
                            ..Default::default()
                        },
                    )
                });
                Demand {
                    usd: usd.unwrap_or(0.0),
                    ..reserved
                }
            }
        };
        if meter::settle(host, &admission.reservations, &actual, self.clock(now)).is_err() {
            host.stat(Stat::CasExhausted, 1);
            log::warn!(
                "tollgate: settlement of {} hit shared-data contention",
                self.audit.request_id
            );
        }
    }

    fn price(&self) -> Option<Price> {
        let model = self
            .audit
            .model_served
            .as_deref()
            .or(self.audit.model_requested.as_deref())?;
        self.policy.price(model)
    }

    /// The audit record as it stands (for the filter's logs and tests).
    pub fn audit(&self) -> &AuditRecord {
        &self.audit
    }

    pub fn tokens(&self) -> &Tokens {
        &self.audit.tokens
    }
}

/// USD for a usage at a price (USD per million tokens of each class).
pub fn cost(p: &Price, u: &Usage) -> f64 {
    (u.input as f64 * p.input
        + u.output as f64 * p.output
        + u.cache_write as f64 * p.cache_write
        + u.cache_read as f64 * p.cache_read)
        / 1_000_000.0
}

fn trim_num(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{}", v as u64)
    } else {
        // Budgets such as 0.0005 USD keep their digits; no trailing zeros.
        let s = format!("{v:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Go-style duration as OpenAI prints it: `20ms`, `1s`, `6m0s`, `1h2m3s`.
fn go_duration(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms.div_ceil(1000);
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// Header names of one bucket: limit, remaining, reset.
type Names = [&'static str; 3];

/// Calendar quotas and budgets have no provider header; same shape, our own
/// prefix, on both route families.
const QUOTA_HEADERS: [(Metric, Names); 3] = [
    (
        Metric::TokensPerDay,
        [
            "tollgate-ratelimit-tokens-per-day-limit",
            "tollgate-ratelimit-tokens-per-day-remaining",
            "tollgate-ratelimit-tokens-per-day-reset",
        ],
    ),
    (
        Metric::UsdPerDay,
        [
            "tollgate-ratelimit-usd-per-day-limit",
            "tollgate-ratelimit-usd-per-day-remaining",
            "tollgate-ratelimit-usd-per-day-reset",
        ],
    ),
    (
        Metric::UsdPerMonth,
        [
            "tollgate-ratelimit-usd-per-month-limit",
            "tollgate-ratelimit-usd-per-month-remaining",
            "tollgate-ratelimit-usd-per-month-reset",
        ],
    ),
];

const ANTHROPIC_HEADERS: [(Metric, Names); 3] = [
    (
        Metric::Requests,
        [
            "anthropic-ratelimit-requests-limit",
            "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimit-requests-reset",
        ],
    ),
    (
        Metric::InputTokens,
        [
            "anthropic-ratelimit-input-tokens-limit",
            "anthropic-ratelimit-input-tokens-remaining",
            "anthropic-ratelimit-input-tokens-reset",
        ],
    ),
    (
        Metric::OutputTokens,
        [
            "anthropic-ratelimit-output-tokens-limit",
            "anthropic-ratelimit-output-tokens-remaining",
            "anthropic-ratelimit-output-tokens-reset",
        ],
    ),
];

const OPENAI_REQUEST_HEADERS: Names = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
];
const OPENAI_TOKEN_HEADERS: Names = [
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

/// The caller's own most restrictive bucket per metric, as the provider's
/// rate-limit headers. Names are static: only the values are formatted.
fn rate_limit_headers(
    provider: Provider,
    states: &[BucketState],
    now: u64,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(12);
    // One bucket as three headers: limit, remaining, reset.
    let mut push = |names: Names, values: [String; 3]| out.extend(names.into_iter().zip(values));
    let remaining = |s: &BucketState| s.view.remaining.max(0.0).floor().to_string();
    for (metric, names) in QUOTA_HEADERS {
        if let Some(s) = meter::most_restrictive(states, metric) {
            let left = if metric == Metric::TokensPerDay {
                remaining(s)
            } else {
                format!("{:.6}", s.view.remaining.max(0.0))
            };
            push(
                names,
                [
                    trim_num(s.bucket.limit),
                    left,
                    format_rfc3339(s.view.reset_at),
                ],
            );
        }
    }
    match provider {
        Provider::Anthropic => {
            for (metric, names) in ANTHROPIC_HEADERS {
                if let Some(s) = meter::most_restrictive(states, metric) {
                    push(
                        names,
                        [
                            trim_num(s.bucket.limit),
                            remaining(s),
                            format_rfc3339(s.view.reset_at.max(now)),
                        ],
                    );
                }
            }
        }
        Provider::OpenAi => {
            let tokens = [Metric::InputTokens, Metric::OutputTokens]
                .iter()
                .filter_map(|m| meter::most_restrictive(states, *m))
                .min_by(|a, b| {
                    (a.view.remaining / a.bucket.limit)
                        .total_cmp(&(b.view.remaining / b.bucket.limit))
                });
            for (s, names) in [
                (
                    meter::most_restrictive(states, Metric::Requests),
                    OPENAI_REQUEST_HEADERS,
                ),
                (tokens, OPENAI_TOKEN_HEADERS),
            ] {
                if let Some(s) = s {
                    push(
                        names,
                        [
                            trim_num(s.bucket.limit),
                            remaining(s),
                            go_duration(s.view.reset_at.saturating_sub(now)),
                        ],
                    );
                }
            }
        }
    }
    out
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
mod tests;
