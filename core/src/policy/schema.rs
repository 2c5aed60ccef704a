//! The policy's shape, written once as data. The same definition drives the
//! validator (every error with its JSON path, value and reason, not just the
//! first) and the JSON Schema in `policies/schema.json` for editors, so the
//! two cannot drift apart.

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
    Leaf(Leaf),
}

/// A field of an object.
#[derive(Debug)]
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
    /// `<kind>:<value>` pool name.
    PoolName,
    PolicyVersion,
    UnknownRoutes,
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

pub static LIMITS: Ty = Ty::Object(&[
    field(
        "requests_per_minute",
        &COUNT,
        "Requests per minute (token bucket, continuous refill).",
    ),
    field(
        "input_tokens_per_minute",
        &COUNT,
        "Input tokens per minute (input + cache writes; cache reads only if settings say so).",
    ),
    field(
        "output_tokens_per_minute",
        &COUNT,
        "Output tokens per minute; max_tokens is reserved up front.",
    ),
    field("tokens_per_day", &COUNT, "All tokens per calendar day."),
    field("budget_usd_per_day", &USD, "USD per calendar day."),
    field("budget_usd_per_month", &USD, "USD per calendar month."),
]);

static PRICE: Ty = Ty::Object(&[
    required("input", &PRICE_AMOUNT, "USD per million input tokens."),
    required("output", &PRICE_AMOUNT, "USD per million output tokens."),
    field(
        "cache_write",
        &PRICE_AMOUNT,
        "USD per million cache-write tokens (default 1.25 x input).",
    ),
    field(
        "cache_read",
        &PRICE_AMOUNT,
        "USD per million cache-read tokens (default 0.1 x input).",
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
        "limits",
        &LIMITS,
        "Per-key limits for members (the most restrictive group wins).",
    ),
]);

static KEY: Ty = Ty::Object(&[
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
    field("user", &TEXT, "User identity (also the pool user:<value>)."),
    field("team", &TEXT, "Team (pool team:<value>)."),
    field("project", &TEXT, "Project (pool project:<value>)."),
    field("app", &TEXT, "Application (pool app:<value>)."),
    field("agent", &TEXT, "Agent (pool agent:<value>)."),
    field("environment", &TEXT, "Environment, for audit."),
    field("cost_center", &TEXT, "Cost center, for audit."),
    field("groups", &TEXT_LIST, "Groups (defined under \"groups\")."),
    field("limits", &LIMITS, "This key's own limits."),
    field(
        "expires_at",
        &Ty::Leaf(Leaf::Rfc3339),
        "RFC 3339 time after which the key is refused.",
    ),
    field("revoked", &BOOL, "Refuse this key."),
]);

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
        "Price of models absent from \"prices\".",
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
    field("keys", &Ty::Array(&KEY), "Virtual keys."),
    field(
        "prices",
        &Ty::Map {
            key: Leaf::ModelPattern,
            value: &PRICE,
        },
        "USD per million tokens by model pattern.",
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

fn join(path: &str, name: &str) -> String {
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
    }
}

/// Checks one scalar against its rule.
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
        Leaf::Text => {
            let s = text(v)?;
            if s.trim().is_empty() {
                return Err("must not be empty".to_string());
            }
            Ok(())
        }
        Leaf::ModelPattern => super::pattern::ModelPattern::parse(&text(v)?).map(|_| ()),
        Leaf::Sha256Hex => {
            let s = text(v)?;
            if s.len() != 64 {
                return Err(format!(
                    "must be 64 hex characters (the SHA-256 of the virtual key), found {}",
                    s.len()
                ));
            }
            if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("must be 64 hex characters (the SHA-256 of the virtual key): contains a non-hex character".to_string());
            }
            Ok(())
        }
        Leaf::Rfc3339 => crate::time::parse_rfc3339(&text(v)?).map(|_| ()),
        Leaf::TimeZone => crate::time::parse_offset_minutes(&text(v)?).map(|_| ()),
        Leaf::PositiveCount => {
            let n = number(v)?;
            if n <= 0.0 {
                return Err(
                    "must be a positive whole number (omit the field for no limit)".to_string(),
                );
            }
            if n.fract() != 0.0 || n > 1e15 {
                return Err("must be a positive whole number".to_string());
            }
            Ok(())
        }
        Leaf::PositiveUsd => {
            if number(v)? <= 0.0 {
                return Err(
                    "must be a positive amount of USD (omit the field for no budget)".to_string(),
                );
            }
            Ok(())
        }
        Leaf::Price => {
            if number(v)? < 0.0 {
                return Err("must be a non-negative USD amount per million tokens".to_string());
            }
            Ok(())
        }
        Leaf::PoolName => {
            let s = text(v)?;
            match s.split_once(':') {
                Some((k, rest)) if super::POOL_KINDS.contains(&k) && !rest.is_empty() => Ok(()),
                _ => Err(format!(
                    "pool names are <kind>:<value> with kind one of {}",
                    super::POOL_KINDS.join(", ")
                )),
            }
        }
        Leaf::PolicyVersion => match v.as_u64() {
            Some(1) => Ok(()),
            Some(_) => Err("unsupported policy version (expected 1)".to_string()),
            None => Err(format!("expected the number 1, found {}", kind(v))),
        },
        Leaf::UnknownRoutes => match text(v)?.as_str() {
            "deny" | "pass" => Ok(()),
            _ => Err("must be \"deny\" or \"pass\"".to_string()),
        },
    }
}

/// The JSON Schema (draft 2020-12) of the policy, for editor completion.
pub fn json_schema() -> Value {
    let mut root = to_schema(&POLICY, "");
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
        Leaf::PositiveCount => json!({ "type": "integer", "exclusiveMinimum": 0, "maximum": 1e15 }),
        Leaf::PositiveUsd => json!({ "type": "number", "exclusiveMinimum": 0 }),
        Leaf::Price => json!({ "type": "number", "minimum": 0 }),
        Leaf::PoolName => {
            json!({ "type": "string", "pattern": "^(team|project|user|app|agent):.+$" })
        }
        Leaf::PolicyVersion => json!({ "const": 1 }),
        Leaf::UnknownRoutes => json!({ "enum": ["deny", "pass"] }),
    }
}

/// Whether a policy document conforms to [`POLICY`], decided in one
/// streaming pass with no JSON DOM: the fast path of `compile` for the
/// common case of a valid policy (a 100,000-key policy is a 12 MB document,
/// and building its DOM is most of the cost of loading it). The leaves are
/// checked by the same [`leaf`] rules as [`check`]; a document that does not
/// conform goes through [`check`] for its precise errors.
pub fn conforms(json: &[u8]) -> bool {
    let mut de = serde_json::Deserializer::from_slice(json);
    matches!(Conform(&POLICY).deserialize(&mut de), Ok(true)) && de.end().is_ok()
}

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A value checked against a [`Ty`] as it streams past; `Ok(false)` at the
/// first rule it breaks (the rest of the value is still consumed).
#[derive(Clone, Copy)]
struct Conform<'t>(&'t Ty);

impl Conform<'_> {
    fn scalar(self, v: Value) -> bool {
        matches!(self.0, Ty::Leaf(rule) if leaf(&v, *rule).is_ok())
    }
}

impl<'de> DeserializeSeed<'de> for Conform<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Conform<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a policy value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<bool, E> {
        Ok(self.scalar(Value::Bool(b)))
    }
    fn visit_i64<E>(self, n: i64) -> Result<bool, E> {
        Ok(self.scalar(Value::from(n)))
    }
    fn visit_u64<E>(self, n: u64) -> Result<bool, E> {
        Ok(self.scalar(Value::from(n)))
    }
    fn visit_f64<E>(self, n: f64) -> Result<bool, E> {
        Ok(self.scalar(Value::from(n)))
    }
    fn visit_str<E>(self, s: &str) -> Result<bool, E> {
        Ok(self.scalar(Value::String(s.to_string())))
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(self.scalar(Value::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        let Ty::Array(item) = self.0 else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(false);
        };
        let mut ok = true;
        while let Some(x) = seq.next_element_seed(Conform(item))? {
            ok &= x;
        }
        Ok(ok)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut ok = true;
        match self.0 {
            Ty::Object(fields) => {
                // Fields seen, by position in `fields` (at most 64 per object).
                let mut seen = 0u64;
                while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match fields.iter().enumerate().find(|(_, f)| f.name == name) {
                        Some((i, f)) => {
                            seen |= 1 << i;
                            ok &= map.next_value_seed(Conform(f.ty))?;
                        }
                        None => {
                            map.next_value::<IgnoredAny>()?;
                            ok = false;
                        }
                    }
                }
                let required = fields
                    .iter()
                    .enumerate()
                    .all(|(i, f)| !f.required || seen & (1 << i) != 0);
                Ok(ok && required && fields.len() <= 64)
            }
            Ty::Map { key, value } => {
                while let Some(name) = map.next_key::<String>()? {
                    ok &= leaf(&Value::String(name), *key).is_ok();
                    ok &= map.next_value_seed(Conform(value))?;
                }
                Ok(ok)
            }
            _ => {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(false)
            }
        }
    }
}
