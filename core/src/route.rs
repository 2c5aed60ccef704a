//! Which provider API a request belongs to, decided on its path as Envoy
//! routes it.
//!
//! The shipped HCM (`envoy/bootstrap.yaml`) sets `normalize_path: true`,
//! `merge_slashes: true` and `path_with_escaped_slashes_action:
//! REJECT_REQUEST`, so the `:path` this filter reads is already normalised.
//! [`normalize`] repeats the same steps anyway: a mesh whose HCM this project
//! does not render (Istio, Envoy Gateway) may forward `/v1//messages` as is,
//! and the provider behind it may well serve it as `/v1/messages`. Whatever
//! reaches a provider as one of its LLM paths must be classified as that
//! path, or it would pass unmetered under `unknown_routes: pass`.

use crate::host::{header, HeaderList};

/// The provider whose wire format a route speaks; decides the error shape and
/// the usage parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Anthropic,
    OpenAi,
}

/// A classified request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/messages`
    AnthropicMessages,
    /// `POST /v1/messages/count_tokens`: authenticated, allowlist-checked and
    /// audited, but it takes nothing from any bucket (docs/metering.md).
    AnthropicCountTokens,
    /// `GET /v1/models` and `GET /v1/models/{id}`, Anthropic's family.
    AnthropicModels,
    /// `POST /v1/chat/completions`
    OpenAiChat,
    /// `POST /v1/responses`
    OpenAiResponses,
    /// `GET /v1/models` and `GET /v1/models/{id}`, OpenAI's family.
    OpenAiModels,
    /// Anything else; the policy's `unknown_routes` setting decides.
    Other,
}

/// A request line, classified: its route and, for `GET /v1/models/{id}`, the
/// model asked about (percent-decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub route: Route,
    pub model: Option<String>,
}

/// Paths refused whatever `unknown_routes` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%2F` or `%5C` in the path. The shipped HCM rejects these with 400
    /// (`REJECT_REQUEST`); the filter does the same where the HCM does not.
    EncodedSlash,
    /// The path differs from this route's only in letter case. Envoy's
    /// prefix match is case-sensitive, so it is not that route, but a
    /// provider that ignores case would serve it as one: refused rather
    /// than forwarded unmetered.
    CaseMismatch(Route),
}

/// The request header that picks the family of `/v1/models`, for the filter
/// and for Envoy's route table alike ([`Provider::models_family`]).
pub const FAMILY_HEADER: &str = "anthropic-version";

/// The paths of the routes, without a trailing slash.
const PATHS: [(&str, Route); 4] = [
    ("/v1/messages", Route::AnthropicMessages),
    ("/v1/messages/count_tokens", Route::AnthropicCountTokens),
    ("/v1/chat/completions", Route::OpenAiChat),
    ("/v1/responses", Route::OpenAiResponses),
];

const MODELS: &str = "/v1/models";

impl Route {
    /// Classifies a request from its method, its `:path` (query and
    /// fragment ignored) and the family `/v1/models` belongs to (both
    /// providers serve it at the same path; see [`Provider::models_family`]).
    ///
    /// The path is first normalised as Envoy does ([`normalize`]), then
    /// matched case-sensitively with an optional trailing slash, as Envoy's
    /// prefix routes send `/v1/messages/` to the same provider as
    /// `/v1/messages`. The LLM routes match whatever the method (a `GET
    /// /v1/messages` is then refused for its missing body); the models
    /// routes are `GET` only, the one method the providers serve there.
    pub fn classify(method: &[u8], path: &[u8], family: Provider) -> Result<Target, PathError> {
        let normalized = normalize(path)?;
        let p = match normalized.strip_suffix('/') {
            Some(p) if !p.is_empty() => p,
            _ => normalized.as_str(),
        };
        let models = match family {
            Provider::Anthropic => Route::AnthropicModels,
            Provider::OpenAi => Route::OpenAiModels,
        };
        let get = method == b"GET";
        if let Some((_, route)) = PATHS.iter().find(|(path, _)| *path == p) {
            return Ok(Target {
                route: *route,
                model: None,
            });
        }
        if let Some(id) = models_path(p).filter(|_| get) {
            return Ok(Target {
                route: models,
                model: id.map(percent_decode),
            });
        }
        // Near misses: a route's path in other letter case.
        if let Some((_, route)) = PATHS.iter().find(|(path, _)| path.eq_ignore_ascii_case(p)) {
            return Err(PathError::CaseMismatch(*route));
        }
        if get && models_path(&p.to_ascii_lowercase()).is_some() {
            return Err(PathError::CaseMismatch(models));
        }
        Ok(Target {
            route: Route::Other,
            model: None,
        })
    }

    /// The route's path as the providers spell it (`""` for `Other`).
    pub fn path(self) -> &'static str {
        match self {
            Route::AnthropicModels | Route::OpenAiModels => MODELS,
            Route::Other => "",
            r => PATHS
                .iter()
                .find(|(_, route)| *route == r)
                .map_or("", |(path, _)| path),
        }
    }

    /// The provider whose shapes this route uses. Unknown paths answer in
    /// Anthropic's shape: Anthropic is the primary provider.
    pub fn provider(self) -> Provider {
        match self {
            Route::OpenAiChat | Route::OpenAiResponses | Route::OpenAiModels => Provider::OpenAi,
            _ => Provider::Anthropic,
        }
    }

    /// Stable name used in audit records and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Route::AnthropicMessages => "anthropic.messages",
            Route::AnthropicCountTokens => "anthropic.count_tokens",
            Route::AnthropicModels => "anthropic.models",
            Route::OpenAiChat => "openai.chat_completions",
            Route::OpenAiResponses => "openai.responses",
            Route::OpenAiModels => "openai.models",
            Route::Other => "other",
        }
    }

    /// Whether requests on this route carry an LLM body worth parsing.
    pub fn is_llm(self) -> bool {
        matches!(
            self,
            Route::AnthropicMessages
                | Route::AnthropicCountTokens
                | Route::OpenAiChat
                | Route::OpenAiResponses
        )
    }

    /// `GET /v1/models` or `GET /v1/models/{id}`, of either provider.
    pub fn is_models(self) -> bool {
        matches!(self, Route::AnthropicModels | Route::OpenAiModels)
    }
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Anthropic => "anthropic",
            Provider::OpenAi => "openai",
        }
    }

    /// Which provider's `/v1/models` a request means: Anthropic's when it
    /// carries `anthropic-version` (whatever its value), OpenAI's otherwise.
    ///
    /// Anthropic requires that header on every request; its SDKs and Claude
    /// Code always send it (also with a bearer token), OpenAI's SDKs never
    /// do. It is also the one identifying header the filter never changes,
    /// which is what lets Envoy's route table apply the same rule: Envoy
    /// matches the route, and with it which provider's key the credential
    /// injectors add, from the client's headers before this filter runs.
    /// A rule on `x-api-key` / `Authorization` (which the filter strips) or
    /// on a header the filter would set could pair one provider's cluster
    /// with the other's key.
    pub fn models_family(headers: &HeaderList) -> Provider {
        if header(headers, FAMILY_HEADER).is_some() {
            Provider::Anthropic
        } else {
            Provider::OpenAi
        }
    }
}

/// `/v1/models` (`Some(None)`) or `/v1/models/{id}` (`Some(Some(id))`, one
/// segment), of a normalised path without its trailing slash.
fn models_path(p: &str) -> Option<Option<&str>> {
    match p.strip_prefix(MODELS)? {
        "" => Some(None),
        rest => rest
            .strip_prefix('/')
            .filter(|id| !id.is_empty() && !id.contains('/'))
            .map(Some),
    }
}

/// The `:path` as the shipped Envoy routes it, query and fragment cut:
/// 1. `%2F` / `%5C` (any case) refuse the request, as
///    `path_with_escaped_slashes_action: REJECT_REQUEST` does;
/// 2. `normalize_path` (RFC 3986 as Envoy implements it, checked against
///    Envoy 1.40): percent-escapes of unreserved characters are decoded
///    (`%6d` is `m`), `\` is a slash, `.` and `..` segments are resolved
///    (never above the root) and a path not starting with `/` gets one;
/// 3. `merge_slashes`: runs of `/` become one (a trailing slash stays).
///
/// Letter case is kept: Envoy does no case normalisation.
pub fn normalize(raw: &[u8]) -> Result<String, PathError> {
    let end = raw
        .iter()
        .position(|b| *b == b'?' || *b == b'#')
        .unwrap_or(raw.len());
    let decoded = decode_unreserved(raw.get(..end).unwrap_or_default());
    // Checked after decoding the unreserved escapes, so that `%%32F` (which
    // decodes to `%2F`) is refused as well: stricter than Envoy, never laxer.
    if decoded.windows(3).any(|w| {
        w.first() == Some(&b'%')
            && matches!(
                (
                    w.get(1).map(u8::to_ascii_uppercase),
                    w.get(2).map(u8::to_ascii_uppercase)
                ),
                (Some(b'2'), Some(b'F')) | (Some(b'5'), Some(b'C'))
            )
    }) {
        return Err(PathError::EncodedSlash);
    }
    // Dot segments, over `/`-separated segments (empty ones kept: merging
    // slashes comes after, as in Envoy).
    let mut segments: Vec<&[u8]> = Vec::new();
    let body = decoded.strip_prefix(b"/").unwrap_or(&decoded);
    let mut trailing = false;
    for segment in body.split(|b| *b == b'/') {
        trailing = false;
        match segment {
            b"." => trailing = true,
            b".." => {
                segments.pop();
                trailing = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = Vec::with_capacity(decoded.len() + 1);
    for s in &segments {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if trailing || out.is_empty() {
        out.push(b'/');
    }
    out.dedup_by(|b, a| *a == b'/' && *b == b'/');
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Decodes `%XX` escapes of unreserved characters (RFC 3986: letters,
/// digits, `-._~`) and turns `\` into `/`; other escapes stay as they are.
fn decode_unreserved(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = path.get(i) {
        let escaped = (b == b'%')
            .then(|| hex_byte(path.get(i + 1..i + 3)?))
            .flatten()
            .filter(|c| c.is_ascii_alphanumeric() || b"-._~".contains(c));
        match escaped {
            Some(c) => {
                out.push(c);
                i += 3;
            }
            None => {
                out.push(if b == b'\\' { b'/' } else { b });
                i += 1;
            }
        }
    }
    out
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    std::str::from_utf8(pair)
        .ok()
        .and_then(|s| u8::from_str_radix(s, 16).ok())
}

/// A path segment fully percent-decoded (model ids compared with the
/// allowlist as the provider reads them).
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match (b == b'%')
            .then(|| hex_byte(bytes.get(i + 1..i + 3)?))
            .flatten()
        {
            Some(c) => {
                out.push(c);
                i += 3;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn route(path: &str) -> Result<Route, PathError> {
        Route::classify(b"POST", path.as_bytes(), Provider::Anthropic).map(|t| t.route)
    }

    fn get(path: &str, family: Provider) -> Result<Target, PathError> {
        Route::classify(b"GET", path.as_bytes(), family)
    }

    #[test]
    fn classifies_provider_paths_ignoring_query_and_trailing_slash() {
        assert_eq!(route("/v1/messages"), Ok(Route::AnthropicMessages));
        assert_eq!(
            route("/v1/messages?beta=true"),
            Ok(Route::AnthropicMessages)
        );
        assert_eq!(
            route("/v1/messages/count_tokens"),
            Ok(Route::AnthropicCountTokens)
        );
        assert_eq!(route("/v1/chat/completions/"), Ok(Route::OpenAiChat));
        assert_eq!(route("/v1/responses"), Ok(Route::OpenAiResponses));
        assert_eq!(route("/v1/models"), Ok(Route::Other), "POST is not listing");
        assert_eq!(route("/v1/files"), Ok(Route::Other));
        assert_eq!(route("/v1/messages/batches"), Ok(Route::Other));
        assert_eq!(route(""), Ok(Route::Other));
        assert_eq!(Route::OpenAiChat.provider(), Provider::OpenAi);
        assert_eq!(Route::OpenAiModels.provider(), Provider::OpenAi);
        assert_eq!(Route::Other.provider(), Provider::Anthropic);
    }

    #[test]
    fn near_misses_are_their_route_or_refused_never_other() {
        for (path, expected) in [
            ("/v1//messages", Ok(Route::AnthropicMessages)),
            ("/v1/messages/", Ok(Route::AnthropicMessages)),
            ("/v1/messages//", Ok(Route::AnthropicMessages)),
            ("/v1/./messages", Ok(Route::AnthropicMessages)),
            ("/v1/foo/../messages", Ok(Route::AnthropicMessages)),
            ("/v1/%2e%2E/v1/messages", Ok(Route::AnthropicMessages)),
            ("/../v1/messages", Ok(Route::AnthropicMessages)),
            ("v1/messages", Ok(Route::AnthropicMessages)),
            ("/v1/%6dessages", Ok(Route::AnthropicMessages)),
            ("/v1\\messages", Ok(Route::AnthropicMessages)),
            ("/v1/messages?beta=true", Ok(Route::AnthropicMessages)),
            ("/v1/messages#x", Ok(Route::AnthropicMessages)),
            ("//v1///chat//completions", Ok(Route::OpenAiChat)),
            ("/v1%2Fmessages", Err(PathError::EncodedSlash)),
            ("/v1%2fmessages", Err(PathError::EncodedSlash)),
            ("/v1%5Cmessages", Err(PathError::EncodedSlash)),
            ("/v1%%32Fmessages", Err(PathError::EncodedSlash)),
            (
                "/V1/messages",
                Err(PathError::CaseMismatch(Route::AnthropicMessages)),
            ),
            (
                "/v1/Chat/Completions/",
                Err(PathError::CaseMismatch(Route::OpenAiChat)),
            ),
            // Not near misses: other paths, decided by unknown_routes.
            ("/v1/messages/batches", Ok(Route::Other)),
            ("/v1/messagesx", Ok(Route::Other)),
            ("/v1/messages%252F", Ok(Route::Other)),
            ("/v1/messages/..", Ok(Route::Other)),
        ] {
            assert_eq!(route(path), expected, "{path}");
        }
    }

    #[test]
    fn normalises_as_envoy_1_40_does() {
        // What Envoy 1.40 forwarded upstream for each path with the shipped
        // HCM settings (observed with a direct-response route and an
        // access log of %REQ(:PATH)%).
        for (raw, envoy) in [
            ("/v1//messages", "/v1/messages"),
            ("/v1/messages/", "/v1/messages/"),
            ("/v1/./messages", "/v1/messages"),
            ("/v1/foo/../messages", "/v1/messages"),
            ("/V1/messages", "/V1/messages"),
            ("/v1/%6dessages", "/v1/messages"),
            ("/v1\\messages", "/v1/messages"),
            ("/v1/%2e/messages", "/v1/messages"),
            ("/../v1/messages", "/v1/messages"),
            ("/v1/messages%3Fx", "/v1/messages%3Fx"),
            ("/v1/messages;x", "/v1/messages;x"),
            ("/v1/messages//", "/v1/messages/"),
            ("/v1/models/claude%2Dx", "/v1/models/claude-x"),
            ("/v1/%2E%2E/v1/messages", "/v1/messages"),
            ("/v1/messages/..", "/v1/"),
            ("/v1/messages/.", "/v1/messages/"),
            ("/v1/mess%20ages", "/v1/mess%20ages"),
            ("/v1/messages%252F", "/v1/messages%252F"),
        ] {
            assert_eq!(normalize(raw.as_bytes()).as_deref(), Ok(envoy), "{raw}");
        }
    }

    #[test]
    fn models_routes_follow_the_family_and_get_only() {
        let list = |family| get("/v1/models?limit=20", family).unwrap();
        assert_eq!(list(Provider::Anthropic).route, Route::AnthropicModels);
        assert_eq!(list(Provider::OpenAi).route, Route::OpenAiModels);
        assert_eq!(list(Provider::OpenAi).model, None);
        let one = get("/v1/models/claude-opus-4-1/", Provider::Anthropic).unwrap();
        assert_eq!(
            (one.route, one.model.as_deref()),
            (Route::AnthropicModels, Some("claude-opus-4-1"))
        );
        let ft = get("/v1/models/ft%3Agpt-4o-mini%3Aacme", Provider::OpenAi).unwrap();
        assert_eq!(ft.model.as_deref(), Some("ft:gpt-4o-mini:acme"));
        assert_eq!(
            get("/v1/models/a/b", Provider::OpenAi).unwrap().route,
            Route::Other
        );
        assert_eq!(
            get("/V1/Models", Provider::OpenAi),
            Err(PathError::CaseMismatch(Route::OpenAiModels))
        );
        assert_eq!(Route::OpenAiModels.name(), "openai.models");
        assert_eq!(Route::AnthropicModels.path(), "/v1/models");
        assert_eq!(
            Route::AnthropicCountTokens.path(),
            "/v1/messages/count_tokens"
        );
        assert!(!Route::AnthropicModels.is_llm());
    }

    #[test]
    fn anthropic_version_picks_anthropics_models_whatever_the_key_header() {
        let h = |pairs: &[(&str, &str)]| -> HeaderList {
            pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect()
        };
        let version = ("anthropic-version", "2023-06-01");
        let family = |pairs: &[(&str, &str)]| Provider::models_family(&h(pairs));
        assert_eq!(
            family(&[("x-api-key", "tg-k"), version]),
            Provider::Anthropic
        );
        assert_eq!(
            family(&[("authorization", "Bearer tg-k"), version]),
            Provider::Anthropic,
            "Claude Code with a bearer token"
        );
        assert_eq!(
            family(&[("authorization", "Bearer tg-k")]),
            Provider::OpenAi
        );
        assert_eq!(
            family(&[("x-api-key", "tg-k")]),
            Provider::OpenAi,
            "no anthropic-version: not a request Anthropic would serve"
        );
        assert_eq!(
            family(&[("anthropic-version", "")]),
            Provider::Anthropic,
            "present, as Envoy's present_match sees it"
        );
    }
}
