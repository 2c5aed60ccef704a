//! The policy compiler on any bytes: never panics; every error names a path
//! and a reason; the streaming fast path and the DOM path agree on what they
//! accept, and on the keys they compile.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate_core::policy::{compile, compile_checked};

fuzz_target!(|data: &[u8]| {
    let fast = compile(data, "fuzz.json", 0);
    let dom = compile_checked(data, "fuzz.json", 0);
    match (&fast, &dom) {
        (Ok((a, _)), Ok((b, _))) => {
            assert_eq!(format!("{:?}", a.keys()), format!("{:?}", b.keys()));
        }
        (Err(errors), Err(_)) => {
            assert!(!errors.is_empty());
            for e in errors {
                assert!(!e.reason.is_empty());
            }
        }
        _ => panic!(
            "the fast path and the DOM path disagree: fast {}, DOM {}",
            fast.is_ok(),
            dom.is_ok()
        ),
    }
});
