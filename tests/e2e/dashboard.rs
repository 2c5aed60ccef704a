//! The dashboard in headless Chromium (driven over the DevTools protocol)
//! against the real gateway: two keys, two models, one denial. Assertions
//! are on element geometry and on the figures the page draws, compared
//! with the collector's JSON API; screenshots go to
//! target/test-artifacts/ for a person to look at, never compared.

use serde_json::Value;
use std::time::Duration;
use tollgate_e2e::cdp::Browser;
use tollgate_e2e::{policy, Gateway};

const ALICE: &str = "tg-dash-alice";
const BOB: &str = "tg-dash-bob";
const LOAD: Duration = Duration::from_secs(20);

/// alice (payments) has a daily budget and her team a pool budget; bob
/// (search) a daily token quota and one request per minute.
fn dashboard_policy() -> String {
    let p = policy(
        r#"{"models": ["claude-*", "gpt-4o*"], "limits": {"requests_per_minute": 1000}}"#,
        &[
            (
                "alice",
                ALICE,
                r#""user": "alice@example.com", "team": "payments", "project": "checkout", "limits": {"budget_usd_per_day": 0.009}"#,
            ),
            (
                "bob",
                BOB,
                r#""user": "bob@example.com", "team": "search", "limits": {"requests_per_minute": 1, "tokens_per_day": 1000}"#,
            ),
        ],
    );
    format!(
        r#"{}, "pools": {{"team:payments": {{"budget_usd_per_day": 0.02}}}},
        "prices": {{"claude-sonnet-4-*": {{"input": 3, "output": 15}}, "gpt-4o*": {{"input": 2.5, "output": 10}}}}}}"#,
        p.trim_end().trim_end_matches('}')
    )
}

const CLAUDE: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":300,"messages":[{"role":"user","content":"hi"}]}"#;
const GPT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

fn get(gw: &Gateway, path_and_query: &str) -> Value {
    let url = format!("{}{path_and_query}", gw.collector_http.as_ref().unwrap());
    let r = gw.client().get(&url).send().unwrap();
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.json().unwrap()
}

/// The page's figures: KPIs, the spend chart's bars, the burn-down cards.
fn figures(b: &mut Browser) -> Value {
    b.eval(
        r##"(() => {
          const num = s => Number(s.replace(/[$,]/g, ""));
          const bars = [...document.querySelectorAll("#spend-chart rect.bar-rect")];
          return {
            view: location.search,
            requests: num(document.getElementById("k-requests").textContent),
            denied: num(document.getElementById("k-denied").textContent),
            cost: document.getElementById("k-cost").textContent,
            bars: bars.length,
            bar_cost: bars.reduce((s, r) => s + Number(r.dataset.cost), 0),
            bar_requests: bars.reduce((s, r) => s + Number(r.dataset.requests), 0),
            chart_total: Number(document.getElementById("spend-chart").dataset.totalCost),
            teams: [...document.querySelectorAll("#t-team tr[data-name]")].map(r => r.dataset.name),
            burns: [...document.querySelectorAll(".burn")].map(d => ({
              entity: d.dataset.entity, limit: d.dataset.limit, used: Number(d.dataset.used),
              alerts: d.querySelectorAll(".alert-line").length,
              crossed: d.querySelectorAll('.alert-line[data-crossed="true"]').length,
              points: Number(d.querySelector(".used-line").dataset.points),
            })),
          };
        })()"##,
    )
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// Opens the dashboard at `search`, waiting for that view's figures (not
/// the previous page's).
fn open(b: &mut Browser, base: &str, search: &str) {
    b.eval("document.body && delete document.body.dataset.view");
    b.navigate(&format!("{base}/{search}"));
    wait_loaded(b, search);
}

fn wait_loaded(b: &mut Browser, search: &str) {
    let want = serde_json::to_string(search).unwrap();
    b.wait_for(
        &format!(
            "document.body.dataset.loaded === 'true' && document.body.dataset.view === {want}"
        ),
        LOAD,
    );
}

/// No box wider than its content allows: every card, KPI, bar track,
/// burn-down and the filter form holds its content (scrollWidth <=
/// clientWidth), every box and chart lies inside the window, and the page
/// does not scroll sideways.
fn assert_nothing_overflows(b: &mut Browser, width: u32) {
    let layout = b.eval("window.__layout()");
    assert_eq!(layout["innerWidth"], width);
    assert!(
        layout["pageScrollWidth"].as_f64().unwrap() <= f64::from(width),
        "the page scrolls sideways at {width}px: {layout}"
    );
    let boxes = layout["boxes"].as_array().unwrap();
    assert!(boxes.len() > 20, "{layout}");
    for bx in boxes {
        let cls = bx["cls"].as_str().unwrap();
        if cls != "svg" && !cls.contains("chart") {
            assert!(
                bx["scrollWidth"].as_f64() <= bx["clientWidth"].as_f64(),
                "content wider than its box at {width}px: {bx}"
            );
        }
        assert!(
            bx["left"].as_f64().unwrap() >= 0.0
                && bx["right"].as_f64().unwrap() <= f64::from(width) + 0.5,
            "outside the window at {width}px: {bx}"
        );
    }
}

#[test]
fn dashboard_charts_filters_and_drills_down_without_overflowing() {
    let gw = Gateway::start(&dashboard_policy());
    let send = |key: &str, id: &str, path: &str, body: &str| {
        let auth = if path.contains("chat") {
            ("authorization", format!("Bearer {key}"))
        } else {
            ("x-api-key", key.to_string())
        };
        let r = gw.post_with(path, &[(auth.0, &auth.1), ("x-request-id", id)], body);
        r.status().as_u16()
    };
    // alice: one GPT call (58 in, 69 out: $0.000835), then three Claude
    // calls (61 in, 74 out: $0.001293 each); bob: one Claude call, then a
    // second refused by his one request per minute.
    assert_eq!(send(ALICE, "a-gpt", "/v1/chat/completions", GPT), 200);
    for i in 0..3 {
        assert_eq!(send(ALICE, &format!("a-{i}"), "/v1/messages", CLAUDE), 200);
    }
    assert_eq!(send(BOB, "b-0", "/v1/messages", CLAUDE), 200);
    assert_eq!(send(BOB, "b-1", "/v1/messages", CLAUDE), 429);
    for id in ["a-gpt", "a-0", "a-1", "a-2", "b-0", "b-1"] {
        gw.audit_record(id);
    }

    let usage = get(&gw, "/api/usage?by=team&since=1h");
    assert_eq!(usage["totals"]["requests"], 6);
    assert_eq!(usage["totals"]["denied"], 1);
    let cost = usage["totals"]["cost_usd"].as_f64().unwrap();
    assert!(close(cost, 0.000835 + 4.0 * 0.001293), "{usage}");
    let daily = get(&gw, "/api/series?since=1h&bucket=day");
    let hourly = get(&gw, "/api/series?since=1h&bucket=hour");
    assert!(close(daily["totals"]["cost_usd"].as_f64().unwrap(), cost));
    assert_eq!(hourly["totals"]["requests"], 6);
    let burn = get(&gw, "/api/burndown?since=1h");
    let limits: Vec<(&str, &str)> = burn["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["entity"].as_str().unwrap(), l["limit"].as_str().unwrap()))
        .collect();
    assert_eq!(
        limits,
        [
            ("key:alice", "budget_usd_per_day"),
            ("team:payments", "budget_usd_per_day"),
            ("key:bob", "tokens_per_day"),
        ],
        "most used first: {burn}"
    );
    let alice_used = burn["limits"][0]["used"].as_f64().unwrap();
    assert!(close(alice_used, 0.000835 + 3.0 * 0.001293), "{burn}");
    assert_eq!(burn["limits"][2]["used"], 135.0, "bob's 61 + 74 tokens");

    let artifacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let base = gw.collector_http.clone().unwrap();
    let mut b = Browser::start();

    // The morning view at desktop width.
    b.resize(1280, 900);
    open(&mut b, &base, "?since=1h");
    let f = figures(&mut b);
    assert_eq!(
        (f["requests"].clone(), f["denied"].clone()),
        (6.into(), 1.into()),
        "{f}"
    );
    assert_eq!(f["cost"], format!("${cost:.4}"));
    assert_eq!(f["bars"], daily["points"].as_array().unwrap().len());
    assert!(close(f["bar_cost"].as_f64().unwrap(), cost), "{f}");
    assert!(close(f["chart_total"].as_f64().unwrap(), cost), "{f}");
    assert_eq!(f["bar_requests"], 6);
    assert_eq!(f["teams"], serde_json::json!(["payments", "search"]));
    let burns = f["burns"].as_array().unwrap();
    assert_eq!(burns.len(), 3, "{f}");
    for (drawn, api) in burns.iter().zip(burn["limits"].as_array().unwrap()) {
        assert_eq!(drawn["entity"], api["entity"]);
        assert!(close(
            drawn["used"].as_f64().unwrap(),
            api["used"].as_f64().unwrap()
        ));
        assert_eq!(drawn["points"], api["points"].as_array().unwrap().len());
        assert_eq!(drawn["alerts"], 3, "50, 80 and 100% marked: {drawn}");
    }
    // alice used 52% of $0.009: the 50% line is crossed, 80% is not.
    assert_eq!(burns[0]["crossed"], 1, "{f}");
    assert_eq!(burns[2]["crossed"], 0, "bob: 135 of 1000 tokens");
    assert_nothing_overflows(&mut b, 1280);
    b.screenshot(&artifacts.join("dashboard-1280.png"));

    // By the hour: the toggle redraws the chart with the hourly buckets.
    b.click("[data-bucket=hour]");
    wait_loaded(&mut b, "?since=1h&bucket=hour");
    let f = figures(&mut b);
    assert_eq!(f["bars"], hourly["points"].as_array().unwrap().len());
    assert!(close(f["bar_cost"].as_f64().unwrap(), cost), "{f}");

    // A model filter narrows every panel to that model's requests.
    let models = get(&gw, "/api/usage?by=model&since=1h");
    let gpt = models["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .find(|n| n.starts_with("gpt-4o"))
        .unwrap_or_else(|| panic!("no GPT row: {models}"));
    b.eval(&format!(
        "(() => {{ const s = document.querySelector('#filters [name=model]');
           s.value = {}; s.dispatchEvent(new Event('change')); }})()",
        serde_json::to_string(&gpt).unwrap()
    ));
    let search = format!("?since=1h&model={}&bucket=hour", gpt.replace(':', "%3A"));
    wait_loaded(&mut b, &search);
    let f = figures(&mut b);
    let only = get(&gw, &format!("/api/series{search}"));
    assert_eq!(f["requests"], 1, "{f}");
    assert_eq!(f["denied"], 0);
    assert!(close(f["bar_cost"].as_f64().unwrap(), 0.000835), "{f}");
    assert!(close(
        only["totals"]["cost_usd"].as_f64().unwrap(),
        0.000835
    ));
    assert_eq!(f["teams"], serde_json::json!(["payments"]));
    assert!(
        close(f["burns"][0]["used"].as_f64().unwrap(), 0.000835),
        "alice's budget, GPT share: {f}"
    );
    assert_nothing_overflows(&mut b, 1280);

    // A key filter, bookmarked: bob's two requests, one denied; only his
    // own token quota in the burn-down.
    open(&mut b, &base, "?since=1h&key=bob");
    let f = figures(&mut b);
    assert_eq!(
        (f["requests"].clone(), f["denied"].clone()),
        (2.into(), 1.into()),
        "{f}"
    );
    assert!(close(f["bar_cost"].as_f64().unwrap(), 0.001293), "{f}");
    assert_eq!(f["teams"], serde_json::json!(["search"]));
    assert_eq!(
        f["burns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["entity"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["key:bob"],
        "{f}"
    );

    // A key's drill-down, opened by clicking its row.
    open(&mut b, &base, "?since=1h");
    b.click("#t-key tr[data-name=bob]");
    wait_loaded(&mut b, "?since=1h&drill=bob");
    let bob = get(&gw, "/api/key?id=bob&since=1h");
    let drill = b.eval(
        r##"(() => {
          const d = document.getElementById("drill");
          const k = n => d.querySelector(`[data-k=${n}]`);
          return {
            hidden: d.hidden, key: d.dataset.key,
            requests: k("requests").textContent, denied: k("denied").textContent,
            tokens: k("tokens").textContent, cost: Number(k("cost").dataset.value),
            bars: d.querySelectorAll("#drill-chart rect.bar-rect").length,
            models: [...d.querySelectorAll("#t-drill-models tr[data-name]")].map(r => r.dataset.name),
            denials: [...d.querySelectorAll("#t-drill-denials tr[data-request]")].map(r => r.dataset.request + " " + r.cells[2].textContent),
            recent: [...d.querySelectorAll("#t-drill-recent tr[data-request]")].map(r => r.dataset.request),
          };
        })()"##,
    );
    assert_eq!(drill["hidden"], false);
    assert_eq!(drill["key"], "bob");
    assert_eq!(
        (
            drill["requests"].clone(),
            drill["denied"].clone(),
            drill["tokens"].clone()
        ),
        ("2".into(), "1".into(), "135".into()),
        "{drill}"
    );
    assert!(close(drill["cost"].as_f64().unwrap(), 0.001293), "{drill}");
    assert!(close(bob["totals"]["cost_usd"].as_f64().unwrap(), 0.001293));
    assert_eq!(
        drill["bars"],
        bob["series"]["points"].as_array().unwrap().len()
    );
    assert_eq!(drill["recent"], serde_json::json!(["b-1", "b-0"]));
    let denials = drill["denials"].as_array().unwrap();
    assert_eq!(denials.len(), 1, "{drill}");
    assert!(
        denials[0].as_str().unwrap().starts_with("b-1 rate_limited"),
        "{drill}"
    );
    assert_nothing_overflows(&mut b, 1280);
    b.screenshot(&artifacts.join("dashboard-drill.png"));

    // A phone's width: one column, nothing wider than the screen.
    b.resize(390, 844);
    open(&mut b, &base, "?since=1h&drill=bob");
    assert_nothing_overflows(&mut b, 390);
    let cards = b.eval(
        "[...document.querySelectorAll('body > .grid > .card:not([hidden])')].map(c => c.getBoundingClientRect().width)",
    );
    let widths: Vec<f64> = cards
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap())
        .collect();
    assert!(widths.len() >= 8, "{cards}");
    assert!(
        widths.iter().all(|w| (w - widths[0]).abs() < 1.0),
        "one column: {widths:?}"
    );
    b.screenshot(&artifacts.join("dashboard-390.png"));
}
