//! Why Tollgate answers a request itself instead of forwarding it. A
//! refusal is a value carrying what its message needs; its audit reason,
//! its error kind (status and provider error type) and the text the client
//! reads are rendered here, in one place, and checked against the README's
//! error table by a test.

use crate::audit::Reason;
use crate::meter::Bucket;
use crate::reply::ErrorKind;
use crate::route::PathError;
use crate::time::format_rfc3339;

#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Neither `x-api-key` nor `Authorization: Bearer` carried a key.
    MissingKey,
    /// `x-api-key` and `Authorization` carry different keys.
    ConflictingKeys,
    /// The key's hash is not in the policy.
    UnknownKey,
    RevokedKey,
    ExpiredKey {
        at_ms: u64,
    },
    /// A previous secret of a rotated key, presented from its `not_after`.
    RotatedKey {
        at_ms: u64,
    },
    /// No virtual key, and the mesh vouches for a caller (an mTLS peer, a
    /// verified JWT) no identity of the policy matches.
    UnknownIdentity {
        principal: String,
    },
    RevokedIdentity {
        id: String,
    },
    ExpiredIdentity {
        id: String,
        at_ms: u64,
    },
    /// A path outside the LLM APIs while the policy denies unknown routes.
    UnknownRoute {
        path: String,
    },
    /// A path refused whatever `unknown_routes` says: an encoded slash, or
    /// an API route's path in other letter case.
    BadPath {
        path: String,
        error: PathError,
    },
    /// An LLM route called without a body.
    BodyRequired,
    /// The body is not a request of its route (malformed JSON, bad types).
    InvalidBody(String),
    ModelMissing,
    ModelNotAllowed {
        model: String,
        allowed: String,
    },
    /// `GET /v1/models/{id}` for a model outside the key's allowlist:
    /// answered as the provider answers an unknown model (see `flow::models`).
    ModelNotListed {
        model: String,
    },
    /// A USD budget applies and the model has no price: it must never cost $0.
    UnpricedModel {
        model: String,
    },
    /// A bucket cannot take the request until `wait_ms` from now.
    Limited {
        bucket: Bucket,
        wait_ms: u64,
    },
    /// Shared data kept refusing the bucket update (bounded CAS retries).
    Contention,
    /// The shared store cannot be reached and this bucket says
    /// `on_store_failure: closed`.
    StoreUnavailable {
        bucket: Bucket,
    },
    /// No valid policy was ever loaded: fail closed.
    NoPolicy,
    /// The policy takes its keys from a key service and this Envoy has not
    /// loaded its table yet, or the key's record names a group its policy
    /// does not have yet (the two travel apart): fail closed, retry soon.
    KeysUnavailable,
    /// A limit would refuse and says `downgrade_to` a model this key may
    /// not call (a provider or session pool's limit: checked per request).
    DowngradeNotAllowed {
        bucket: Bucket,
        model: String,
        allowed: String,
    },
    /// Every slot this request's session could take in a session pool holds
    /// an active session.
    SessionPoolFull {
        pool: String,
        max_tracked: u32,
    },
}

impl Refusal {
    /// The stable code in the audit record and the decision metrics.
    pub fn reason(&self) -> Reason {
        match self {
            Refusal::MissingKey => Reason::MissingKey,
            Refusal::ConflictingKeys | Refusal::UnknownKey | Refusal::UnknownIdentity { .. } => {
                Reason::UnknownKey
            }
            Refusal::RevokedKey | Refusal::RevokedIdentity { .. } => Reason::RevokedKey,
            Refusal::ExpiredKey { .. } | Refusal::ExpiredIdentity { .. } => Reason::ExpiredKey,
            Refusal::RotatedKey { .. } => Reason::RotatedKey,
            Refusal::UnknownRoute { .. }
            | Refusal::BadPath {
                error: PathError::CaseMismatch(_),
                ..
            } => Reason::UnknownRoute,
            Refusal::BodyRequired
            | Refusal::InvalidBody(_)
            | Refusal::ModelMissing
            | Refusal::BadPath {
                error: PathError::EncodedSlash,
                ..
            } => Reason::InvalidRequest,
            Refusal::ModelNotAllowed { .. }
            | Refusal::ModelNotListed { .. }
            | Refusal::UnpricedModel { .. }
            | Refusal::DowngradeNotAllowed { .. } => Reason::ModelNotAllowed,
            Refusal::SessionPoolFull { .. } => Reason::SessionPoolFull,
            Refusal::Limited { bucket, .. } if bucket.metric.is_usd() => Reason::BudgetExhausted,
            Refusal::Limited { bucket, .. } if bucket.metric.is_quota() => Reason::QuotaExhausted,
            Refusal::Limited { .. } => Reason::RateLimited,
            Refusal::Contention => Reason::StoreContention,
            Refusal::StoreUnavailable { .. } => Reason::QuotaStoreUnavailable,
            Refusal::NoPolicy | Refusal::KeysUnavailable => Reason::NoPolicy,
        }
    }

    /// Status and provider error type, which follow from the reason, except
    /// for a model hidden from the key's list: not found, as the provider
    /// says of a model that does not exist.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Refusal::ModelNotListed { .. } => return ErrorKind::NotFound,
            // A moment's wait cures it, unlike a policy never loaded.
            Refusal::KeysUnavailable => return ErrorKind::Unavailable,
            _ => {}
        }
        match self.reason() {
            Reason::MissingKey
            | Reason::UnknownKey
            | Reason::RevokedKey
            | Reason::ExpiredKey
            | Reason::RotatedKey => ErrorKind::Unauthenticated,
            Reason::ModelNotAllowed => ErrorKind::ModelNotAllowed,
            Reason::InvalidRequest => ErrorKind::InvalidRequest,
            Reason::BodyTooLarge => ErrorKind::TooLarge,
            Reason::RateLimited | Reason::StoreContention | Reason::SessionPoolFull => {
                ErrorKind::RateLimited
            }
            Reason::QuotaExhausted | Reason::BudgetExhausted => ErrorKind::QuotaExhausted,
            Reason::UnknownRoute => ErrorKind::NotFound,
            Reason::QuotaStoreUnavailable => ErrorKind::Unavailable,
            Reason::NoPolicy => ErrorKind::Internal,
            // Reasons of forwarded requests, never a refusal's.
            Reason::Ok
            | Reason::Uncounted
            | Reason::UpstreamRateLimited
            | Reason::UpstreamOverloaded => ErrorKind::Internal,
        }
    }

    /// What the client reads: which rule, and for limits its value and when
    /// it frees up.
    pub fn message(&self) -> String {
        match self {
            Refusal::MissingKey => "missing API key: send your Tollgate virtual key in x-api-key or Authorization: Bearer".to_string(),
            Refusal::ConflictingKeys => {
                "x-api-key and Authorization carry different keys: send one virtual key".to_string()
            }
            Refusal::UnknownKey => "invalid x-api-key".to_string(),
            Refusal::RevokedKey => "this API key has been revoked".to_string(),
            Refusal::ExpiredKey { at_ms } => {
                format!("this API key expired at {}", format_rfc3339(*at_ms))
            }
            Refusal::RotatedKey { at_ms } => format!(
                "this API key was rotated and its previous secret expired at {}",
                format_rfc3339(*at_ms)
            ),
            Refusal::UnknownIdentity { principal } => format!(
                "no virtual key, and no identity of the policy matches the caller ({principal})"
            ),
            Refusal::RevokedIdentity { id } => format!("identity {id} has been revoked"),
            Refusal::ExpiredIdentity { id, at_ms } => {
                format!("identity {id} expired at {}", format_rfc3339(*at_ms))
            }
            Refusal::UnknownRoute { path } => {
                format!("{path} is not an LLM API route served by this gateway")
            }
            Refusal::BadPath {
                path,
                error: PathError::EncodedSlash,
            } => format!(
                "{path}: encoded slashes (%2F, %5C) are not allowed in request paths"
            ),
            Refusal::BadPath {
                path,
                error: PathError::CaseMismatch(route),
            } => format!(
                "{path} is not an LLM API route served by this gateway (paths are case-sensitive: {})",
                route.path()
            ),
            Refusal::BodyRequired => "request body is required".to_string(),
            Refusal::InvalidBody(message) => message.clone(),
            Refusal::ModelMissing => "model: field required".to_string(),
            Refusal::ModelNotAllowed { model, allowed } => {
                format!("model {model} is not allowed for this key (allowed: {allowed})")
            }
            Refusal::ModelNotListed { model } => format!("model: {model} not found for this key"),
            Refusal::UnpricedModel { model } => format!(
                "model {model} has no price in the policy and a USD budget applies to this key; add it under \"prices\" or set settings.default_price"
            ),
            Refusal::Limited { bucket, .. } => format!(
                "{} limit of {}{} reached for {}{}; {} in {}s",
                bucket.metric.name(),
                if bucket.metric.is_usd() { "USD " } else { "" },
                trim_num(bucket.limit),
                bucket.scope,
                match bucket.held_back() {
                    Some(r) => format!(
                        " (the last {}% is kept for {} requests)",
                        trim_num(r.fraction * 100.0),
                        r.for_priority.name()
                    ),
                    None => String::new(),
                },
                if bucket.metric.is_quota() {
                    "resets"
                } else {
                    "retry"
                },
                self.retry_after_s().unwrap_or(1)
            ),
            Refusal::Contention => "rate limiter busy; retry shortly".to_string(),
            Refusal::StoreUnavailable { bucket } => format!(
                "the shared rate limiter cannot be reached and {} refuses until it is back (on_store_failure: closed); retry shortly",
                bucket.label()
            ),
            Refusal::NoPolicy => "tollgate has no valid policy loaded".to_string(),
            Refusal::KeysUnavailable => {
                "tollgate is loading its key table; retry shortly".to_string()
            }
            Refusal::DowngradeNotAllowed {
                bucket,
                model,
                allowed,
            } => format!(
                "{} is exhausted and downgrades to model {model}, which is not allowed for this key (allowed: {allowed})",
                bucket.label()
            ),
            Refusal::SessionPoolFull { pool, max_tracked } => format!(
                "session pool {pool} is tracking its maximum of {max_tracked} active sessions; retry in {}s",
                SESSION_RETRY_S
            ),
        }
    }

    /// `retry-after` in whole seconds, for refusals that a wait can cure.
    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            Refusal::Limited { wait_ms, .. } => Some(wait_ms.div_ceil(1000).max(1)),
            Refusal::Contention | Refusal::StoreUnavailable { .. } | Refusal::KeysUnavailable => {
                Some(1)
            }
            Refusal::SessionPoolFull { .. } => Some(SESSION_RETRY_S),
            _ => None,
        }
    }

    /// The bucket that decided, as named in the audit record.
    pub fn bucket(&self) -> Option<String> {
        match self {
            Refusal::Limited { bucket, .. }
            | Refusal::StoreUnavailable { bucket }
            | Refusal::DowngradeNotAllowed { bucket, .. } => Some(bucket.label()),
            _ => None,
        }
    }
}

/// When a full session pool is worth trying again: a per-minute session
/// bucket is back to full (its slot idle, free to take) within a minute.
pub const SESSION_RETRY_S: u64 = 60;

/// A limit as written in the policy: `60`, `0.0005` (no trailing zeros).
pub fn trim_num(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{}", v as u64)
    } else {
        let s = format!("{v:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
    use super::*;
    use crate::meter::Metric;
    use crate::reply::error_reply;
    use crate::route::Provider;

    /// One refusal of every kind.
    fn every_refusal() -> Vec<Refusal> {
        let bucket = |m| Bucket::new("key:k".to_string(), m, 3.0);
        vec![
            Refusal::MissingKey,
            Refusal::ConflictingKeys,
            Refusal::UnknownKey,
            Refusal::RevokedKey,
            Refusal::ExpiredKey { at_ms: 0 },
            Refusal::RotatedKey { at_ms: 0 },
            Refusal::UnknownIdentity {
                principal: "spiffe://cluster.local/ns/x/sa/y".into(),
            },
            Refusal::RevokedIdentity { id: "svc".into() },
            Refusal::ExpiredIdentity {
                id: "svc".into(),
                at_ms: 0,
            },
            Refusal::UnknownRoute {
                path: "/v1/files".into(),
            },
            Refusal::BadPath {
                path: "/v1%2Fmessages".into(),
                error: PathError::EncodedSlash,
            },
            Refusal::BadPath {
                path: "/V1/messages".into(),
                error: PathError::CaseMismatch(crate::route::Route::AnthropicMessages),
            },
            Refusal::BodyRequired,
            Refusal::InvalidBody("bad".into()),
            Refusal::ModelMissing,
            Refusal::ModelNotAllowed {
                model: "m".into(),
                allowed: "a".into(),
            },
            Refusal::UnpricedModel { model: "m".into() },
            Refusal::ModelNotListed {
                model: "claude-opus-4-1".into(),
            },
            Refusal::Limited {
                bucket: bucket(Metric::Requests),
                wait_ms: 20_000,
            },
            Refusal::Limited {
                bucket: bucket(Metric::TokensPerDay),
                wait_ms: 1,
            },
            Refusal::Limited {
                bucket: bucket(Metric::UsdPerMonth),
                wait_ms: 1,
            },
            Refusal::Contention,
            Refusal::StoreUnavailable {
                bucket: bucket(Metric::UsdPerMonth),
            },
            Refusal::NoPolicy,
            Refusal::KeysUnavailable,
            Refusal::DowngradeNotAllowed {
                bucket: bucket(Metric::UsdPerDay),
                model: "claude-haiku-4-5".into(),
                allowed: "claude-opus-*".into(),
            },
            Refusal::SessionPoolFull {
                pool: "claude-code".into(),
                max_tracked: 2,
            },
        ]
    }

    /// The README's "Errors clients see" table, row by row:
    /// (situation, status cell, Anthropic type, OpenAI code).
    fn readme_rows() -> Vec<[String; 4]> {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let table = readme
            .split("## Errors clients see")
            .nth(1)
            .unwrap()
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2);
        table
            .map(|l| {
                let cells: Vec<String> = l
                    .trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().replace('`', ""))
                    .collect();
                [
                    cells[0].clone(),
                    cells[1].clone(),
                    cells[2].clone(),
                    cells[3].clone(),
                ]
            })
            .collect()
    }

    #[test]
    fn every_refusal_is_a_row_of_the_readme_error_table() {
        let rows = readme_rows();
        assert!(rows.len() >= 7, "README error table found: {rows:?}");
        let mut used = vec![false; rows.len()];
        for r in every_refusal() {
            let anthropic = error_reply(
                Provider::Anthropic,
                r.kind(),
                &r.message(),
                "id",
                r.retry_after_s(),
            );
            let openai = error_reply(
                Provider::OpenAi,
                r.kind(),
                &r.message(),
                "id",
                r.retry_after_s(),
            );
            let a: serde_json::Value = serde_json::from_str(&anthropic.body).unwrap();
            let o: serde_json::Value = serde_json::from_str(&openai.body).unwrap();
            let (a_type, o_code) = (
                a["error"]["type"].as_str().unwrap(),
                o["error"]["code"].as_str().unwrap(),
            );
            let row = rows.iter().position(|[_, status, at, oc]| {
                status.split_whitespace().next() == Some(&anthropic.status.to_string())
                    && at == a_type
                    && oc.split_whitespace().any(|w| w == o_code)
            });
            let Some(i) = row else {
                panic!(
                    "{r:?} answers {} {a_type} / {o_code}, which no README row lists: {rows:?}",
                    anthropic.status
                );
            };
            used[i] = true;
            let status_cell = &rows[i][1];
            assert_eq!(
                status_cell.contains("retry-after"),
                anthropic.header("retry-after").is_some(),
                "{r:?}: retry-after as the README says ({status_cell})"
            );
            for flag in ["false", "true"] {
                assert_eq!(
                    status_cell.contains(&format!("x-should-retry: {flag}")),
                    anthropic.header("x-should-retry") == Some(flag),
                    "{r:?}: x-should-retry as the README says ({status_cell})"
                );
            }
        }
        // Rows no refusal produces are Envoy's own replies (the idle timeout).
        for (row, used) in rows.iter().zip(used) {
            assert!(
                used || row[1].starts_with("504"),
                "README row {row:?} is produced by no refusal"
            );
        }
    }

    #[test]
    fn limited_refusals_name_the_limit_its_value_and_when_it_frees_up() {
        let r = Refusal::Limited {
            bucket: Bucket::new("key:nightly-agent".into(), Metric::Requests, 3.0),
            wait_ms: 19_001,
        };
        assert_eq!(
            r.message(),
            "requests_per_minute limit of 3 reached for key:nightly-agent; retry in 20s"
        );
        assert_eq!(r.retry_after_s(), Some(20));
        assert_eq!(
            r.bucket().as_deref(),
            Some("key:nightly-agent:requests_per_minute")
        );
        let budget = Refusal::Limited {
            bucket: Bucket::new("pool:team:payments".into(), Metric::UsdPerDay, 0.0005),
            wait_ms: 3_600_000,
        };
        assert_eq!(
            budget.message(),
            "budget_usd_per_day limit of USD 0.0005 reached for pool:team:payments; resets in 3600s"
        );
        assert_eq!(budget.reason(), Reason::BudgetExhausted);
        let mut limit = crate::policy::Limit::new(1000.0);
        limit.reserve = Some(crate::policy::Reserve {
            fraction: 0.2,
            for_priority: crate::policy::leaf::Priority(100),
        });
        let mut pool = Bucket::with_limit("pool:team:payments".into(), Metric::Requests, limit);
        pool.priority = crate::policy::leaf::Priority(0);
        assert_eq!(
            Refusal::Limited {
                bucket: pool,
                wait_ms: 1_000
            }
            .message(),
            "requests_per_minute limit of 1000 reached for pool:team:payments (the last 20% is kept for interactive requests); retry in 1s"
        );
        assert_eq!(budget.kind(), ErrorKind::QuotaExhausted);
    }
}
