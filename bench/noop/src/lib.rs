//! The benchmark's baselines: a proxy-wasm HTTP filter with every callback
//! Tollgate implements and no host call in any of them.
//!
//! - As configured by default (`noop`), every callback returns Continue: the
//!   difference between Envoy with this filter and Envoy with none is the
//!   cost of running any wasm filter.
//! - With the plugin configuration `buffer` (`noop-buffer`), it holds the
//!   request headers and buffers the whole body before letting the request
//!   go, as any filter must that decides on the body before the provider
//!   sees the request. That is Tollgate's shape without Tollgate's work, so
//!   the gap between it and Tollgate is the work itself.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { buffer: false }) });
}}

struct Root {
    buffer: bool,
}

impl Context for Root {}
impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        if let Ok(Some(config)) =
            proxy_wasm::hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
        {
            self.buffer = config.trim_ascii() == b"buffer";
        }
        true
    }
    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop {
            buffer: self.buffer,
        }))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Noop {
    buffer: bool,
}

impl Context for Noop {}
impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        if self.buffer && !end_of_stream {
            Action::Pause
        } else {
            Action::Continue
        }
    }
    fn on_http_request_body(&mut self, _: usize, end_of_stream: bool) -> Action {
        if self.buffer && !end_of_stream {
            Action::Pause
        } else {
            Action::Continue
        }
    }
    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        Action::Continue
    }
    fn on_http_response_body(&mut self, _: usize, _: bool) -> Action {
        Action::Continue
    }
}
