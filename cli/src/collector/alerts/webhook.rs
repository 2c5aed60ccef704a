//! Posting recorded alerts to `--alert-webhook`. The store is the outbox:
//! an event is recorded before any attempt, taken for one attempt at a time
//! (`claim_alert`), marked delivered when the webhook answers 2xx, and
//! otherwise tried again with exponential backoff, for as long as it takes.
//! Delivery runs apart from ingest: a slow or absent webhook never holds a
//! record back, and nothing is lost while it is down. A sender that stops
//! between the webhook's answer and marking the event delivered sends it
//! again (at least once); receivers can dedup on the event's `id`.

use super::super::store::AuditStore;
use super::super::Stats;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How long one attempt may take; also the claim's lease, so a sender that
/// dies mid-attempt leaves the event due again soon after.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often due events are looked for when nothing wakes the sender (a
/// retry coming due).
const POLL: Duration = Duration::from_secs(1);
/// Events taken per look.
const BATCH: usize = 32;

/// Wait before attempt `attempts + 1`: 1 s, 2 s, 4 s … capped at 5 minutes.
pub fn backoff(attempts: u64) -> Duration {
    Duration::from_secs(1u64 << attempts.min(9)).min(Duration::from_secs(300))
}

/// Posts due events to `url` until `stop` resolves.
pub async fn deliver(
    store: AuditStore,
    stats: Arc<Stats>,
    url: String,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let client = match reqwest::Client::builder().timeout(ATTEMPT_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("alert webhook client: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            biased;
            () = &mut stop => return,
            () = stats.alerts.wake.notified() => {}
            () = tokio::time::sleep(POLL) => {}
        }
        let now = crate::clock::now_ms();
        let lease = now + ATTEMPT_TIMEOUT.as_millis() as u64;
        let s = store.clone();
        let due = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<_>> {
            let mut claimed = Vec::new();
            for a in s.due_alerts(now, BATCH)? {
                if s.claim_alert(a.id, now, lease)? {
                    claimed.push(a);
                }
            }
            Ok(claimed)
        })
        .await;
        let due = match due {
            Ok(Ok(due)) => due,
            Ok(Err(e)) => {
                tracing::error!("reading pending alerts failed: {e:#}");
                continue;
            }
            Err(e) => {
                tracing::error!("alert task failed: {e}");
                continue;
            }
        };
        for alert in due {
            let sent = client
                .post(&url)
                .header("content-type", "application/json")
                .body(alert.event.clone())
                .send()
                .await;
            let outcome = match sent {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("webhook answered {}", r.status())),
                Err(e) => Err(format!("webhook unreachable: {e}")),
            };
            let s = store.clone();
            let now = crate::clock::now_ms();
            let (id, attempts) = (alert.id, alert.attempts + 1);
            if outcome.is_ok() {
                stats.alerts.delivered.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.alerts.failed.fetch_add(1, Ordering::Relaxed);
            }
            let done = tokio::task::spawn_blocking(move || match &outcome {
                Ok(()) => s.alert_delivered(id, now),
                Err(e) => {
                    tracing::warn!("alert {id} not delivered (attempt {attempts}): {e}");
                    let retry = now + backoff(attempts).as_millis() as u64;
                    s.alert_failed(id, retry, e)
                }
            })
            .await;
            if let Ok(Err(e)) = done {
                tracing::error!("updating alert {id} failed: {e:#}");
            }
        }
    }
}
