//! The request inspector (model, max_tokens, stream, input estimate) on any
//! bytes, for every route: never panics, returns Ok or a message.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate_core::route::Route;
use tollgate_core::usage::inspect_request;

fuzz_target!(|data: &[u8]| {
    for route in [
        Route::AnthropicMessages,
        Route::AnthropicCountTokens,
        Route::OpenAiChat,
        Route::OpenAiResponses,
    ] {
        let _ = inspect_request(route, data);
    }
    let _ = tollgate_core::usage::inject::include_usage(data);
});
