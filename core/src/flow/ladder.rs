//! A ladder instead of a wall: what a request gets from a limit that would
//! refuse it, when the limit says so (`docs/metering.md`).
//!
//! - `shadow: true`: admitted past the limit, still charged to it, and
//!   audited `would_deny` (metric `tollgate.ladder.shadow_would_deny`).
//! - `{"downgrade_to": MODEL}`: the body's `model` is rewritten to MODEL,
//!   the request is priced and admitted as MODEL, past the limit (still
//!   charged to it), and the response says `x-tollgate-downgraded-from`.
//! - `{"throttle": f}`: admitted from the limit's overflow bucket
//!   ([`crate::meter::Bucket::overflow`]) instead, if that has room.
//!
//! Each is a new admission of the whole request with the limit marked:
//! the refused admission took nothing (or gave back what it took), so the
//! retry starts clean, and a limit is climbed at most once per request, so
//! the retries end (at most one per limit the request touches).

use super::{Decision, Phase, Refusal, RequestFlow};
use crate::audit::Downgrade;
use crate::host::{Host, Stat};
use crate::meter::{self, Bucket, BucketState, Demand};
use crate::policy::OnExhausted;
use crate::usage::Usage;

/// The response header that names the model a downgraded request asked for.
pub const DOWNGRADED_FROM: &str = "x-tollgate-downgraded-from";

/// The limits a request climbed past, by bucket label.
#[derive(Debug, Default)]
pub struct Ladder {
    /// Admitted past these (shadow limits, the downgrading limit).
    past: Vec<String>,
    /// Admitted from these limits' overflow buckets.
    throttled: Vec<String>,
}

impl Ladder {
    /// A request's buckets as the ladder leaves them: those it climbed past
    /// always fit (and are still charged), throttled ones give way to their
    /// overflow. With a shared store, buckets climbed past are left out:
    /// the quota service checks every bucket it is sent, so they are not
    /// debited there (`docs/metering.md`).
    pub fn apply(&self, buckets: Vec<Bucket>, shared: bool) -> Vec<Bucket> {
        if self.past.is_empty() && self.throttled.is_empty() {
            return buckets;
        }
        buckets
            .into_iter()
            .filter_map(|mut b| {
                let label = b.label();
                if self.throttled.contains(&label) {
                    return b.overflow();
                }
                if self.past.contains(&label) {
                    if shared {
                        return None;
                    }
                    b.past = true;
                }
                Some(b)
            })
            .collect()
    }

    fn climbed(&self, label: &str) -> bool {
        self.past.iter().chain(&self.throttled).any(|l| l == label)
    }
}

impl RequestFlow {
    /// The next rung for a request `bucket` refused: a new admission (whose
    /// decision is returned), a refusal of the downgrade, or `None` for the
    /// wall (a 429, or a hold).
    pub(super) fn climb(
        &mut self,
        host: &mut impl Host,
        key: usize,
        bucket: &Bucket,
        states: &[BucketState],
    ) -> Option<Decision> {
        let label = bucket.label();
        if bucket.past || self.ladder.climbed(&label) {
            return None;
        }
        let (mut demand, body_size) = self.pending?;
        if bucket.shadow {
            host.stat(Stat::ShadowWouldDeny, 1);
            self.audit.would_deny.push(label.clone());
            self.ladder.past.push(label);
        } else {
            match &bucket.on_exhausted {
                OnExhausted::Block => return None,
                OnExhausted::Throttle(_) => {
                    host.stat(Stat::Throttled, 1);
                    self.audit.throttled = Some(label.clone());
                    self.ladder.throttled.push(label);
                }
                OnExhausted::DowngradeTo(model) => {
                    match self.downgrade(key, model, bucket, &mut demand)? {
                        Ok(()) => {
                            if self.audit.downgrade.is_some() {
                                host.stat(Stat::Downgraded, 1);
                            }
                            self.ladder.past.push(label);
                        }
                        Err(refusal) => return Some(self.refuse(host, refusal, states)),
                    }
                }
            }
        }
        self.phase = Phase::Authenticated { key };
        Some(self.admit(host, demand, body_size))
    }

    /// Serves the request as `model`: checks the key may call it (and it
    /// has a price where a budget applies), re-prices the demand, and
    /// records the change; the body is rewritten when the request goes
    /// upstream ([`RequestFlow::prepare_upstream`]). `None` where no
    /// downgrade can happen (the wall): a route without a model, a second
    /// downgrade, or headers already sent upstream (the body's length
    /// cannot change then).
    fn downgrade(
        &mut self,
        key: usize,
        model: &str,
        bucket: &Bucket,
        demand: &mut Demand,
    ) -> Option<Result<(), Refusal>> {
        let from = self.info.model.clone()?;
        if !self.route.is_llm() || self.audit.downgrade.is_some() {
            return None;
        }
        // Already the cheaper model: served as asked, past the limit.
        if from == model {
            return Some(Ok(()));
        }
        if !self.holds_headers() {
            return None;
        }
        let policy = self.policy.clone();
        let key = policy.key(key)?;
        if !key.models.allows(model) {
            return Some(Err(Refusal::DowngradeNotAllowed {
                bucket: bucket.clone(),
                model: model.to_string(),
                allowed: key.models.describe(),
            }));
        }
        let price = policy.price(model);
        if price.is_none() && meter::budget_applies(&policy, &key) {
            return Some(Err(Refusal::UnpricedModel {
                model: model.to_string(),
            }));
        }
        demand.usd = price.map_or(0.0, |p| {
            p.cost(&Usage {
                input: self.audit.tokens.input_estimated,
                output: self.audit.tokens.output_reserved,
                ..Default::default()
            })
        });
        self.info.model = Some(model.to_string());
        self.audit.downgrade = Some(Downgrade {
            from,
            to: model.to_string(),
            bucket: bucket.label(),
        });
        Some(Ok(()))
    }

    /// The request is going upstream: a downgraded one's body names the
    /// model it is served by (content-length follows: the headers are still
    /// held), then OpenAI streams are asked for usage.
    pub(super) fn prepare_upstream(&mut self, host: &mut impl Host, body: Vec<u8>) {
        let mut body = body;
        if let Some(d) = &self.audit.downgrade {
            match crate::usage::inject::replace_model(&body, &d.to) {
                Some(new_body) => {
                    host.replace_request_body(&new_body);
                    host.set_request_header(
                        "content-length",
                        Some(new_body.len().to_string().as_bytes()),
                    );
                    body = new_body;
                }
                None => log::warn!(
                    "tollgate: {} could not be rewritten to {}",
                    self.audit.request_id,
                    d.to
                ),
            }
        }
        self.ask_for_stream_usage(host, &body);
    }
}
