//! Requests held for a limit to refill (`max_wait_ms`) instead of a 429.
//! Each worker keeps its own queue, in arrival order; the root context's
//! timer retries the ones whose time has come. proxy-wasm gives an HTTP
//! context no timer of its own, so the queue holds a weak handle on each
//! held request's flow and the root switches to the request's context
//! (`set_effective_context`) to resume or answer it.

use crate::host::Hostcalls;
use std::cell::RefCell;
use std::rc::{Rc, Weak};
use tollgate_core::flow::RequestFlow;
use tollgate_core::host::Decision;

/// A request's flow, shared between its HTTP context and the queue.
pub type SharedFlow = Rc<RefCell<Option<RequestFlow>>>;

/// Most requests one worker holds at once; past it, a request that could
/// wait gets its 429 at once.
pub const MAX_HELD: usize = 1_024;

/// A held request: its context id and a weak handle on its flow (the
/// context owns the flow; a request whose client left drops out).
type Held = (u32, Weak<RefCell<Option<RequestFlow>>>);

thread_local! {
    static HELD: RefCell<Vec<Held>> = const { RefCell::new(Vec::new()) };
}

/// Whether one more request may be held.
pub fn room() -> bool {
    HELD.with(|h| h.borrow().len() < MAX_HELD)
}

/// Whether a request (other than one being run now) is held for `bucket`.
pub fn held_for(bucket: &str) -> bool {
    HELD.with(|h| {
        h.borrow().iter().any(|(_, w)| {
            w.upgrade().is_some_and(|rc| {
                // The request running now is borrowed: it is not "another".
                rc.try_borrow().is_ok_and(|f| {
                    f.as_ref()
                        .and_then(RequestFlow::held)
                        .is_some_and(|(_, b)| b == bucket)
                })
            })
        })
    })
}

/// Puts a request that its flow just held at the end of the queue (once).
pub fn enqueue(context_id: u32, flow: &SharedFlow) {
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        if !h.iter().any(|(id, _)| *id == context_id) {
            h.push((context_id, Rc::downgrade(flow)));
        }
    });
}

/// Retries the held requests whose time has come, in arrival order; a
/// request still waiting keeps the later ones of its bucket waiting too.
/// `root_id` is restored as the effective context afterwards.
pub fn tick(root_id: u32, act: impl Fn(Decision)) {
    let queue = HELD.with(|h| h.borrow().clone());
    let seen: Vec<u32> = queue.iter().map(|(id, _)| *id).collect();
    let mut still = Vec::with_capacity(queue.len());
    let mut blocked: Vec<String> = Vec::new();
    for (id, weak) in queue {
        // A request whose client left is gone with its context.
        let Some(rc) = weak.upgrade() else { continue };
        let Ok(mut slot) = rc.try_borrow_mut() else {
            still.push((id, weak));
            continue;
        };
        let Some(flow) = slot.as_mut() else { continue };
        let Some((_, bucket)) = flow.held() else {
            continue;
        };
        let bucket = bucket.to_string();
        if blocked.contains(&bucket) {
            still.push((id, weak));
            continue;
        }
        if proxy_wasm::hostcalls::set_effective_context(id).is_err() {
            continue;
        }
        // One clock read per resumed request, as in its own callbacks.
        match crate::host::one_instant(|| flow.on_wait_tick(&mut Hostcalls)) {
            None => {
                blocked.push(bucket);
                still.push((id, weak));
            }
            Some(Decision::Continue) => {
                if let Err(e) = proxy_wasm::hostcalls::resume_http_request() {
                    log::warn!("resuming a held request failed: {e:?}");
                }
            }
            // Paused for the shared store: its answer resumes it.
            Some(Decision::Pause) => {}
            Some(reply) => act(reply),
        }
    }
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        // Requests this pass did not see (held while it ran) stay behind it.
        let added: Vec<_> = h.drain(..).filter(|(id, _)| !seen.contains(id)).collect();
        *h = still;
        h.extend(added);
    });
    let _ = proxy_wasm::hostcalls::set_effective_context(root_id);
}
