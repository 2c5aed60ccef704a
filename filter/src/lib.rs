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
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        if let Ok(Some(bytes)) = proxy_wasm::hostcalls::get_buffer(
            proxy_wasm::types::BufferType::VmConfiguration,
            0,
            usize::MAX,
        ) {
            match host::parse_options(&bytes) {
                Ok(options) => self.options = options,
                Err(e) => {
                    log::error!("invalid vm configuration: {e}");
                    return false;
                }
            }
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
                    "policy loaded: {} keys, {} pools, {} bytes, compiled in {took_ms} ms",
                    policy.keys().len(),
                    policy.pools.len(),
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
}

struct Http {
    /// `None` when no policy ever loaded: every request is refused.
    flow: Option<RequestFlow>,
}

impl Context for Http {}

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
