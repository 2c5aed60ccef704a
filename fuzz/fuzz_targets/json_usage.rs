//! Usage from complete JSON response bodies, both providers: never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate_core::route::Route;
use tollgate_core::usage::parse_json_usage;

fuzz_target!(|data: &[u8]| {
    let _ = parse_json_usage(Route::AnthropicMessages, data);
    let _ = parse_json_usage(Route::OpenAiChat, data);
    let _ = parse_json_usage(Route::OpenAiResponses, data);
});
