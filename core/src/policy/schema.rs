//! The policy's shape, written once as data. The same definition drives the
//! validator (every error with its JSON path, value and reason, not just the
//! first) and the JSON Schema in `policies/schema.json` for editors, so the
//! two cannot drift apart.

use super::leaf;
use crate::meter::{Measure, Metric, METRICS};
use serde_json::{json, Map, Value};

/// What a JSON value must be.
#[derive(Debug)]
pub enum Ty {
    Object(&'static [Field]),
    /// An object whose keys are names chosen by the user.
    Map {
        key: Leaf,
        value: &'static Ty,
    },
    Array(&'static Ty),
    /// Alert thresholds: an array of [`Leaf::AlertThreshold`], each listed
    /// once and in increasing order, at most [`leaf::MAX_ALERTS`].
    Alerts,
    Leaf(Leaf),
    /// A limit: its amount alone (`amount`, a leaf), or an object
    /// (`settings`) with the amount under `limit` and how it behaves.
    Limit {
        amount: &'static Ty,
        settings: &'static Ty,
    },
}

/// A field of an object.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: &'static str,
    pub ty: &'static Ty,
    pub required: bool,
    pub doc: &'static str,
}

/// Scalar rules. Each is checked where the value stands, so a bad glob or date
/// is reported at its own path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    Bool,
    Text,
    /// Exact name or glob with `*` and `?`.
    ModelPattern,
    Sha256Hex,
    Rfc3339,
    TimeZone,
    /// A count per minute or per day: whole, positive.
    PositiveCount,
    /// USD amounts of budgets: positive.
    PositiveUsd,
    /// USD per million tokens: zero or more.
    Price,
    /// USD per 1,000 web searches: zero or more.
    PerThousand,
    /// A multiplier of the list price: positive.
    Multiplier,
    /// A prompt size in tokens: whole, positive.
    Threshold,
    /// `<kind>:<value>` pool name.
    PoolName,
    /// `provider:<provider>:<group>` provider pool name.
    ProviderPoolName,
    PolicyVersion,
    UnknownRoutes,
    /// `local`, `closed` or `open`.
    StoreFailure,
    /// `batch`, `normal`, `interactive` or 0..=100.
    Priority,
    /// Strictly between 0 and 1.
    Fraction,
    /// Whole milliseconds, 1..=60,000.
    WaitMs,
    /// `"block"`, `{"downgrade_to": MODEL}` or `{"throttle": FRACTION}`.
    OnExhausted,
    /// A request header name: lower case, no spaces.
    HeaderName,
    /// How many values a session pool tracks: whole, 1..=1,000,000.
    MaxTracked,
    /// A fraction of a limit in (0, 1.5].
    AlertThreshold,
    /// `spiffe://<trust domain>/<path>`, globs allowed.
    SpiffePattern,
    /// A JWT claim's value, globs allowed.
    ClaimPattern,
}

const fn field(name: &'static str, ty: &'static Ty, doc: &'static str) -> Field {
    Field {
        name,
        ty,
        required: false,
        doc,
    }
}

const fn required(name: &'static str, ty: &'static Ty, doc: &'static str) -> Field {
    Field {
        name,
        ty,
        required: true,
        doc,
    }
}

static BOOL: Ty = Ty::Leaf(Leaf::Bool);
static TEXT: Ty = Ty::Leaf(Leaf::Text);
static COUNT: Ty = Ty::Leaf(Leaf::PositiveCount);
static USD: Ty = Ty::Leaf(Leaf::PositiveUsd);
static PRICE_AMOUNT: Ty = Ty::Leaf(Leaf::Price);
static MODEL_LIST: Ty = Ty::Array(&Ty::Leaf(Leaf::ModelPattern));
static TEXT_LIST: Ty = Ty::Array(&TEXT);

/// The `limits` object: one field per row of the metric table, a count or
/// a USD amount as the row's measure says, alone or with its settings.
pub static LIMITS: Ty = Ty::Object(&LIMIT_FIELDS);

static LIMIT_FIELDS: [Field; Metric::COUNT + 1] = limit_fields();

/// The `alerts` field of a limits object.
const ALERTS_FIELD: Field = field(
    "alerts",
    &Ty::Alerts,
    "Fractions of each daily or monthly quota and budget here (tokens_per_day, budget_usd_per_day, budget_usd_per_month; not per-minute limits) at which the collector sends one webhook event per window, e.g. [0.5, 0.8, 1.0]; increasing, each in (0, 1.5]. A key without its own takes its first group's that has one, else the defaults'; [] turns them off.",
);

static COUNT_LIMIT: Ty = Ty::Limit {
    amount: &COUNT,
    settings: &Ty::Object(&limit_settings(&COUNT)),
};
static USD_LIMIT: Ty = Ty::Limit {
    amount: &USD,
    settings: &Ty::Object(&limit_settings(&USD)),
};

static RESERVE: Ty = Ty::Object(&[
    required(
        "fraction",
        &Ty::Leaf(Leaf::Fraction),
        "Share of the limit kept for higher priorities (0.2: the last 20%).",
    ),
    field(
        "for",
        &Ty::Leaf(Leaf::Priority),
        "Requests below this priority may not use the reserve (default interactive).",
    ),
]);

const fn limit_settings(amount: &'static Ty) -> [Field; 7] {
    [
        required("limit", amount, "The limit's amount."),
        field(
            "strict",
            &BOOL,
            "With a shared store (Redis): admit every request through it, never from a local lease (exact, one round trip).",
        ),
        field(
            "on_store_failure",
            &Ty::Leaf(Leaf::StoreFailure),
            "With a shared store, when it cannot be reached: \"local\" (limit / replicas, default for per-minute limits), \"closed\" (503, default for quotas and budgets) or \"open\".",
        ),
        field(
            "max_wait_ms",
            &Ty::Leaf(Leaf::WaitMs),
            "Hold a request that would fit within this many ms (in arrival order) instead of answering 429.",
        ),
        field(
            "reserve",
            &RESERVE,
            "Headroom kept for higher priorities: {\"fraction\": 0.2, \"for\": \"interactive\"}.",
        ),
        field(
            "shadow",
            &BOOL,
            "Decide and audit would_deny, but admit anyway (still debited, so the limit reports true use): for rolling out a new limit.",
        ),
        field(
            "on_exhausted",
            &Ty::Leaf(Leaf::OnExhausted),
            "What a request this limit would refuse gets: \"block\" (429, default), {\"downgrade_to\": MODEL} (served by that cheaper model, admitted past this limit) or {\"throttle\": FRACTION} (admitted from an overflow bucket of FRACTION x the limit, same window).",
        ),
    ]
}

// Const evaluation: `i < Metric::COUNT` bounds both arrays, and an
// out-of-bounds index would fail the build, not a request.
#[allow(clippy::indexing_slicing)]
const fn limit_fields() -> [Field; Metric::COUNT + 1] {
    let mut out = [ALERTS_FIELD; Metric::COUNT + 1];
    let mut i = 0;
    while i < Metric::COUNT {
        let spec = &METRICS[i];
        let ty = match spec.measure {
            Measure::Usd => &USD_LIMIT,
            _ => &COUNT_LIMIT,
        };
        out[i] = field(spec.field, ty, spec.doc);
        i += 1;
    }
    out
}

static PRICE: Ty = Ty::Object(&[
    required("input", &PRICE_AMOUNT, "USD per million input tokens."),
    required("output", &PRICE_AMOUNT, "USD per million output tokens (reasoning and thinking tokens are output)."),
    field(
        "cache_write",
        &PRICE_AMOUNT,
        "USD per million 5-minute cache-write tokens, and of writes whose lifetime the provider does not report (default 1.25 x input).",
    ),
    field(
        "cache_write_1h",
        &PRICE_AMOUNT,
        "USD per million 1-hour cache-write tokens (Anthropic cache_creation.ephemeral_1h_input_tokens; default 2 x input).",
    ),
    field(
        "cache_read",
        &PRICE_AMOUNT,
        "USD per million cache-read tokens (default 0.1 x input).",
    ),
    field(
        "web_search_per_thousand",
        &Ty::Leaf(Leaf::PerThousand),
        "USD per 1,000 web searches (Anthropic server_tool_use.web_search_requests, OpenAI web_search_call items; default 10).",
    ),
    field(
        "long_context",
        &LONG_CONTEXT,
        "Prices of the whole request once its prompt (input + cache writes + cache reads) exceeds above_input_tokens.",
    ),
    field(
        "tiers",
        &MULTIPLIERS,
        "Multiplier of token costs by the service_tier the response reports, e.g. {\"batch\": 0.5, \"priority\": 2}.",
    ),
    field(
        "regions",
        &MULTIPLIERS,
        "Multiplier of token costs by the inference_geo the response reports, e.g. {\"us\": 1.1}.",
    ),
]);

static MULTIPLIERS: Ty = Ty::Map {
    key: Leaf::Text,
    value: &Ty::Leaf(Leaf::Multiplier),
};

static LONG_CONTEXT: Ty = Ty::Object(&[
    required(
        "above_input_tokens",
        &Ty::Leaf(Leaf::Threshold),
        "Prompt tokens (input + cache writes + cache reads) above which these prices apply to the whole request.",
    ),
    required("input", &PRICE_AMOUNT, "USD per million input tokens."),
    required("output", &PRICE_AMOUNT, "USD per million output tokens."),
    field(
        "cache_write",
        &PRICE_AMOUNT,
        "USD per million 5-minute cache-write tokens (default: the base ratio to input).",
    ),
    field(
        "cache_write_1h",
        &PRICE_AMOUNT,
        "USD per million 1-hour cache-write tokens (default: the base ratio to input).",
    ),
    field(
        "cache_read",
        &PRICE_AMOUNT,
        "USD per million cache-read tokens (default: the base ratio to input).",
    ),
]);

static DEFAULTS: Ty = Ty::Object(&[
    field(
        "models",
        &MODEL_LIST,
        "Models of keys whose groups list none.",
    ),
    field(
        "limits",
        &LIMITS,
        "Per-key limits when neither the key nor its groups set one.",
    ),
]);

static GROUP: Ty = Ty::Object(&[
    field(
        "models",
        &MODEL_LIST,
        "Models members may call (a key gets the union of its groups' lists).",
    ),
    field(
        "priority",
        &Ty::Leaf(Leaf::Priority),
        "Priority of members' requests (a key takes the highest of its groups').",
    ),
    field(
        "limits",
        &LIMITS,
        "Per-key limits for members (the most restrictive group wins).",
    ),
]);

static PROVIDER_POOL: Ty = Ty::Object(&[
    required(
        "models",
        &MODEL_LIST,
        "Models this limit applies to (exact names and aliases as the provider lists them, or globs).",
    ),
    required(
        "limits",
        &LIMITS,
        "The provider's limits on these models together: requests_per_minute, input_tokens_per_minute, output_tokens_per_minute (quotas and budgets belong to keys and pools).",
    ),
]);

/// A caller of the policy (a key, an identity): its own fields, then the
/// ones every caller has, in that order (the order unknown-field errors
/// list them in). `$what` names the caller in the shared fields' docs.
macro_rules! caller {
    ($what:literal, $priority:literal, [$($own:expr),* $(,)?]) => {
        Ty::Object(&[
            $($own,)*
            field("user", &TEXT, "User identity (also the pool user:<value>)."),
            field("team", &TEXT, "Team (pool team:<value>)."),
            field("project", &TEXT, "Project (pool project:<value>)."),
            field("app", &TEXT, "Application (pool app:<value>)."),
            field("agent", &TEXT, "Agent (pool agent:<value>)."),
            field("environment", &TEXT, "Environment, for audit."),
            field("cost_center", &TEXT, "Cost center, for audit."),
            field("groups", &TEXT_LIST, "Groups (defined under \"groups\")."),
            field("limits", &LIMITS, concat!("This ", $what, "'s own limits.")),
            field(
                "expires_at",
                &Ty::Leaf(Leaf::Rfc3339),
                concat!("RFC 3339 time after which the ", $what, " is refused."),
            ),
            field("revoked", &BOOL, concat!("Refuse this ", $what, ".")),
            field("priority", &Ty::Leaf(Leaf::Priority), $priority),
        ])
    };
}

static KEY: Ty = caller!(
    "key",
    "This key's priority: batch, normal (default), interactive, or 0-100; reserved headroom is kept for higher priorities.",
    [
    required(
        "id",
        &TEXT,
        "Stable identifier, shown in audit records and errors.",
    ),
    required(
        "key_sha256",
        &Ty::Leaf(Leaf::Sha256Hex),
        "SHA-256 (hex) of the virtual key; the key itself is never stored.",
    ),
    field(
        "previous",
        &Ty::Array(&PREVIOUS_SECRET),
        "Earlier secrets of this key, each refused from its not_after (tollgate key rotate keeps the old one through a grace period); audit records carry the one id.",
    ),
    ]
);

static PREVIOUS_SECRET: Ty = Ty::Object(&[
    required(
        "key_sha256",
        &Ty::Leaf(Leaf::Sha256Hex),
        "SHA-256 (hex) of the earlier virtual key.",
    ),
    required(
        "not_after",
        &Ty::Leaf(Leaf::Rfc3339),
        "RFC 3339 time from which this secret is refused (401 saying it was rotated).",
    ),
]);

static SESSION_POOL: Ty = Ty::Object(&[
    required(
        "header",
        &Ty::Leaf(Leaf::HeaderName),
        "The request header whose value names the session (lower case); requests without it are not limited by this pool.",
    ),
    required(
        "limits",
        &LIMITS,
        "Limits of each session (each distinct header value of each key).",
    ),
    field(
        "max_tracked",
        &Ty::Leaf(Leaf::MaxTracked),
        "How many sessions this Envoy tracks at once (default 10000): a new session takes a free or idle slot, never an active one's; none left: 429 session_pool_full.",
    ),
]);

/// The fields an identity shares with a key, after its matcher.
static IDENTITY: Ty = caller!(
    "identity",
    "This identity's priority: batch, normal (default), interactive, or 0-100.",
    [
    required(
        "id",
        &TEXT,
        "Stable identifier, shown in audit records (key_id) and errors; unique across keys and identities.",
    ),
    field(
        "spiffe",
        &Ty::Leaf(Leaf::SpiffePattern),
        "The mTLS peer's SPIFFE ID (its certificate's URI SAN, as Istio issues it), exact or a glob: spiffe://cluster.local/ns/billing/sa/*.",
    ),
    field(
        "jwt",
        &Ty::Map {
            key: Leaf::Text,
            value: &Ty::Leaf(Leaf::ClaimPattern),
        },
        "Claims of a JWT verified by Envoy's jwt_authn (payload_in_metadata), each exact or a glob; a list claim matches when one element does; every claim named must match: {\"iss\": \"https://idp.example.com\", \"groups\": \"finops\"}.",
    ),
    ]
);

static SETTINGS: Ty = Ty::Object(&[
    field(
        "unknown_routes",
        &Ty::Leaf(Leaf::UnknownRoutes),
        "\"deny\" (default, 404) or \"pass\" for paths outside the LLM APIs.",
    ),
    field(
        "cache_reads_count_toward_input_limit",
        &BOOL,
        "Count cache reads toward input tokens per minute (default false).",
    ),
    field(
        "time_zone",
        &Ty::Leaf(Leaf::TimeZone),
        "Zone of daily and monthly windows: UTC or a fixed offset such as +02:00.",
    ),
    field(
        "default_price",
        &PRICE,
        "Price of models neither \"prices\" nor the shipped price table (policies/prices.json) prices.",
    ),
    field(
        "hold_request_headers",
        &BOOL,
        "Hold request headers until the body decision (default true; false where the proxy cannot, e.g. Istio WasmPlugin).",
    ),
]);

pub static POLICY: Ty = Ty::Object(&[
    required(
        "version",
        &Ty::Leaf(Leaf::PolicyVersion),
        "Policy format version; 1.",
    ),
    field("defaults", &DEFAULTS, "Defaults for every key."),
    field(
        "groups",
        &Ty::Map {
            key: Leaf::Text,
            value: &GROUP,
        },
        "Groups by name.",
    ),
    field(
        "pools",
        &Ty::Map {
            key: Leaf::PoolName,
            value: &LIMITS,
        },
        "Shared limits by identity attribute (team:payments).",
    ),
    field(
        "provider_pools",
        &Ty::Map {
            key: Leaf::ProviderPoolName,
            value: &PROVIDER_POOL,
        },
        "The provider's own limits by model group (provider:anthropic:claude-sonnet-4), drawn from by every request for one of its models whatever the key; written by `tollgate limits pull`.",
    ),
    field(
        "session_pools",
        &Ty::Map {
            key: Leaf::Text,
            value: &SESSION_POOL,
        },
        "Pool templates keyed by a request header (x-claude-code-session-id): every distinct value of the header, per key, gets its own buckets from these limits.",
    ),
    field("keys", &Ty::Array(&KEY), "Virtual keys."),
    field(
        "identities",
        &Ty::Array(&IDENTITY),
        "Callers identified without a virtual key, by their mTLS peer's SPIFFE ID or a verified JWT's claims; the first entry that matches wins, and a virtual key, when presented, wins over all.",
    ),
    field(
        "prices",
        &Ty::Map {
            key: Leaf::ModelPattern,
            value: &PRICE,
        },
        "USD per million tokens by model pattern; overrides the shipped price table (policies/prices.json).",
    ),
    field("settings", &SETTINGS, "Gateway behaviour."),
]);

/// One problem found while walking the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub value: Option<String>,
    pub reason: String,
}

impl Problem {
    /// The problem as a [`PolicyError`] naming `file`.
    pub fn in_file(self, file: &str) -> super::error::PolicyError {
        super::error::PolicyError {
            file: file.to_string(),
            path: self.path,
            value: self.value,
            reason: self.reason,
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Compact JSON text of a value for messages, shortened if long.
pub fn show(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 80 {
        format!("{}…", text.chars().take(77).collect::<String>())
    } else {
        text
    }
}

pub fn join(path: &str, name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (path.is_empty(), plain) {
        (true, true) => name.to_string(),
        (false, true) => format!("{path}.{name}"),
        (_, false) => format!("{path}[{}]", Value::String(name.to_string())),
    }
}

/// Walks `v` against `ty`, pushing every problem.
pub fn check(v: &Value, ty: &Ty, path: &str, out: &mut Vec<Problem>) {
    let mut push = |path: String, value: Option<String>, reason: String| {
        out.push(Problem {
            path,
            value,
            reason,
        })
    };
    match ty {
        Ty::Object(fields) => {
            let Some(obj) = v.as_object() else {
                push(
                    path.to_string(),
                    Some(show(v)),
                    format!("expected an object, found {}", kind(v)),
                );
                return;
            };
            for (name, value) in obj {
                match fields.iter().find(|f| f.name == name) {
                    Some(f) => check(value, f.ty, &join(path, name), out),
                    None => {
                        let known: Vec<&str> = fields.iter().map(|f| f.name).collect();
                        out.push(Problem {
                            path: join(path, name),
                            value: None,
                            reason: format!(
                                "unknown field (expected one of: {})",
                                known.join(", ")
                            ),
                        });
                    }
                }
            }
            for f in fields
                .iter()
                .filter(|f| f.required && !obj.contains_key(f.name))
            {
                out.push(Problem {
                    path: path.to_string(),
                    value: None,
                    reason: format!("missing required field \"{}\"", f.name),
                });
            }
        }
        Ty::Map { key, value } => {
            let Some(obj) = v.as_object() else {
                push(
                    path.to_string(),
                    Some(show(v)),
                    format!("expected an object, found {}", kind(v)),
                );
                return;
            };
            for (name, item) in obj {
                let item_path = join(path, name);
                if let Err(reason) = leaf(&Value::String(name.clone()), *key) {
                    out.push(Problem {
                        path: item_path.clone(),
                        value: Some(show(&Value::String(name.clone()))),
                        reason,
                    });
                }
                check(item, value, &item_path, out);
            }
        }
        Ty::Array(item) => {
            let Some(arr) = v.as_array() else {
                push(
                    path.to_string(),
                    Some(show(v)),
                    format!("expected an array, found {}", kind(v)),
                );
                return;
            };
            for (i, x) in arr.iter().enumerate() {
                check(x, item, &format!("{path}[{i}]"), out);
            }
        }
        Ty::Leaf(rule) => {
            if let Err(reason) = leaf(v, *rule) {
                push(path.to_string(), Some(show(v)), reason);
            }
        }
        Ty::Alerts => {
            let Some(arr) = v.as_array() else {
                push(
                    path.to_string(),
                    Some(show(v)),
                    format!("expected an array, found {}", kind(v)),
                );
                return;
            };
            let before = out.len();
            for (i, x) in arr.iter().enumerate() {
                check(
                    x,
                    &Ty::Leaf(Leaf::AlertThreshold),
                    &format!("{path}[{i}]"),
                    out,
                );
            }
            // The order is only worth a word once every threshold is one.
            if out.len() > before {
                return;
            }
            let list: Vec<f64> = arr.iter().filter_map(Value::as_f64).collect();
            if let Err((at, reason)) = leaf::alerts(&list) {
                let (path, value) = match at.and_then(|i| Some((i, arr.get(i)?))) {
                    Some((i, x)) => (format!("{path}[{i}]"), show(x)),
                    None => (path.to_string(), show(v)),
                };
                out.push(Problem {
                    path,
                    value: Some(value),
                    reason,
                });
            }
        }
        Ty::Limit { amount, settings } => {
            let ty = if v.is_object() { settings } else { amount };
            check(v, ty, path, out);
        }
    }
}

/// Checks one scalar against its rule, with the same functions the typed
/// serde leaves call ([`leaf`]).
pub fn leaf(v: &Value, rule: Leaf) -> Result<(), String> {
    let text = |v: &Value| {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("expected a string, found {}", kind(v)))
    };
    let number = |v: &Value| {
        v.as_f64()
            .ok_or_else(|| format!("expected a number, found {}", kind(v)))
    };
    match rule {
        Leaf::Bool => v
            .as_bool()
            .map(|_| ())
            .ok_or_else(|| format!("expected true or false, found {}", kind(v))),
        Leaf::Text => leaf::text(&text(v)?),
        Leaf::ModelPattern => super::pattern::ModelPattern::parse(&text(v)?).map(|_| ()),
        Leaf::Sha256Hex => leaf::sha256(&text(v)?).map(|_| ()),
        Leaf::Rfc3339 => crate::time::parse_rfc3339(&text(v)?).map(|_| ()),
        Leaf::TimeZone => crate::time::parse_offset_minutes(&text(v)?).map(|_| ()),
        Leaf::PositiveCount => leaf::count(number(v)?).map(|_| ()),
        Leaf::PositiveUsd => leaf::usd(number(v)?).map(|_| ()),
        Leaf::Price => leaf::price(number(v)?).map(|_| ()),
        Leaf::PerThousand => leaf::per_thousand(number(v)?).map(|_| ()),
        Leaf::Multiplier => leaf::multiplier(number(v)?).map(|_| ()),
        Leaf::Threshold => leaf::threshold(number(v)?).map(|_| ()),
        Leaf::PoolName => leaf::pool_name(&text(v)?),
        Leaf::ProviderPoolName => leaf::provider_pool_name(&text(v)?),
        Leaf::PolicyVersion => match v.as_u64() {
            Some(n) => leaf::version(n).map(|_| ()),
            None => Err(format!("expected the number 1, found {}", kind(v))),
        },
        Leaf::UnknownRoutes => leaf::unknown_routes(&text(v)?).map(|_| ()),
        Leaf::StoreFailure => super::StoreFailure::parse(&text(v)?).map(|_| ()),
        Leaf::Priority => leaf::priority(v).map(|_| ()),
        Leaf::Fraction => leaf::fraction(number(v)?).map(|_| ()),
        Leaf::WaitMs => leaf::wait_ms(number(v)?).map(|_| ()),
        Leaf::OnExhausted => super::limits::OnExhausted::parse(v).map(|_| ()),
        Leaf::HeaderName => leaf::header_name(&text(v)?),
        Leaf::MaxTracked => leaf::max_tracked(number(v)?).map(|_| ()),
        Leaf::AlertThreshold => leaf::alert_threshold(number(v)?).map(|_| ()),
        Leaf::SpiffePattern => leaf::spiffe(&text(v)?).map(|_| ()),
        Leaf::ClaimPattern => leaf::claim(&text(v)?).map(|_| ()),
    }
}

/// The JSON Schema (draft 2020-12) of the policy, for editor completion.
pub fn json_schema() -> Value {
    let mut root = to_schema(&POLICY, "");
    // `include` exists in policy files only: the CLI merges the included
    // files before anything compiles, and a filter handed an `include`
    // refuses it as an unknown field. Editors should still accept it.
    if let Some(props) = root.get_mut("properties").and_then(Value::as_object_mut) {
        props.insert(
            "include".into(),
            json!({
                "type": "array",
                "items": { "type": "string", "minLength": 1 },
                "description": "Files (relative to this one) whose groups, pools, provider_pools and prices are merged into this policy by the tollgate CLI (e.g. provider-limits.json from `tollgate limits pull`); a name defined twice is an error."
            }),
        );
    }
    // An identity names exactly one way to recognise it; the shape walker
    // has no "one of these fields", so the rule is added here (and checked
    // with its path by `compile`).
    if let Some(item) = root.pointer_mut("/properties/identities/items") {
        if let Some(m) = item.as_object_mut() {
            m.insert(
                "oneOf".into(),
                json!([{ "required": ["spiffe"] }, { "required": ["jwt"] }]),
            );
        }
        if let Some(jwt) = item
            .pointer_mut("/properties/jwt")
            .and_then(Value::as_object_mut)
        {
            jwt.insert("minProperties".into(), json!(1));
        }
    }
    if let Some(obj) = root.as_object_mut() {
        obj.insert(
            "$schema".into(),
            json!("https://json-schema.org/draft/2020-12/schema"),
        );
        obj.insert(
            "$id".into(),
            json!("https://tollgate.dev/schema/policy-v1.json"),
        );
        obj.insert("title".into(), json!("Tollgate policy"));
    }
    root
}

fn to_schema(ty: &Ty, doc: &str) -> Value {
    let mut s = match ty {
        Ty::Object(fields) => {
            let mut props = Map::new();
            for f in fields.iter() {
                props.insert(f.name.to_string(), to_schema(f.ty, f.doc));
            }
            let req: Vec<&str> = fields
                .iter()
                .filter(|f| f.required)
                .map(|f| f.name)
                .collect();
            let mut o =
                json!({ "type": "object", "properties": props, "additionalProperties": false });
            if let (false, Some(m)) = (req.is_empty(), o.as_object_mut()) {
                m.insert("required".into(), json!(req));
            }
            o
        }
        Ty::Map { key, value } => {
            let mut o = json!({ "type": "object", "additionalProperties": to_schema(value, "") });
            if let (Some(p), Some(m)) = (leaf_schema(*key).get("pattern"), o.as_object_mut()) {
                m.insert("propertyNames".into(), json!({ "pattern": p }));
            }
            o
        }
        Ty::Array(item) => json!({ "type": "array", "items": to_schema(item, "") }),
        Ty::Leaf(rule) => leaf_schema(*rule),
        // JSON Schema cannot say "increasing"; unique and bounded it can.
        Ty::Alerts => json!({
            "type": "array",
            "items": leaf_schema(Leaf::AlertThreshold),
            "uniqueItems": true,
            "maxItems": leaf::MAX_ALERTS,
        }),
        Ty::Limit { amount, settings } => {
            json!({ "oneOf": [to_schema(amount, ""), to_schema(settings, "")] })
        }
    };
    if let (false, Some(m)) = (doc.is_empty(), s.as_object_mut()) {
        m.insert("description".into(), json!(doc));
    }
    s
}

fn leaf_schema(rule: Leaf) -> Value {
    match rule {
        Leaf::Bool => json!({ "type": "boolean" }),
        Leaf::Text => json!({ "type": "string", "minLength": 1, "pattern": "\\S" }),
        Leaf::ModelPattern => {
            json!({ "type": "string", "minLength": 1, "pattern": "^[^\\[\\]{}\\s]+$" })
        }
        Leaf::Sha256Hex => json!({ "type": "string", "pattern": "^[0-9a-fA-F]{64}$" }),
        Leaf::Rfc3339 => {
            json!({ "type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}([Tt ]\\d{2}:\\d{2}:\\d{2}(\\.\\d+)?([Zz]|[+-]\\d{2}:\\d{2}))?$" })
        }
        Leaf::TimeZone => {
            json!({ "type": "string", "pattern": "^(UTC|Z|Etc/UTC|[+-]\\d{2}:\\d{2})$" })
        }
        Leaf::PositiveCount | Leaf::Threshold => {
            json!({ "type": "integer", "exclusiveMinimum": 0, "maximum": 1e15 })
        }
        Leaf::PositiveUsd => json!({ "type": "number", "exclusiveMinimum": 0 }),
        Leaf::Price | Leaf::PerThousand => json!({ "type": "number", "minimum": 0 }),
        Leaf::Multiplier => json!({ "type": "number", "exclusiveMinimum": 0 }),
        Leaf::PoolName => {
            json!({ "type": "string", "pattern": "^(team|project|user|app|agent):.+$" })
        }
        Leaf::ProviderPoolName => {
            json!({ "type": "string", "pattern": "^provider:[^:\\s]+:\\S+$" })
        }
        Leaf::PolicyVersion => json!({ "const": 1 }),
        Leaf::UnknownRoutes => json!({ "enum": ["deny", "pass"] }),
        Leaf::StoreFailure => json!({ "enum": ["local", "closed", "open"] }),
        Leaf::Priority => json!({ "oneOf": [
            { "enum": ["batch", "normal", "interactive"] },
            { "type": "integer", "minimum": 0, "maximum": 100 }
        ] }),
        Leaf::Fraction => json!({ "type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1 }),
        Leaf::WaitMs => json!({ "type": "integer", "minimum": 1, "maximum": 60000 }),
        Leaf::OnExhausted => json!({ "oneOf": [
            { "const": "block" },
            { "type": "object", "properties": { "downgrade_to": { "type": "string", "pattern": "^[^*?\\s]+$" } },
              "required": ["downgrade_to"], "additionalProperties": false },
            { "type": "object", "properties": { "throttle": { "type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1 } },
              "required": ["throttle"], "additionalProperties": false }
        ] }),
        Leaf::HeaderName => json!({ "type": "string", "pattern": "^[a-z0-9!#$%&'*+.^_`|~-]+$" }),
        Leaf::MaxTracked => json!({ "type": "integer", "minimum": 1, "maximum": 1000000 }),
        Leaf::AlertThreshold => {
            json!({ "type": "number", "exclusiveMinimum": 0, "maximum": 1.5 })
        }
        Leaf::SpiffePattern => {
            json!({ "type": "string", "pattern": "^spiffe://[^/\\[\\]{}\\s\\x00-\\x1f\\x7f-\\x9f]+(/[^\\[\\]{}\\s\\x00-\\x1f\\x7f-\\x9f]*)?$" })
        }
        Leaf::ClaimPattern => {
            json!({ "type": "string", "minLength": 1, "pattern": "^[^\\[\\]{}\\x00-\\x1f\\x7f-\\x9f]+$" })
        }
    }
}
