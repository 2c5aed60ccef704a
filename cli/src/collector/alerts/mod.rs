//! Budget and quota alerts: the collector counts what each key and pool
//! used of its daily and monthly limits from the audit records it stores,
//! and records one event per (entity, limit, threshold, window) the policy's
//! `alerts` name, the first time usage reaches it. The store's
//! `audit_alerts` table is the dedup (a unique row per event, whichever
//! Envoy replica saw the request and whichever collector stored it, across
//! restarts) and the outbox the webhook sender (`webhook.rs`) drains.
//!
//! Counting starts from the store (`AuditBackend::window_usage`) the first
//! time a window is needed, then follows each stored batch: a new record
//! adds what it was charged, a complete record replacing its provisional
//! one adds the difference. The insert and the counting happen under one
//! lock, so a window counted from the store never counts a batch twice.

pub mod engine;
pub mod webhook;

use super::store::{AuditStore, IdentityUsage, NewAlert, Stored};
use engine::{Crossing, Engine, Targets, Used, WindowId};
use std::collections::HashSet;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use tollgate_core::audit::AuditRecord;
use tollgate_core::policy::Policy;
use tollgate_core::time::format_rfc3339;

/// The alerts of one collector: usage per window, and delivery counters.
#[derive(Debug, Default)]
pub struct Alerts {
    /// `None` until a policy is known (`tollgate collector` without
    /// `--policy` counts nothing).
    engine: Mutex<Option<Engine>>,
    /// Whether events are posted to a webhook; without one they are
    /// recorded as delivered (the dedup still holds).
    webhook: AtomicBool,
    /// Wakes the sender when an event is recorded.
    pub wake: tokio::sync::Notify,
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
}

/// How long after its end a window still takes records and alerts (a
/// request that started before midnight ends after it).
const STALE_AFTER_MS: u64 = 86_400_000;

/// The engine, held across an insert and its counting.
pub type Held<'a> = Option<MutexGuard<'a, Option<Engine>>>;

impl Alerts {
    /// Events will be posted to a webhook (`--alert-webhook`).
    pub fn with_webhook(&self) {
        self.webhook.store(true, Ordering::Relaxed);
    }

    /// Takes the engine for one insert; `None` without a policy, so a
    /// collector without alerts pays one lock and nothing else.
    pub fn hold(&self) -> Held<'_> {
        self.engine.lock().ok().filter(|g| g.is_some())
    }

    /// Watches a new policy's entities and limits. Usage is counted again
    /// at the next [`Alerts::refresh`] or batch.
    pub fn set_policy(&self, policy: &Policy) {
        let targets = Targets::of(policy);
        if let Ok(mut engine) = self.engine.lock() {
            *engine = Some(match engine.take() {
                Some(e) if e.targets == targets => e,
                Some(e) => e.replaced(targets),
                None => Engine::new(targets),
            });
        }
    }

    /// Counts a stored batch into the engine held since before the insert,
    /// and records the thresholds it crossed.
    pub fn observe(
        &self,
        held: Held<'_>,
        store: &AuditStore,
        records: &[AuditRecord],
        stored: &[Stored],
        now: u64,
    ) {
        let Some(mut guard) = held else { return };
        let Some(engine) = guard.as_mut() else { return };
        // Windows first needed by this batch are counted from the store,
        // which holds the batch already: its records are not added again.
        // Windows that ended over a day ago are left alone: an import of
        // old records is history, not news, and costs no query.
        let live = |end: u64| end.saturating_add(STALE_AFTER_MS) > now;
        let mut fresh = HashSet::new();
        for (r, s) in records.iter().zip(stored) {
            if !s.changed() {
                continue;
            }
            for (id, end) in engine.windows_at(r.timestamp_ms) {
                if live(end) && !engine.is_counted(&id) && fresh.insert(id) {
                    match store.window_usage(id.start, end) {
                        Ok(rows) => engine.seed(id, end, &rows),
                        Err(e) => tracing::error!("reading usage for alerts failed: {e:#}"),
                    }
                }
            }
        }
        let mut touched: HashSet<(WindowId, String)> = HashSet::new();
        for (r, s) in records.iter().zip(stored) {
            let (minus, plus) = match s {
                Stored::New => (None, r),
                Stored::Replaced(old) => (Some(old.as_ref()), r),
                Stored::Kept | Stored::Expired => continue,
            };
            for (record, sign) in minus.into_iter().map(|o| (o, -1.0)).chain([(plus, 1.0)]) {
                let who = identity(record);
                let charge = charged(record);
                let delta = Used {
                    tokens: sign * charge.tokens,
                    usd: sign * charge.usd,
                };
                for (id, end) in engine.windows_at(record.timestamp_ms) {
                    if !live(end) {
                        continue;
                    }
                    let entities = if fresh.contains(&id) {
                        engine.entities_of(&who)
                    } else {
                        engine.add(id, &who, delta)
                    };
                    touched.extend(entities.into_iter().map(|e| (id, e)));
                }
            }
        }
        let mut touched: Vec<_> = touched.into_iter().collect();
        touched.sort();
        let crossings: Vec<Crossing> = touched
            .iter()
            .flat_map(|(id, e)| engine.crossings(*id, e))
            .collect();
        self.record(engine, store, &crossings, now);
    }

    /// Counts the current windows if not yet counted, forgets old ones, and
    /// records every crossing not yet recorded (after a policy change, or a
    /// start on a store already past a threshold).
    pub fn refresh(&self, store: &AuditStore, now: u64) {
        let Ok(mut guard) = self.engine.lock() else {
            return;
        };
        let Some(engine) = guard.as_mut() else { return };
        engine.prune(now);
        for (id, end) in engine.windows_at(now) {
            if !engine.is_counted(&id) {
                match store.window_usage(id.start, end) {
                    Ok(rows) => engine.seed(id, end, &rows),
                    Err(e) => tracing::error!("reading usage for alerts failed: {e:#}"),
                }
            }
        }
        let crossings = engine.all_crossings();
        self.record(engine, store, &crossings, now);
    }

    /// Records each crossing once in the store; wakes the sender for those
    /// this call recorded.
    fn record(&self, engine: &mut Engine, store: &AuditStore, crossings: &[Crossing], now: u64) {
        let deliver = self.webhook.load(Ordering::Relaxed);
        for c in crossings {
            let event = event(c, engine.targets.offset_min, now).to_string();
            let alert = NewAlert {
                entity: &c.entity,
                limit: c.metric.name(),
                threshold_ppm: c.threshold_ppm(),
                window_start_ms: c.window.start,
                event: &event,
                now_ms: now,
            };
            match store.record_alert(&alert, !deliver) {
                Ok(true) => {
                    tracing::info!("alert: {}", text(c, engine.targets.offset_min));
                    if deliver {
                        self.wake.notify_one();
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    engine.forget(c);
                    tracing::error!("recording an alert failed: {e:#}");
                }
            }
        }
    }

    /// The utilisation gauges and the delivery counters, for `/metrics`.
    pub fn render(&self, out: &mut String, now: u64) {
        let gauges = match self.engine.lock() {
            Ok(e) => e.as_ref().map(|e| e.gauges(now)).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let labels = |g: &engine::Gauge| {
            format!(
                "entity=\"{}\",limit=\"{}\"",
                super::metrics::escape(&g.entity),
                g.limit
            )
        };
        for (name, help, value) in [
            (
                "tollgate_budget_used_ratio",
                "Share of each daily or monthly quota and budget used in its current window, by entity (key:<id>, pool:<kind>:<value>) and limit.",
                (|g: &engine::Gauge| g.used / g.limit_value) as fn(&engine::Gauge) -> f64,
            ),
            (
                "tollgate_budget_used",
                "Amount of each daily or monthly quota and budget used in its current window (tokens or USD).",
                |g| g.used,
            ),
            (
                "tollgate_budget_limit",
                "The limit itself (tokens or USD), for each entity with use in the current window.",
                |g| g.limit_value,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for g in &gauges {
                let _ = writeln!(out, "{name}{{{}}} {}", labels(g), value(g));
            }
        }
        for (name, help, counter) in [
            (
                "tollgate_alerts_delivered_total",
                "Alert events the webhook accepted.",
                &self.delivered,
            ),
            (
                "tollgate_alert_webhook_failures_total",
                "Alert deliveries that failed (retried with backoff; the event stays pending).",
                &self.failed,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                counter.load(Ordering::Relaxed)
            );
        }
    }
}

/// Runs `f` on a thread of its own at a lower CPU priority (nice 10), and
/// waits for it: the alerts' copy of a large policy (0.4 s of CPU at
/// 100,000 keys) is compiled after, not beside, the gateway's own load of
/// the same edit, which a revocation waits for.
async fn low_priority<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::sync::oneshot::error::RecvError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        // SAFETY: setpriority on the calling thread (who = 0 is this
        // thread's id under Linux's per-thread nice); no memory is touched.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, 10);
        }
        let _ = tx.send(f());
    });
    rx.await
}

/// How often the policy file is looked at for edits.
const POLICY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// How often the current windows are counted and checked without a record
/// arriving: gauges follow a day's rollover, crossings follow a lowered
/// limit.
const REFRESH_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Keeps the alerts on the policy at `path` until `stop` resolves: reads it
/// now and on every edit (an invalid edit is reported and the previous
/// policy kept, as the gateway does), and refreshes the windows.
pub async fn keep(
    store: AuditStore,
    stats: std::sync::Arc<super::Stats>,
    path: std::path::PathBuf,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut watch = crate::policy_file::Watch::new(&path);
    let mut policy_tick = tokio::time::interval(POLICY_EVERY);
    let mut last_refresh: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            biased;
            () = &mut stop => return,
            _ = policy_tick.tick() => {}
        }
        let current = watch.changed().cloned();
        let changed = current.is_some();
        if let Some(sources) = current {
            let stats = stats.clone();
            let loaded = low_priority(move || match sources.compiled() {
                Ok((policy, _)) => {
                    stats.alerts.set_policy(&policy);
                    Ok(())
                }
                Err(errors) => Err(errors),
            })
            .await;
            match loaded {
                Ok(Ok(())) => {}
                Ok(Err(errors)) => {
                    for e in &errors {
                        eprintln!("{e}");
                    }
                    eprintln!(
                        "collector: policy {} has {} error(s); alerts keep the previous policy",
                        path.display(),
                        errors.len()
                    );
                }
                Err(e) => tracing::error!("policy task failed: {e}"),
            }
        }
        if changed || last_refresh.is_none_or(|t| t.elapsed() >= REFRESH_EVERY) {
            last_refresh = Some(std::time::Instant::now());
            let (store, stats) = (store.clone(), stats.clone());
            let _ = tokio::task::spawn_blocking(move || {
                stats.alerts.refresh(&store, crate::clock::now_ms())
            })
            .await;
        }
    }
}

/// The identity a record's usage counts toward.
fn identity(r: &AuditRecord) -> IdentityUsage {
    IdentityUsage {
        key_id: r.key_id.clone(),
        user: r.user.clone(),
        team: r.team.clone(),
        project: r.project.clone(),
        app: r.app.clone(),
        agent: r.agent.clone(),
        tokens: 0,
        usd: 0.0,
    }
}

/// What a record was charged: every token of every class (as daily token
/// quotas count them) and its cost.
fn charged(r: &AuditRecord) -> Used {
    Used {
        tokens: r.tokens.counted().unwrap_or(0) as f64,
        usd: r.cost_usd.unwrap_or(0.0),
    }
}

/// The window as people name it: its local date (`2026-12-05`) or month
/// (`2026-12`) in the policy's zone.
fn window_name(c: &Crossing, offset_min: i32) -> String {
    let local = (c.window.start as i64 + i64::from(offset_min) * 60_000).max(0) as u64;
    let date = format_rfc3339(local);
    let len = match c.window.period {
        engine::Period::Day => 10,
        engine::Period::Month => 7,
    };
    date.get(..len).unwrap_or(&date).to_string()
}

/// An amount of a limit's measure, as people read it.
fn amount(c: &Crossing, v: f64) -> String {
    if c.metric.is_usd() {
        format!("USD {v:.2}")
    } else {
        format!("{} tokens", v.round() as u64)
    }
}

/// The Slack-compatible line of an event.
fn text(c: &Crossing, offset_min: i32) -> String {
    format!(
        "Tollgate: {} reached {}% of its {} ({} of {}) for {} {}",
        c.entity,
        (c.threshold * 100.0).round() as u64,
        c.metric.name(),
        amount(c, c.used),
        amount(c, c.limit),
        c.window.period.as_str(),
        window_name(c, offset_min),
    )
}

/// The JSON body the webhook receives (`docs/alerts.md`).
pub fn event(c: &Crossing, offset_min: i32, now: u64) -> serde_json::Value {
    let window = window_name(c, offset_min);
    serde_json::json!({
        "id": format!("{}/{}/{}/{}", c.entity, c.metric.name(), c.threshold, window),
        "entity": c.entity,
        "limit": c.metric.name(),
        "threshold": c.threshold,
        "used": c.used,
        "limit_value": c.limit,
        "ratio": c.used / c.limit,
        "window": {
            "period": c.window.period.as_str(),
            "name": window,
            "start": format_rfc3339(c.window.start),
            "end": format_rfc3339(c.window_end),
        },
        "at": format_rfc3339(now),
        "text": text(c, offset_min),
    })
}

#[cfg(test)]
mod tests;
