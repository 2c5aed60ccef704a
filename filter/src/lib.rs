//! tollgate.wasm: the proxy-wasm adapter. Each callback is one call into
//! `tollgate_core::flow::RequestFlow` and one `Action`; this crate is the only
//! place that touches proxy-wasm, and it calls the raw `hostcalls` (which
//! return a `Status`) rather than the SDK's context helpers, which unwrap and
//! would trap the VM on an unexpected host status.

mod host;

use host::Hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;
use tollgate_core::flow::{FilterOptions, RequestFlow};
use tollgate_core::host::Decision;
use tollgate_core::policy::{self, Policy};
use tollgate_core::sync::Leader;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    // With panic = "abort" the VM traps after this hook; log first so the
    // operator sees why the worker's VM was reloaded (failure_policy).
    std::panic::set_hook(Box::new(|info| {
        let _ = proxy_wasm::hostcalls::log(LogLevel::Critical, &format!("panic: {info}"));
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    policy: Option<Rc<Policy>>,
    options: FilterOptions,
    /// With a shared store: this VM's side of the sync leadership.
    leader: Option<Leader>,
}

impl Context for Root {
    /// An answer to a call the sync leader started.
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        num_trailers: usize,
    ) {
        let response = host::grpc_response(num_headers, body_size, num_trailers);
        if let (Some(leader), Some(policy)) = (&mut self.leader, &self.policy) {
            leader.on_response(&mut Hostcalls, policy, token_id, response.as_deref());
        }
    }
}

/// A name for this VM that no other VM of the process shares: the time and
/// WASI's random source, through std's hasher seeds.
fn vm_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Hostcalls.now());
    format!("{:016x}", h.finish())
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        let (bytes, source) = host::vm_options();
        let (options, cluster) = match host::parse_options(&bytes) {
            Ok(parsed) => parsed,
            Err(e) => {
                log::error!("invalid VM options in {source}: {e}");
                return false;
            }
        };
        self.options = options;
        if let (Some(shared), Some(cluster)) = (options.shared, cluster) {
            host::init_shared(&cluster);
            self.leader = Some(Leader::new(vm_id(), shared));
            let period = std::time::Duration::from_millis(shared.sync_period_ms);
            if let Err(e) = proxy_wasm::hostcalls::set_tick_period(period) {
                log::error!("cannot start the sync timer: {e:?}");
                return false;
            }
            log::info!(
                "limits shared through the quota service on cluster {cluster} (VM options from {source}), synced every {} ms",
                shared.sync_period_ms
            );
        }
        true
    }

    /// Runs on every worker and on a throwaway validation copy at each
    /// reload. Returning false rejects the new policy and keeps the last good
    /// one live. Never touches bucket state: balances must survive reloads.
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = match proxy_wasm::hostcalls::get_buffer(
            proxy_wasm::types::BufferType::PluginConfiguration,
            0,
            usize::MAX,
        ) {
            Ok(Some(b)) => b,
            _ => {
                log::error!("no policy in the plugin configuration");
                return false;
            }
        };
        let now = Hostcalls.now();
        let result = policy::compile(&bytes, "<plugin configuration>", now);
        let took_ms = Hostcalls.now().saturating_sub(now);
        match result {
            Ok((policy, report)) => {
                for w in &report.warnings {
                    log::warn!("policy warning: {w}");
                }
                log::info!(
                    "policy loaded: {} keys, {} pools, {} provider pools, {} bytes, compiled in {took_ms} ms",
                    policy.keys().len(),
                    policy.pools.len(),
                    policy.provider_pools.len(),
                    bytes.len()
                );
                self.policy = Some(Rc::new(policy));
                true
            }
            Err(errors) => {
                for e in &errors {
                    log::error!("policy rejected: {e}");
                }
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            flow: self
                .policy
                .clone()
                .map(|p| RequestFlow::with_options(p, self.options)),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    /// Every sync period on every worker: one of them (the elected leader)
    /// syncs this Envoy's leases with the quota service.
    fn on_tick(&mut self) {
        if let Some(leader) = &mut self.leader {
            leader.tick(&mut Hostcalls);
        }
    }
}

struct Http {
    /// `None` when no policy ever loaded: every request is refused.
    flow: Option<RequestFlow>,
}

impl Context for Http {
    /// The quota service answered the synchronous admission this request
    /// paused for: resume it or answer it.
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        num_headers: usize,
        body_size: usize,
        num_trailers: usize,
    ) {
        let Some(flow) = &mut self.flow else { return };
        let response = host::grpc_response(num_headers, body_size, num_trailers);
        match flow.on_quota_response(&mut Hostcalls, response.as_deref()) {
            Some(Decision::Continue) => {
                if let Err(e) = proxy_wasm::hostcalls::resume_http_request() {
                    log::warn!("resuming the request failed: {e:?}");
                }
            }
            // Still waiting (a failed call repeated), or a settlement's
            // answer: nothing to do.
            Some(Decision::Pause) | None => {}
            Some(reply) => {
                act(reply);
            }
        }
    }
}

fn act(decision: Decision) -> Action {
    match decision {
        Decision::Continue => Action::Continue,
        Decision::Pause => Action::Pause,
        Decision::Reply(reply) => {
            let headers = tollgate_core::flow::reply_headers(&reply);
            if let Err(status) = proxy_wasm::hostcalls::send_http_response(
                reply.status as u32,
                headers,
                Some(reply.body.as_bytes()),
            ) {
                log::error!("local reply failed: {status:?}");
            }
            Action::Pause
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        #[cfg(feature = "test-trap")]
        trap_if_asked();
        match &mut self.flow {
            Some(flow) => act(flow.on_request_headers(&mut Hostcalls, end_of_stream)),
            None => act(Decision::Reply(host::no_policy_reply())),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match &mut self.flow {
            Some(flow) => act(flow.on_request_body(&mut Hostcalls, body_size, end_of_stream)),
            None => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        match &mut self.flow {
            Some(flow) => act(flow.on_response_headers(&mut Hostcalls, end_of_stream)),
            None => Action::Continue,
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match &mut self.flow {
            Some(flow) => act(flow.on_response_body(&mut Hostcalls, body_size, end_of_stream)),
            None => Action::Continue,
        }
    }

    fn on_log(&mut self) {
        if let Some(flow) = &mut self.flow {
            flow.on_end(&mut Hostcalls);
        }
    }
}

/// Test-only (feature `test-trap`): trap the VM on demand.
#[cfg(feature = "test-trap")]
#[allow(clippy::panic)]
fn trap_if_asked() {
    if let Ok(Some(_)) = proxy_wasm::hostcalls::get_map_value(
        proxy_wasm::types::MapType::HttpRequestHeaders,
        "x-tollgate-test-trap",
    ) {
        panic!("test trap requested");
    }
}
