//! Session pools in the flow: which pools a request's headers name, the
//! slot each session holds in this Envoy ([`crate::meter::session`]), and
//! the buckets it draws from. A request without a pool's header is not
//! limited by that pool.

use super::{Refusal, RequestFlow};
use crate::audit::SessionRef;
use crate::host::{header, HeaderList, Host};
use crate::meter::{session, Bucket, Clock};
use crate::policy::{Key, Policy};

/// A session of one pool: its owner hash (key and value), the value as
/// records show it, and its slot once tracked.
#[derive(Debug)]
pub struct Session {
    pool: usize,
    owner: [u8; 32],
    value: String,
    slot: Option<u32>,
}

impl RequestFlow {
    /// Notes the session of every pool whose header the request carries
    /// (an empty value counts as absent), and names them in the audit record.
    pub(super) fn find_sessions(&mut self, policy: &Policy, key: usize, headers: &HeaderList) {
        let Some(key) = policy.key(key) else { return };
        for (i, pool) in policy.session_pools.iter().enumerate() {
            let Some(value) = header(headers, &pool.header).filter(|v| !v.is_empty()) else {
                continue;
            };
            let shown = session::display(value);
            self.audit.sessions.push(SessionRef {
                pool: pool.name.clone(),
                value: shown.clone(),
            });
            self.sessions.push(Session {
                pool: i,
                owner: session::owner(&key.id, value),
                value: shown,
                slot: None,
            });
        }
    }

    /// Finds or claims each session's slot, once per request.
    pub(super) fn track_sessions(&mut self, host: &impl Host, clock: Clock) -> Result<(), Refusal> {
        let policy = self.policy.clone();
        for s in self.sessions.iter_mut().filter(|s| s.slot.is_none()) {
            let Some(pool) = policy.session_pools.get(s.pool) else {
                continue;
            };
            match session::slot(host, pool, &s.owner, clock) {
                Ok(slot) => s.slot = Some(slot),
                Err(session::Full) => {
                    return Err(Refusal::SessionPoolFull {
                        pool: pool.name.clone(),
                        max_tracked: pool.max_tracked,
                    })
                }
            }
        }
        Ok(())
    }

    /// The buckets of every tracked session, at the key's priority.
    pub(super) fn session_buckets(&self, key: &Key) -> Vec<Bucket> {
        let mut out = Vec::new();
        for s in &self.sessions {
            let (Some(slot), Some(pool)) = (s.slot, self.policy.session_pools.get(s.pool)) else {
                continue;
            };
            for mut b in session::buckets(pool, &s.value, slot) {
                b.priority = key.priority;
                out.push(b);
            }
        }
        out
    }
}
