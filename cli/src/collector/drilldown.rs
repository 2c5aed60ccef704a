//! One key's page of the dashboard: within a view, the key's totals, its
//! spend per model and over time, its newest requests and its newest
//! denials (with the refusal's detail, the first thing asked when a key
//! "stopped working").

use super::filter::Filter;
use super::report::{GroupBy, Row};
use super::series::{Bucket, Series};
use super::store::AuditBackend;
use anyhow::Result;
use serde::Serialize;
use tollgate_core::audit::AuditRecord;

/// How many requests and denials the page lists.
pub const RECENT: usize = 20;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyView {
    pub key: String,
    /// Who the key belongs to, from its newest record in the view.
    pub user: Option<String>,
    pub team: Option<String>,
    pub project: Option<String>,
    pub totals: Row,
    /// Most expensive first.
    pub models: Vec<Row>,
    pub series: Series,
    pub recent: Vec<AuditRecord>,
    pub denials: Vec<AuditRecord>,
}

/// The key's figures in `view` (whose own key filter it replaces).
pub fn build<B: AuditBackend + ?Sized>(
    store: &B,
    key: &str,
    view: &Filter,
    bucket: Bucket,
    now_ms: u64,
) -> Result<KeyView> {
    let view = view.clone().and(GroupBy::Key, key);
    let models = store.usage(GroupBy::Model, &view)?;
    let recent = store.recent(&view, false, RECENT)?;
    let newest = recent.first();
    Ok(KeyView {
        key: key.to_string(),
        user: newest.and_then(|r| r.user.clone()),
        team: newest.and_then(|r| r.team.clone()),
        project: newest.and_then(|r| r.project.clone()),
        totals: models.totals,
        models: models.rows,
        series: store.series(&view, bucket, now_ms)?,
        denials: store.recent(&view, true, RECENT)?,
        recent,
    })
}
