//! Errors clients see, in the shape of the provider their route speaks, so
//! that the official SDKs raise their own exception types
//! (`AuthenticationError`, `RateLimitError`, ...).

use crate::host::LocalReply;
use crate::route::Provider;

/// Why Tollgate answered instead of the provider. Each kind fixes the status
/// and the provider error type (see the table in `docs/errors.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Missing, unknown, revoked or expired virtual key.
    Unauthenticated,
    /// Model outside the key's allowlist.
    ModelNotAllowed,
    /// Malformed JSON, missing `model`, bad field types.
    InvalidRequest,
    /// Request body over the configured limit.
    TooLarge,
    /// A per-minute bucket is empty; retrying after `retry-after` succeeds.
    RateLimited,
    /// A daily quota or money budget is spent; retrying before the window
    /// resets cannot succeed, so SDKs are told not to retry.
    QuotaExhausted,
    /// Path outside the provider APIs and the policy denies unknown routes.
    NotFound,
    /// Tollgate itself failed (no policy loaded, shared data refused a write).
    Internal,
    /// The shared store behind a limit cannot be reached and the limit
    /// refuses rather than guess; retrying shortly may succeed.
    Unavailable,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::Unauthenticated => 401,
            ErrorKind::ModelNotAllowed => 403,
            ErrorKind::InvalidRequest => 400,
            ErrorKind::TooLarge => 413,
            ErrorKind::RateLimited | ErrorKind::QuotaExhausted => 429,
            ErrorKind::NotFound => 404,
            ErrorKind::Internal => 500,
            ErrorKind::Unavailable => 503,
        }
    }

    /// Anthropic `error.type`.
    fn anthropic_type(self) -> &'static str {
        match self {
            ErrorKind::Unauthenticated => "authentication_error",
            ErrorKind::ModelNotAllowed => "permission_error",
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::TooLarge => "request_too_large",
            ErrorKind::RateLimited | ErrorKind::QuotaExhausted => "rate_limit_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::Internal | ErrorKind::Unavailable => "api_error",
        }
    }

    /// OpenAI `error.type` and `error.code`.
    fn openai_type_code(self) -> (&'static str, &'static str) {
        match self {
            ErrorKind::Unauthenticated => ("invalid_request_error", "invalid_api_key"),
            ErrorKind::ModelNotAllowed => ("invalid_request_error", "model_not_allowed"),
            ErrorKind::InvalidRequest => ("invalid_request_error", "invalid_request_error"),
            ErrorKind::TooLarge => ("invalid_request_error", "request_too_large"),
            ErrorKind::RateLimited => ("requests", "rate_limit_exceeded"),
            ErrorKind::QuotaExhausted => ("insufficient_quota", "insufficient_quota"),
            ErrorKind::NotFound => ("invalid_request_error", "not_found"),
            ErrorKind::Internal => ("server_error", "internal_error"),
            ErrorKind::Unavailable => ("server_error", "service_unavailable"),
        }
    }
}

/// Builds the provider-shaped error reply. `retry_after_s` adds `retry-after`;
/// quota and budget denials also get `x-should-retry: false`.
pub fn error_reply(
    provider: Provider,
    kind: ErrorKind,
    message: &str,
    request_id: &str,
    retry_after_s: Option<u64>,
) -> LocalReply {
    let body = match provider {
        Provider::Anthropic => serde_json::json!({
            "type": "error",
            "error": { "type": kind.anthropic_type(), "message": message },
            "request_id": request_id,
        }),
        Provider::OpenAi => {
            let (ty, code) = kind.openai_type_code();
            serde_json::json!({
                "error": { "message": message, "type": ty, "param": null, "code": code },
                "request_id": request_id,
            })
        }
    };
    let mut headers = vec![
        ("content-type".to_string(), "application/json".to_string()),
        ("x-tollgate-denied".to_string(), "true".to_string()),
    ];
    if provider == Provider::Anthropic {
        headers.push(("request-id".to_string(), request_id.to_string()));
    } else {
        headers.push(("x-request-id".to_string(), request_id.to_string()));
    }
    if let Some(secs) = retry_after_s {
        headers.push(("retry-after".to_string(), secs.to_string()));
    }
    match kind {
        ErrorKind::QuotaExhausted => {
            headers.push(("x-should-retry".to_string(), "false".to_string()))
        }
        ErrorKind::Unavailable => headers.push(("x-should-retry".to_string(), "true".to_string())),
        _ => {}
    }
    LocalReply {
        status: kind.status(),
        headers,
        body: body.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_rate_limit_error_has_type_message_request_id_and_retry_after() {
        let r = error_reply(
            Provider::Anthropic,
            ErrorKind::RateLimited,
            "requests_per_minute limit of 2 reached",
            "req-1",
            Some(30),
        );
        assert_eq!(r.status, 429);
        assert_eq!(r.header("retry-after"), Some("30"));
        assert_eq!(r.header("x-should-retry"), None);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(
            v["error"]["message"],
            "requests_per_minute limit of 2 reached"
        );
        assert_eq!(v["request_id"], "req-1");
    }

    #[test]
    fn openai_quota_error_uses_insufficient_quota_and_stops_retries() {
        let r = error_reply(
            Provider::OpenAi,
            ErrorKind::QuotaExhausted,
            "spent",
            "req-2",
            Some(60),
        );
        assert_eq!(r.status, 429);
        assert_eq!(r.header("x-should-retry"), Some("false"));
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
        assert_eq!(v["error"]["code"], "insufficient_quota");
        assert_eq!(v["error"]["type"], "insufficient_quota");
        assert_eq!(v["error"]["param"], serde_json::Value::Null);
    }

    #[test]
    fn openai_unknown_key_is_invalid_api_key() {
        let r = error_reply(
            Provider::OpenAi,
            ErrorKind::Unauthenticated,
            "bad key",
            "r",
            None,
        );
        assert_eq!(r.status, 401);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
}
