//! Tollgate's logic: everything the Envoy filter decides, with no proxy-wasm
//! dependency, so it runs and is tested natively.
//!
//! Layout:
//! - [`host`]: the traits the filter implements (headers, body, shared data,
//!   clock, audit filter state) and the [`host::Decision`] each callback returns.
//! - [`flow`]: the per-request state machine driven by the filter's callbacks.
//! - [`policy`]: policy JSON, validation with precise errors, the compiled form.
//! - [`meter`]: token buckets, calendar quotas and budgets over shared data.
//! - [`usage`]: provider usage parsing (JSON and incremental SSE) and the
//!   request inspector (model, max_tokens, stream, input-token estimate).
//! - [`reply`]: provider-shaped error replies; [`route`]: path classification.
//! - [`audit`]: the per-request audit record; [`vkey`]: virtual-key handling.
//! - [`testing`]: an in-memory fake host for tests.
//!
//! ```
//! use tollgate_core::{flow::RequestFlow, host::Decision, policy, testing::{FakeHost, MemStore}};
//! use std::rc::Rc;
//!
//! let key = "tg-example-key";
//! let json = format!(
//!     r#"{{"version":1,"defaults":{{"models":["claude-*"],"limits":{{"requests_per_minute":1}}}},
//!         "keys":[{{"id":"demo","key_sha256":"{}"}}]}}"#,
//!     tollgate_core::vkey::sha256_hex(key)
//! );
//! let (policy, _) = policy::compile(json.as_bytes(), "policy.json", 0).unwrap();
//! let policy = Rc::new(policy);
//! let store = MemStore::new();
//! let request = || {
//!     FakeHost::new()
//!         .with_store(store.clone())
//!         .with_request_header(":path", "/v1/messages")
//!         .with_request_header("x-api-key", key)
//!         .with_body(r#"{"model":"claude-haiku-4-5","max_tokens":16,"messages":[]}"#)
//! };
//! let mut host = request();
//! let mut flow = RequestFlow::new(policy.clone());
//! assert_eq!(flow.on_request_headers(&mut host, false), Decision::Pause);
//! let n = host.body_len();
//! assert_eq!(flow.on_request_body(&mut host, n, true), Decision::Continue);
//! assert_eq!(host.request_header("x-api-key"), None); // never sent upstream
//!
//! // The second request in the same minute finds the bucket empty.
//! let mut host = request();
//! let mut flow = RequestFlow::new(policy);
//! flow.on_request_headers(&mut host, false);
//! let n = host.body_len();
//! match flow.on_request_body(&mut host, n, true) {
//!     Decision::Reply(r) => assert_eq!(r.status, 429),
//!     other => panic!("expected 429, got {other:?}"),
//! }
//! ```

pub mod audit;
pub mod flow;
pub mod host;
pub mod mesh;
pub mod meter;
pub mod policy;
pub mod price;
pub mod reply;
pub mod route;
pub mod sync;
pub mod testing;
pub mod time;
pub mod usage;
pub mod vkey;
