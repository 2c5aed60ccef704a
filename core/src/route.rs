//! Which provider API a request path belongs to.

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
    /// `POST /v1/messages/count_tokens`: authenticated and counted against
    /// requests per minute, never charged tokens.
    AnthropicCountTokens,
    /// `POST /v1/chat/completions`
    OpenAiChat,
    /// `POST /v1/responses`
    OpenAiResponses,
    /// Anything else; the policy's `unknown_routes` setting decides.
    Other,
}

impl Route {
    /// Classifies a `:path` value; the query string is ignored.
    pub fn classify(path: &[u8]) -> Route {
        let path = match path.iter().position(|b| *b == b'?') {
            Some(q) => path.get(..q).unwrap_or(path),
            None => path,
        };
        let path = path.strip_suffix(b"/").unwrap_or(path);
        match path {
            b"/v1/messages" => Route::AnthropicMessages,
            b"/v1/messages/count_tokens" => Route::AnthropicCountTokens,
            b"/v1/chat/completions" => Route::OpenAiChat,
            b"/v1/responses" => Route::OpenAiResponses,
            _ => Route::Other,
        }
    }

    /// The provider whose shapes this route uses. Unknown paths answer in
    /// Anthropic's shape: Anthropic is the primary provider.
    pub fn provider(self) -> Provider {
        match self {
            Route::OpenAiChat | Route::OpenAiResponses => Provider::OpenAi,
            _ => Provider::Anthropic,
        }
    }

    /// Stable name used in audit records and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Route::AnthropicMessages => "anthropic.messages",
            Route::AnthropicCountTokens => "anthropic.count_tokens",
            Route::OpenAiChat => "openai.chat_completions",
            Route::OpenAiResponses => "openai.responses",
            Route::Other => "other",
        }
    }

    /// Whether requests on this route carry an LLM body worth parsing.
    pub fn is_llm(self) -> bool {
        self != Route::Other
    }
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Anthropic => "anthropic",
            Provider::OpenAi => "openai",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_provider_paths_ignoring_query_and_trailing_slash() {
        assert_eq!(Route::classify(b"/v1/messages"), Route::AnthropicMessages);
        assert_eq!(
            Route::classify(b"/v1/messages?beta=true"),
            Route::AnthropicMessages
        );
        assert_eq!(
            Route::classify(b"/v1/messages/count_tokens"),
            Route::AnthropicCountTokens
        );
        assert_eq!(Route::classify(b"/v1/chat/completions/"), Route::OpenAiChat);
        assert_eq!(Route::classify(b"/v1/responses"), Route::OpenAiResponses);
        assert_eq!(Route::classify(b"/v1/models"), Route::Other);
        assert_eq!(Route::classify(b""), Route::Other);
        assert_eq!(Route::OpenAiChat.provider(), Provider::OpenAi);
        assert_eq!(Route::Other.provider(), Provider::Anthropic);
    }
}
