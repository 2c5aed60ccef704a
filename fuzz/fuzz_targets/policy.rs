//! The policy compiler on any bytes: never panics; every error names a path
//! and a reason.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(errors) = tollgate_core::policy::compile(data, "fuzz.json", 0) {
        assert!(!errors.is_empty());
        for e in errors {
            assert!(!e.reason.is_empty());
        }
    }
});
