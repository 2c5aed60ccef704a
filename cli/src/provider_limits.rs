//! The provider's own limits as provider pools: Anthropic's Rate Limits API
//! (Admin API) read and written as a policy include
//! (`{"provider_pools": {...}}`, see `policy_file`).
//!
//! - the organization's limits: `GET /v1/organizations/rate_limits?group_type=model_group`;
//! - with a workspace, its overrides merged over them:
//!   `GET /v1/organizations/workspaces/{id}/rate_limits?group_type=model_group`.
//!   The endpoint lists only overrides: a limit it does not list is
//!   inherited from the organization, not unlimited. A workspace value
//!   above the organization's is stored by the API but the organization's
//!   still applies, so the lower of the two is written.
//!
//! Both endpoints page with `next_page` (a cursor sent back as `page`);
//! without `limit` the API answers one page and `next_page` is null, but
//! every page is followed anyway.
//!
//! One provider pool per model group: its models, and the limits Tollgate
//! meters (`requests_per_minute`, `input_tokens_per_minute`,
//! `output_tokens_per_minute`); other limiter types are reported as
//! skipped. The group's name is the models' longest common prefix of whole
//! `-` segments (`claude-sonnet-4-0`, `claude-sonnet-4-5-20250929`, … →
//! `provider:anthropic:claude-sonnet-4`), or its shortest model id when
//! that prefix is a single segment or shared with another group.

use crate::atomic_file;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The Anthropic API version the Admin API is called with.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The environment variable holding the Admin API key.
pub const ADMIN_KEY_ENV: &str = "ANTHROPIC_ADMIN_KEY";

/// The limiter types a provider pool meters, by the policy field they fill
/// (the API's names and the policy's are the same).
pub const METERED: [&str; 3] = [
    "requests_per_minute",
    "input_tokens_per_minute",
    "output_tokens_per_minute",
];

/// Pages followed at most: the API answers one today; a cursor that never
/// ends is a bug, not a reason to loop forever.
const MAX_PAGES: usize = 1000;

/// Where and how to read the limits.
#[derive(Debug, Clone)]
pub struct Source {
    /// `https://api.anthropic.com`, or a stand-in.
    pub admin_url: String,
    pub admin_key: String,
    /// Merge this workspace's overrides over the organization's limits.
    pub workspace: Option<String>,
    /// Entries per page (`limit`, 1 to 1000); `None`: the API's one page.
    pub page_size: Option<u32>,
}

impl Source {
    /// The admin key from [`ADMIN_KEY_ENV`].
    pub fn from_env(
        admin_url: &str,
        workspace: Option<String>,
        page_size: Option<u32>,
    ) -> Result<Source> {
        let admin_key = std::env::var(ADMIN_KEY_ENV).unwrap_or_default();
        if admin_key.trim().is_empty() {
            bail!("{ADMIN_KEY_ENV} is not set: the Rate Limits API needs an Admin API key (sk-ant-admin…)");
        }
        if page_size.is_some_and(|n| !(1..=1000).contains(&n)) {
            bail!("--page-size must be from 1 to 1000 (the API's limit)");
        }
        Ok(Source {
            admin_url: admin_url.trim_end_matches('/').to_string(),
            admin_key,
            workspace,
            page_size,
        })
    }
}

/// One page of either endpoint, as documented; unknown fields are ignored
/// (the API may add some).
#[derive(Debug, Deserialize)]
struct Page {
    data: Vec<Entry>,
    #[serde(default)]
    next_page: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Entry {
    group_type: String,
    /// Null for groups that are not model groups.
    #[serde(default)]
    models: Option<Vec<String>>,
    limits: Vec<LimitValue>,
}

#[derive(Debug, Clone, Deserialize)]
struct LimitValue {
    #[serde(rename = "type")]
    kind: String,
    value: Option<f64>,
}

/// A model group with the limits that apply to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub models: Vec<String>,
    /// Limiter type → value.
    pub limits: BTreeMap<String, f64>,
}

/// What was read: the organization's model groups with any overrides
/// merged, and what could not be used.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Pulled {
    pub groups: Vec<Group>,
    /// Groups a workspace override changed.
    pub overridden: usize,
    /// Limiter types Tollgate does not meter (`tokens_per_day`, …).
    pub skipped: Vec<String>,
}

/// Reads the organization's limits (and the workspace's overrides).
pub async fn pull(source: &Source) -> Result<Pulled> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let org = entries(&client, source, "/v1/organizations/rate_limits").await?;
    let overrides = match &source.workspace {
        Some(id) => {
            entries(
                &client,
                source,
                &format!("/v1/organizations/workspaces/{id}/rate_limits"),
            )
            .await?
        }
        None => Vec::new(),
    };
    Ok(merge(org, overrides))
}

/// Every model-group entry of an endpoint, page after page.
async fn entries(client: &reqwest::Client, source: &Source, path: &str) -> Result<Vec<Entry>> {
    let url = format!("{}{path}", source.admin_url);
    let mut out = Vec::new();
    let mut page: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut query: Vec<(&str, String)> = vec![("group_type", "model_group".to_string())];
        if let Some(n) = source.page_size {
            query.push(("limit", n.to_string()));
        }
        if let Some(p) = &page {
            query.push(("page", p.clone()));
        }
        let response = client
            .get(&url)
            .query(&query)
            .header("x-api-key", &source.admin_key)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .with_context(|| format!("GET {url}"))?;
        if !status.is_success() {
            bail!("GET {url}: {}", api_error(status.as_u16(), &body));
        }
        let Page { data, next_page } = serde_json::from_slice(&body)
            .with_context(|| format!("GET {url}: not a page of rate limits"))?;
        out.extend(data.into_iter().filter(|e| e.group_type == "model_group"));
        match next_page {
            Some(next) if page.as_deref() == Some(next.as_str()) => {
                bail!("GET {url}: next_page repeats the cursor {next:?}")
            }
            Some(next) => page = Some(next),
            None => return Ok(out),
        }
    }
    bail!("GET {url}: more than {MAX_PAGES} pages")
}

/// `401 authentication_error: invalid x-api-key`, from the provider's
/// error shape, else the status and the start of the body.
fn api_error(status: u16, body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    match (
        v.pointer("/error/type").and_then(|t| t.as_str()),
        v.pointer("/error/message").and_then(|m| m.as_str()),
    ) {
        (Some(kind), Some(message)) => format!("{status} {kind}: {message}"),
        _ => format!(
            "{status}: {}",
            String::from_utf8_lossy(body.get(..200).unwrap_or(body))
        ),
    }
}

/// The organization's groups with the workspace's overrides merged: an
/// override applies to the group sharing its models; the lower of the
/// workspace's and the organization's value is enforced.
fn merge(org: Vec<Entry>, overrides: Vec<Entry>) -> Pulled {
    let mut skipped = Vec::new();
    let mut values = |e: &Entry| -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for l in &e.limits {
            match l.value {
                Some(v) if METERED.contains(&l.kind.as_str()) => {
                    out.insert(l.kind.clone(), v);
                }
                _ => {
                    if !skipped.contains(&l.kind) {
                        skipped.push(l.kind.clone());
                    }
                }
            }
        }
        out
    };
    let overrides: Vec<(Vec<String>, BTreeMap<String, f64>)> = overrides
        .iter()
        .map(|e| (e.models.clone().unwrap_or_default(), values(e)))
        .collect();
    let mut overridden = 0;
    let mut groups = Vec::new();
    for e in &org {
        let mut models = e.models.clone().unwrap_or_default();
        if models.is_empty() {
            continue;
        }
        let mut limits = values(e);
        let mut changed = false;
        for (_, own) in overrides
            .iter()
            .filter(|(m, _)| m.iter().any(|id| models.contains(id)))
        {
            for (kind, v) in own {
                let merged = limits.get(kind).map_or(*v, |org| org.min(*v));
                changed |= limits.insert(kind.clone(), merged) != Some(merged);
            }
        }
        overridden += usize::from(changed);
        models.sort();
        models.dedup();
        groups.push(Group { models, limits });
    }
    skipped.sort();
    Pulled {
        groups,
        overridden,
        skipped,
    }
}

/// A group's name from its models (see the module docs).
fn common_prefix(models: &[String]) -> Option<String> {
    let mut iter = models.iter().map(|m| m.split('-').collect::<Vec<_>>());
    let first = iter.next()?;
    let mut n = first.len();
    for other in iter {
        n = n.min(first.iter().zip(&other).take_while(|(a, b)| a == b).count());
    }
    (n >= 2).then(|| first.get(..n).unwrap_or_default().join("-"))
}

/// The provider pool name of every group, unique.
pub fn names(groups: &[Group]) -> Vec<String> {
    let shortest = |g: &Group| {
        g.models
            .iter()
            .min_by(|a, b| a.len().cmp(&b.len()).then(a.cmp(b)))
            .cloned()
            .unwrap_or_default()
    };
    let prefixes: Vec<Option<String>> = groups.iter().map(|g| common_prefix(&g.models)).collect();
    let mut names: Vec<String> = groups
        .iter()
        .zip(&prefixes)
        .map(|(g, p)| match p {
            Some(p) if prefixes.iter().filter(|q| q.as_ref() == Some(p)).count() == 1 => p.clone(),
            _ => shortest(g),
        })
        .collect();
    // Each model is in one group, so shortest ids differ; should the API
    // ever break that, a number keeps the names apart.
    for i in 0..names.len() {
        let name = names.get(i).cloned().unwrap_or_default();
        let mut n = 1;
        while names.iter().take(i).any(|m| *m == name_n(&name, n)) {
            n += 1;
        }
        if let Some(slot) = names.get_mut(i) {
            *slot = name_n(&name, n);
        }
    }
    names
        .into_iter()
        .map(|n| format!("provider:anthropic:{n}"))
        .collect()
}

fn name_n(name: &str, n: usize) -> String {
    if n == 1 {
        name.to_string()
    } else {
        format!("{name}-{n}")
    }
}

/// The include file: `{"provider_pools": {...}}`, pretty, names and models
/// sorted, so the same limits always write the same bytes (and the gateway
/// reloads only when a limit changed).
pub fn render(pulled: &Pulled) -> String {
    let mut pools = serde_json::Map::new();
    let mut named: Vec<(String, &Group)> = names(&pulled.groups)
        .into_iter()
        .zip(&pulled.groups)
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, g) in named {
        let limits: serde_json::Map<String, serde_json::Value> = g
            .limits
            .iter()
            .filter(|(_, v)| **v >= 1.0)
            .map(|(k, v)| (k.clone(), serde_json::json!(v.floor() as u64)))
            .collect();
        pools.insert(
            name,
            serde_json::json!({ "models": g.models, "limits": limits }),
        );
    }
    let doc = serde_json::json!({ "provider_pools": pools });
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Changed,
    Unchanged,
}

/// Writes the include file by rename (the gateway never reads half of
/// it), and only when its content changed.
pub fn write(path: &Path, text: &str) -> Result<Written> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(Written::Unchanged);
    }
    atomic_file::write(path, text, 0o644)?;
    Ok(Written::Changed)
}

/// One line saying what was pulled.
pub fn summary(pulled: &Pulled, source: &Source) -> String {
    let mut names = names(&pulled.groups);
    names.sort();
    let mut line = format!(
        "{} provider pool(s): {}",
        names.len(),
        names
            .iter()
            .map(|n| n.trim_start_matches("provider:"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(ws) = &source.workspace {
        line.push_str(&format!(
            "; workspace {ws} overrides {} group(s)",
            pulled.overridden
        ));
    }
    if !pulled.skipped.is_empty() {
        line.push_str(&format!(
            "; not metered by Tollgate: {}",
            pulled.skipped.join(", ")
        ));
    }
    line
}

/// `tollgate run --provider-limits-refresh`: the include file pulled again
/// on a schedule; the gateway's policy watch applies a change like any
/// policy edit.
#[derive(Debug, Clone)]
pub struct Refresh {
    pub source: Source,
    pub file: std::path::PathBuf,
    pub every: Duration,
}

impl Refresh {
    /// Pulls once before the gateway starts. A failure is fatal only when
    /// no file from an earlier pull exists: the gateway then starts on the
    /// last limits known, and says so.
    pub async fn first(&self) -> Result<()> {
        match self.once().await {
            Ok(line) => {
                crate::output::status(line);
                Ok(())
            }
            Err(e) if self.file.exists() => {
                eprintln!(
                    "warning: provider limits not refreshed ({e:#}); keeping {}",
                    self.file.display()
                );
                Ok(())
            }
            Err(e) => Err(e.context(format!(
                "pulling the provider's limits into {} (needed by --provider-limits-refresh)",
                self.file.display()
            ))),
        }
    }

    async fn once(&self) -> Result<String> {
        let pulled = pull(&self.source).await?;
        let written = write(&self.file, &render(&pulled))?;
        Ok(format!(
            "provider limits {} {}: {}",
            match written {
                Written::Changed => "written to",
                Written::Unchanged => "unchanged in",
            },
            self.file.display(),
            summary(&pulled, &self.source)
        ))
    }

    /// Pulls every period until dropped; a failed pull keeps the file.
    pub async fn run(self) {
        loop {
            tokio::time::sleep(self.every).await;
            match self.once().await {
                Ok(line) => crate::output::status(line),
                Err(e) => eprintln!(
                    "warning: provider limits not refreshed ({e:#}); keeping {}",
                    self.file.display()
                ),
            }
        }
    }
}

/// A refresh period as `--provider-limits-refresh` takes it: a duration
/// (`90s`, `30m`, `3h`, `1d`, [`crate::clock::parse_duration_ms`]), more
/// than zero.
pub fn parse_period(text: &str) -> Result<Duration, String> {
    match crate::clock::parse_duration_ms(text)? {
        0 => Err(format!("{text:?}: a refresh period must be more than zero")),
        ms => Ok(Duration::from_millis(ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: &str, models: &[&str], limits: &[(&str, f64)]) -> Entry {
        Entry {
            group_type: kind.into(),
            models: Some(models.iter().map(|m| m.to_string()).collect()),
            limits: limits
                .iter()
                .map(|(k, v)| LimitValue {
                    kind: k.to_string(),
                    value: Some(*v),
                })
                .collect(),
        }
    }

    const SONNET: [&str; 4] = [
        "claude-sonnet-4-5-20250929",
        "claude-sonnet-4-0",
        "claude-sonnet-4-5",
        "claude-sonnet-4-20250514",
    ];

    #[test]
    fn overrides_merge_over_the_organization_and_the_lower_value_applies() {
        let org = vec![
            entry(
                "model_group",
                &SONNET,
                &[
                    ("requests_per_minute", 4000.0),
                    ("input_tokens_per_minute", 2e6),
                    ("output_tokens_per_minute", 4e5),
                ],
            ),
            entry(
                "model_group",
                &["claude-haiku-4-5"],
                &[("requests_per_minute", 4000.0), ("tokens_per_day", 1e9)],
            ),
        ];
        let overrides = vec![entry(
            "model_group",
            &["claude-sonnet-4-5"],
            &[
                ("requests_per_minute", 1000.0),
                ("output_tokens_per_minute", 5e5),
            ],
        )];
        let pulled = merge(org, overrides);
        assert_eq!(pulled.overridden, 1);
        assert_eq!(pulled.skipped, ["tokens_per_day"]);
        let sonnet = &pulled.groups[0];
        assert_eq!(sonnet.models[0], "claude-sonnet-4-0", "sorted");
        // Overridden down; above the organization's, the organization's;
        // not overridden, inherited (never unlimited).
        assert_eq!(sonnet.limits["requests_per_minute"], 1000.0);
        assert_eq!(sonnet.limits["output_tokens_per_minute"], 4e5);
        assert_eq!(sonnet.limits["input_tokens_per_minute"], 2e6);
        assert_eq!(pulled.groups[1].limits.len(), 1);
    }

    #[test]
    fn groups_are_named_by_their_models_common_segments() {
        let g = |models: &[&str]| Group {
            models: models.iter().map(|m| m.to_string()).collect(),
            limits: BTreeMap::new(),
        };
        assert_eq!(
            names(&[
                g(&SONNET),
                g(&["claude-haiku-4-5", "claude-haiku-4-5-20251001"]),
                g(&["claude-sonnet-5-5"]),
                // One shared segment is no name: the shortest id instead.
                g(&["claude-3-haiku-20240307", "claude-instant-1"]),
            ]),
            [
                "provider:anthropic:claude-sonnet-4",
                "provider:anthropic:claude-haiku-4-5",
                "provider:anthropic:claude-sonnet-5-5",
                "provider:anthropic:claude-instant-1",
            ]
        );
        // Two groups with one prefix each take their shortest id.
        assert_eq!(
            names(&[
                g(&["claude-opus-4-1", "claude-opus-4-1-20250805"]),
                g(&["claude-opus-4-1-fast", "claude-opus-4-1-fast-2"]),
            ]),
            [
                "provider:anthropic:claude-opus-4-1",
                "provider:anthropic:claude-opus-4-1-fast",
            ]
        );
    }

    #[test]
    fn the_include_file_is_valid_policy_and_stable() {
        let pulled = merge(
            vec![entry(
                "model_group",
                &SONNET,
                &[
                    ("requests_per_minute", 4000.0),
                    ("output_tokens_per_minute", 0.0),
                ],
            )],
            Vec::new(),
        );
        let text = render(&pulled);
        assert_eq!(render(&pulled), text);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["provider_pools"]["provider:anthropic:claude-sonnet-4"]["limits"],
            serde_json::json!({"requests_per_minute": 4000}),
            "a zero is no limit to write"
        );
        let mut policy = v.clone();
        policy["version"] = 1.into();
        tollgate_core::policy::compile(policy.to_string().as_bytes(), "p.json", 0).unwrap();
    }

    #[test]
    fn periods_are_durations_above_zero() {
        assert_eq!(parse_period("3h"), Ok(Duration::from_secs(10_800)));
        assert_eq!(parse_period("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse_period("3 hours").unwrap_err(),
            "invalid duration \"3 hours\": use a number followed by s, m, h or d"
        );
        assert_eq!(
            parse_period("0m").unwrap_err(),
            "\"0m\": a refresh period must be more than zero"
        );
    }
}
