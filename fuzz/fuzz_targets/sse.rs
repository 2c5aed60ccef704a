//! The incremental SSE usage reader and the usage-chunk stripper on any
//! bytes cut at any point: never panic, and the split never changes the
//! usage found or the delta text counted.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate_core::route::Route;
use tollgate_core::usage::{inject::UsageChunkStripper, StreamUsage};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let cut = (cut as usize * body.len()) / 255;
    for route in [
        Route::AnthropicMessages,
        Route::OpenAiChat,
        Route::OpenAiResponses,
    ] {
        let mut whole = StreamUsage::new(route);
        whole.feed(body);
        let mut split = StreamUsage::new(route);
        split.feed(&body[..cut]);
        split.feed(&body[cut..]);
        assert_eq!(
            whole.usage(),
            split.usage(),
            "split at {cut} changed the usage"
        );
        assert_eq!(
            (whole.relayed_tokens(), whole.reported()),
            (split.relayed_tokens(), split.reported()),
            "split at {cut} changed the text counted or what was reported"
        );
    }
    let mut s = UsageChunkStripper::default();
    let _ = s.filter(&body[..cut], false);
    let _ = s.filter(&body[cut..], true);
});
