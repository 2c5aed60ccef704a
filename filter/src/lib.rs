//! tollgate.wasm: the proxy-wasm adapter. Each callback is one call into
//! `tollgate_core::flow::RequestFlow` and one `Action`; this crate is the only
//! place that touches proxy-wasm, and it calls the raw `hostcalls` (which
//! return a `Status`) rather than the SDK's context helpers, which unwrap and
//! would trap the VM on an unexpected host status.

mod held;
mod host;
mod keys;

use held::SharedFlow;
use host::Hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use tollgate_core::flow::{FilterOptions, RequestFlow};
use tollgate_core::host::Decision;
use tollgate_core::policy::{self, Policy, TableState};
use tollgate_core::sync::Leader;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    // With panic = "abort" the VM traps after this hook; log first so the
    // operator sees why the worker's VM was reloaded (failure_policy).
    std::panic::set_hook(Box::new(|info| {
        let _ = proxy_wasm::hostcalls::log(LogLevel::Critical, &format!("panic: {info}"));
    }));
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> {
        Box::new(Root {
            id,
            ..Root::default()
        })
    });
}}

/// How often held requests are retried (ms): a refill of one request per
/// second is seen within a tenth of it.
const HELD_TICK_MS: u64 = 50;

/// The longest Envoy's counters lag behind the requests that moved them
/// (ms): stats are handed over from the timer, not from each request.
pub const STATS_FLUSH_MS: u64 = 1000;

/// How often a worker without a shared store reads the clock for its
/// requests (ms): the oldest time a request decides on
/// (`host::use_vm_clock`). A tick costs one clock read; a hundred a second
/// per worker is far less than one read per request callback under load.
pub const CLOCK_TICK_MS: u64 = 10;

#[derive(Default)]
struct Root {
    id: u32,
    policy: Option<Rc<Policy>>,
    options: FilterOptions,
    /// With a shared store: this VM's side of the sync leadership.
    leader: Option<Leader>,
    /// With a key service: this VM's side of fetching the key table.
    keys: Option<keys::Fetcher>,
    /// The shortest period any feature asked of the timer (ms).
    tick_ms: u64,
    /// The timer's period now (ms): `tick_ms`, or the VM clock's if shorter.
    timer_ms: u64,
    /// When the features last ran (ms): with the VM clock the timer runs
    /// more often than they ask.
    features_ran_ms: u64,
}

impl Root {
    /// Shortens the timer to `ms` if it is longer; false if the host
    /// refused.
    fn tick_at_most(&mut self, ms: u64, what: &str) -> bool {
        if self.tick_ms != 0 && self.tick_ms <= ms {
            return true;
        }
        self.tick_ms = ms;
        let timer = if host::keeps_vm_clock() {
            ms.min(CLOCK_TICK_MS)
        } else {
            ms
        };
        if timer == self.timer_ms {
            return true;
        }
        if let Err(e) =
            proxy_wasm::hostcalls::set_tick_period(std::time::Duration::from_millis(timer))
        {
            log::error!("cannot start the timer of {what}: {e:?}");
            return false;
        }
        self.timer_ms = timer;
        true
    }

    /// Whether the features' period has come since they last ran (within
    /// half a timer period, so a timer that runs at their period never
    /// skips one for a late millisecond).
    fn features_due(&mut self, now: u64) -> bool {
        let elapsed = now.saturating_sub(self.features_ran_ms);
        if elapsed + self.timer_ms / 2 < self.tick_ms {
            return false;
        }
        self.features_ran_ms = now;
        true
    }

    /// The key table moved on: new requests use a fresh view of it.
    fn renew_key_view(&mut self) {
        let Some(state) = TableState::read(&Hostcalls) else {
            return;
        };
        let Some(policy) = &self.policy else { return };
        let Some(table) = policy.key_table() else {
            return;
        };
        if table.state() != Some(state) {
            if let Some(renewed) = policy.with_table_state(state) {
                self.policy = Some(Rc::new(renewed));
            }
        }
    }
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
        if let Some(fetcher) = self.keys.as_mut().filter(|f| f.owns(token_id)) {
            if fetcher.on_response(num_headers, body_size) {
                self.renew_key_view();
            }
            return;
        }
        let response = host::grpc_response(num_headers, body_size, num_trailers);
        if let (Some(leader), Some(policy)) = (&mut self.leader, &self.policy) {
            leader.on_response(&mut Hostcalls, policy, token_id, response.as_deref());
        }
    }

    /// The VM is stopping: counts not yet flushed are handed over, and the
    /// key table's fetching to another VM.
    fn on_done(&mut self) -> bool {
        host::flush_stats();
        if let Some(fetcher) = &mut self.keys {
            fetcher.release();
        }
        true
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
        let vm = match host::parse_options(&bytes) {
            Ok(parsed) => parsed,
            Err(e) => {
                log::error!("invalid VM options in {source}: {e}");
                return false;
            }
        };
        let options = vm.flow;
        self.options = options;
        if options.shared.is_none() {
            host::use_vm_clock();
        }
        // The timer flushes the stats the requests counted
        // (`host::flush_stats`); a shared store, a key table or held
        // requests shorten it.
        if !self.tick_at_most(STATS_FLUSH_MS, "stats") {
            return false;
        }
        if let Some(keys) = vm.keys {
            log::info!(
                "keys from the key service on cluster {} ({}), VM options from {source}",
                keys.cluster,
                keys.path
            );
            self.keys = Some(keys::Fetcher::new(keys, vm_id()));
            // The timer looks whether the key table moved on (one
            // shared-data read: a revocation applies within a period of
            // Envoy having it), and retries held requests: any key of the
            // table may hold them, and its keys are only known when used.
            if !self.tick_at_most(HELD_TICK_MS, "the key table") {
                return false;
            }
        }
        if let (Some(shared), Some(cluster)) = (options.shared, vm.quota_cluster) {
            host::init_shared(&cluster);
            self.leader = Some(Leader::new(vm_id(), shared));
            if !self.tick_at_most(shared.sync_period_ms, "sync") {
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
            Ok((mut policy, report)) => {
                if self.keys.is_some() {
                    // The keys come from the table: they are compiled
                    // against this document's groups, defaults and pools.
                    let Some(base) = policy::base_of(&bytes) else {
                        log::error!(
                            "policy rejected: it does not parse again as the key table's base"
                        );
                        return false;
                    };
                    policy.use_key_table(Arc::new(base), TableState::read(&Hostcalls));
                }
                for w in &report.warnings {
                    log::warn!("policy warning: {w}");
                }
                log::info!(
                    "policy loaded: {}, {} identities, {} pools, {} provider pools, {} bytes, compiled in {took_ms} ms",
                    if self.keys.is_some() {
                        "keys from the key table".to_string()
                    } else {
                        format!("{} keys", policy.keys().len())
                    },
                    policy.identities().len(),
                    policy.pools.len(),
                    policy.provider_pools.len(),
                    bytes.len()
                );
                // Held requests are retried from the timer (with a key
                // table it already runs this often).
                if policy.holds_requests() && !self.tick_at_most(HELD_TICK_MS, "held requests") {
                    return false;
                }
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

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            id: context_id,
            flow: Rc::new(RefCell::new(
                self.policy
                    .clone()
                    .map(|p| RequestFlow::with_options(p, self.options)),
            )),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    /// Every timer period on every worker: the VM clock moves on; at the
    /// features' period one worker (the elected leader) syncs this Envoy's
    /// leases with the quota service, the key table is looked at, held
    /// requests retried and stats handed over.
    fn on_tick(&mut self) {
        let now = host::tick_clock();
        if !self.features_due(now) {
            return;
        }
        if let Some(leader) = &mut self.leader {
            leader.tick(&mut Hostcalls);
        }
        if let Some(fetcher) = &mut self.keys {
            fetcher.poll();
            self.renew_key_view();
        }
        held::tick(self.id, |d| {
            act(d);
        });
        host::flush_stats();
    }
}

struct Http {
    id: u32,
    /// `None` when no policy ever loaded: every request is refused. Shared
    /// with the held-request queue while the request waits for a refill.
    flow: SharedFlow,
}

impl Http {
    /// Runs one callback on the flow; a request the flow holds joins the
    /// worker's queue.
    fn run(&mut self, f: impl FnOnce(&mut RequestFlow) -> Decision) -> Option<Decision> {
        let decision = host::one_instant(|| {
            let mut slot = self.flow.try_borrow_mut().ok()?;
            let flow = slot.as_mut()?;
            let decision = f(flow);
            Some((decision, flow.held().is_some()))
        })?;
        if decision.1 {
            held::enqueue(self.id, &self.flow);
        }
        Some(decision.0)
    }
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
        let response = host::grpc_response(num_headers, body_size, num_trailers);
        let answer = {
            let Ok(mut slot) = self.flow.try_borrow_mut() else {
                return;
            };
            let Some(flow) = slot.as_mut() else { return };
            // One clock read for the whole answer, as in a request callback.
            let answer =
                host::one_instant(|| flow.on_quota_response(&mut Hostcalls, response.as_deref()));
            (answer, flow.held().is_some())
        };
        if answer.1 {
            held::enqueue(self.id, &self.flow);
        }
        match answer.0 {
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
        match self.run(|flow| flow.on_request_headers(&mut Hostcalls, end_of_stream)) {
            Some(decision) => act(decision),
            None => act(Decision::Reply(host::no_policy_reply())),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.run(|flow| flow.on_request_body(&mut Hostcalls, body_size, end_of_stream))
            .map_or(Action::Continue, act)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.run(|flow| flow.on_response_headers(&mut Hostcalls, end_of_stream))
            .map_or(Action::Continue, act)
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.run(|flow| flow.on_response_body(&mut Hostcalls, body_size, end_of_stream))
            .map_or(Action::Continue, act)
    }

    fn on_log(&mut self) {
        if let Ok(mut slot) = self.flow.try_borrow_mut() {
            if let Some(flow) = slot.as_mut() {
                host::one_instant(|| flow.on_end(&mut Hostcalls));
            }
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
