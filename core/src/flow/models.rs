//! `GET /v1/models` and `GET /v1/models/{id}`: forwarded to the provider,
//! counted as one request, and cut to the models the key may use.
//!
//! A model outside the key's allowlist is absent from the list and its
//! `/v1/models/{id}` answers 404 `not_found_error`, as the provider answers
//! for a model that does not exist: to this key it does not, and the list
//! and the lookup must agree. The SDKs raise their not-found error, the one
//! a client already handles for a retired or mistyped model; a 403 would
//! read as a problem with the key's credentials. (Calling the model is
//! still a 403 `permission_error` naming the allowlist, on the LLM routes.)
//!
//! The list is small (tens of models; Anthropic pages hold at most 1,000),
//! so its body is buffered to the end, rewritten with every other field
//! untouched, and given its new `content-length` while the response headers
//! are held (the shipped configuration). Where they cannot be held (Istio's
//! `WasmPlugin`), `content-length` is dropped before the headers leave and
//! the body goes out chunked.

use super::{Phase, RequestFlow};
use crate::host::{Decision, Host};
use crate::policy::Key;
use crate::route::Provider;
use serde_json::Value;

/// A list body above this size is not filtered but replaced by an empty
/// list: the key's allowlist is never bypassed by size. Envoy's own buffer
/// limit (the listener's `per_connection_buffer_limit_bytes`) bounds what
/// reaches the filter before that.
pub const MAX_MODELS_LIST: usize = 1 << 20;

/// A models list cut to the allowed models.
#[derive(Debug, Clone, PartialEq)]
pub struct Filtered {
    pub body: Vec<u8>,
    /// Models in the provider's list, and how many of them were kept.
    pub listed: usize,
    pub kept: usize,
}

/// Keeps the entries of `data` whose `id` `allows` accepts; entries without
/// a string `id` cannot be checked and are dropped. Anthropic's page cursors
/// `first_id` / `last_id` (where present) name the first and last kept
/// model, or are null when none is kept; `has_more` and every other field
/// stay as the provider sent them (the crate keeps JSON object order).
/// `None` when the body is not a list of either provider's shape.
pub fn filter_list(body: &[u8], allows: impl Fn(&str) -> bool) -> Option<Filtered> {
    let mut list: Value = serde_json::from_slice(body).ok()?;
    let object = list.as_object_mut()?;
    let data = object.get_mut("data")?.as_array_mut()?;
    let listed = data.len();
    data.retain(|m| m.get("id").and_then(Value::as_str).is_some_and(&allows));
    let kept = data.len();
    let id_at = |m: Option<&Value>| m.and_then(|m| m.get("id")).cloned().unwrap_or(Value::Null);
    let (first, last) = (id_at(data.first()), id_at(data.last()));
    for (cursor, id) in [("first_id", first), ("last_id", last)] {
        if let Some(v) = object.get_mut(cursor) {
            *v = id;
        }
    }
    let body = serde_json::to_vec(&list).ok()?;
    Some(Filtered { body, listed, kept })
}

/// An empty list in the provider's shape: what a key sees when the
/// provider's answer could not be read (compressed, too large, not a list).
pub fn empty_list(provider: Provider) -> Vec<u8> {
    let list = match provider {
        Provider::Anthropic => {
            serde_json::json!({"data": [], "has_more": false, "first_id": null, "last_id": null})
        }
        Provider::OpenAi => serde_json::json!({"object": "list", "data": []}),
    };
    list.to_string().into_bytes()
}

impl RequestFlow {
    /// `GET /v1/models/{id}` for a model the key may not use.
    pub(super) fn model_not_listed(&self, key: &Key) -> Option<super::Refusal> {
        let model = self
            .model_asked
            .as_ref()
            .filter(|m| !key.models.allows(m))?;
        Some(super::Refusal::ModelNotListed {
            model: model.clone(),
        })
    }

    /// Response headers of a successful list: from here the body is held to
    /// its end. `Pause` holds the headers too, so that `content-length` can
    /// be set to the rewritten body's.
    pub(super) fn hold_models_list(&mut self, host: &mut impl Host) -> Decision {
        let listing = self.route.is_models()
            && self.model_asked.is_none()
            && (200..300).contains(&self.response.status);
        if !listing {
            return Decision::Continue;
        }
        self.response.models_list = true;
        // The rewritten body is plain JSON whatever the provider sent.
        if self.response.encoded {
            host.set_response_header("content-encoding", None);
        }
        if self.holds_headers() {
            return Decision::Pause;
        }
        // The headers leave now, before the body's new length is known.
        host.set_response_header("content-length", None);
        Decision::Continue
    }

    /// Buffers the list (Envoy keeps the chunks while this returns `Pause`)
    /// and, at its end, replaces it with the allowed part.
    pub(super) fn rewrite_models_list(
        &mut self,
        host: &mut impl Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Decision {
        if !end_of_stream {
            return Decision::Pause;
        }
        let policy = self.policy.clone();
        let key = match self.phase {
            Phase::Admitted { key, .. } => policy.key(key),
            _ => None,
        };
        let filtered = host
            .response_body(body_size)
            .filter(|b| b.len() <= MAX_MODELS_LIST && !self.response.encoded)
            .zip(key)
            .and_then(|(body, key)| filter_list(&body, |m| key.models.allows(m)));
        let body = match filtered {
            Some(f) => {
                self.audit.detail = Some(format!(
                    "listed {} of the provider's {} models",
                    f.kept, f.listed
                ));
                f.body
            }
            None => {
                self.audit.detail =
                    Some("models list unreadable; answered an empty list".to_string());
                empty_list(self.provider())
            }
        };
        host.replace_response_body(&body);
        if self.holds_headers() {
            host.set_response_header("content-length", Some(body.len().to_string().as_bytes()));
        }
        self.finish(host);
        Decision::Continue
    }
}

/// The ids a list body names, in order (for tests of this module and the flow).
#[cfg(test)]
pub(super) fn ids(body: &[u8]) -> Vec<String> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("data").and_then(Value::as_array).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ANTHROPIC: &[u8] =
        include_bytes!("../../../tests/fixtures/anthropic/models-list.response.json");
    const OPENAI: &[u8] =
        include_bytes!("../../../tests/fixtures/openai/models-list.response.json");

    fn haiku(m: &str) -> bool {
        m.starts_with("claude-haiku-")
    }

    #[test]
    fn anthropic_list_keeps_allowed_models_and_moves_the_cursors() {
        let f = filter_list(ANTHROPIC, |m| m.starts_with("claude-sonnet-")).unwrap();
        assert_eq!(
            ids(&f.body),
            ["claude-sonnet-4-5-20250929", "claude-sonnet-4-20250514"]
        );
        assert_eq!((f.listed, f.kept), (6, 2));
        let v: Value = serde_json::from_slice(&f.body).unwrap();
        assert_eq!(v["first_id"], "claude-sonnet-4-5-20250929");
        assert_eq!(v["last_id"], "claude-sonnet-4-20250514");
        assert_eq!(v["has_more"], false);
        // Each kept entry is exactly the provider's, field for field.
        let original: Value = serde_json::from_slice(ANTHROPIC).unwrap();
        assert_eq!(v["data"][0], original["data"][2]);
        assert_eq!(v["data"][1], original["data"][4]);
        // Object order is the provider's: the body still starts with "data".
        assert!(f.body.starts_with(
            br#"{"data":[{"type":"model","id":"claude-sonnet-4-5-20250929","display_name":"Claude Sonnet 4.5""#
        ));
        let contractor = filter_list(ANTHROPIC, haiku).unwrap();
        assert_eq!(ids(&contractor.body), ["claude-haiku-4-5-20251001"]);
    }

    #[test]
    fn openai_list_keeps_allowed_models_and_every_other_field() {
        let f = filter_list(OPENAI, |m| m.starts_with("gpt-4o-mini")).unwrap();
        let v: Value = serde_json::from_slice(&f.body).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(ids(&f.body), ["gpt-4o-mini", "gpt-4o-mini-2024-07-18"]);
        assert_eq!(v["data"][0]["owned_by"], "system");
        assert_eq!(v.get("first_id"), None, "no cursor added where none was");
    }

    #[test]
    fn nothing_allowed_leaves_an_empty_page_with_null_cursors() {
        let f = filter_list(ANTHROPIC, |_| false).unwrap();
        let v: Value = serde_json::from_slice(&f.body).unwrap();
        assert_eq!(v["data"], serde_json::json!([]));
        assert_eq!(
            (v["first_id"].clone(), v["last_id"].clone()),
            (Value::Null, Value::Null)
        );
        assert_eq!(f.kept, 0);
    }

    #[test]
    fn entries_without_an_id_are_dropped_and_non_lists_are_refused() {
        let f = filter_list(
            br#"{"data":[{"name":"x"},{"id":7},{"id":"claude-haiku-4-5"}]}"#,
            haiku,
        )
        .unwrap();
        assert_eq!(f.body, br#"{"data":[{"id":"claude-haiku-4-5"}]}"#);
        assert_eq!(filter_list(b"[]", haiku), None);
        assert_eq!(filter_list(br#"{"data":{}}"#, haiku), None);
        assert_eq!(filter_list(b"\x1f\x8b\x08", haiku), None);
        assert_eq!(
            empty_list(Provider::OpenAi),
            br#"{"object":"list","data":[]}"#
        );
    }
}
