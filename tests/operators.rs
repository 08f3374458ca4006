//! What operators run against the tier, checked by their own tools: the binaries' `/metrics`
//! by `promtool check metrics`, `deploy/prometheus` by `promtool check rules|config` and
//! `promtool test rules`, and `deploy/grafana/fanout.json` against the metrics the binaries
//! really expose. promtool comes from Debian's `prometheus` package (`make test` installs it).

mod common;

use std::{
    collections::{BTreeSet, HashSet},
    process::Command,
};

use common::*;
use serde_json::{Value, json};

/// Runs promtool with `args` in `dir`, `stdin` on its standard input; panics with its output
/// unless it succeeds.
fn promtool(dir: &std::path::Path, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool ({e}): install Debian's prometheus package (make test does)")
        });
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}: {text}");
    text
}

/// The metric families (`# TYPE` lines) of a Prometheus text exposition.
fn families(exposition: &str) -> HashSet<String> {
    exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// Every `fanout_*` metric name in a PromQL expression, histogram suffixes removed.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("fanout_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        found.insert(family.to_string());
    }
    found
}

/// The two binaries as processes (each with its own registry, as deployed), after an event
/// went through them: `(api /metrics, ws /metrics)`.
async fn live_expositions() -> (String, String) {
    let nats = NatsServer::start();
    let api = Process::start("fanout-api", &ws_process_env(&nats.url(), "ops-api", 0));
    let ws = Process::start("fanout-ws", &ws_process_env(&nats.url(), "ops-ws", 0));
    let (api, ws) = (api.server(), ws.server());
    wait_ready(&api).await;
    wait_ready(&ws).await;
    let mut client = Client::connect(&ws).await;
    client.subscribe("ops").await;
    publish(&api, "ops", &json!({"n": 1})).await;
    assert_eq!(client.event().await["data"], json!({"n": 1}));
    let scrape = |server: &Server| {
        let url = server.url("/metrics");
        async move { reqwest::get(url).await.unwrap().text().await.unwrap() }
    };
    (scrape(&api).await, scrape(&ws).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_dashboard_and_alerts_pass_the_prometheus_tools_and_match_the_binaries() {
    let (api, ws) = live_expositions().await;
    let dir = workspace();

    // Every family has HELP and TYPE and a name promtool's lint accepts.
    for (name, text) in [("fanout-api", &api), ("fanout-ws", &ws)] {
        let lint = promtool(&dir, &["check", "metrics"], Some(text));
        assert!(!lint.contains("problem"), "{name}: {lint}");
        for family in families(text) {
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "{name}: {family} has no HELP"
            );
        }
    }
    let exposed: HashSet<String> = families(&api).union(&families(&ws)).cloned().collect();
    // The canary's gauge appears with its first probe (a node without the canary has none);
    // the region mirrors' only with regions; the webhooks' only with FANOUT_WEBHOOK_URL, the
    // proxy hooks' only with a FANOUT_PROXY_*_URL (their HELP is in the tables all the same).
    let later = [
        "fanout_ws_canary_ok",
        "fanout_region_mirror_behind",
        "fanout_webhook_events_decided_total",
        "fanout_webhook_deliveries_total",
        "fanout_webhook_lag_seconds",
        "fanout_ws_proxy_duration_seconds",
        "fanout_ws_proxy_requests_total",
        "fanout_ws_proxy_breaker_open",
    ];
    let known = |metric: &str| exposed.contains(metric) || later.contains(&metric);

    // The dashboard queries only what the binaries expose, every panel through the data
    // source variable, and covers what an operator looks at first.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("deploy/grafana/fanout.json")).unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut queried = BTreeSet::new();
    let mut titles = HashSet::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap();
        assert!(titles.insert(title), "two panels are called {title:?}");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            queried.extend(metrics_in(target["expr"].as_str().unwrap()));
        }
    }
    let unknown: Vec<_> = queried.iter().filter(|m| !known(m)).collect();
    assert!(unknown.is_empty(), "the dashboard queries {unknown:?}");
    for needed in [
        "fanout_ws_connections",
        "fanout_api_events_accepted_total",
        "fanout_ws_frames_delivered_total",
        "fanout_ws_event_latency_seconds",
        "fanout_ws_slow_consumer_disconnects_total",
        "fanout_nats_connected",
        "fanout_api_errors_total",
    ] {
        assert!(queried.contains(needed), "no panel shows {needed}");
    }
    let variables: Vec<_> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["datasource", "region", "instance"]);

    // The alerts: valid rules, their unit tests pass, the example config loads them, and
    // they too query only what exists.
    let prometheus = dir.join("deploy/prometheus");
    promtool(&prometheus, &["check", "rules", "alerts.yml"], None);
    promtool(&prometheus, &["test", "rules", "alerts.test.yml"], None);
    promtool(&prometheus, &["check", "config", "prometheus.yml"], None);
    let rules = std::fs::read_to_string(prometheus.join("alerts.yml")).unwrap();
    let alerted = metrics_in(&rules);
    let unknown: Vec<_> = alerted.iter().filter(|m| !known(m)).collect();
    assert!(unknown.is_empty(), "alerts.yml queries {unknown:?}");
    assert!(alerted.len() >= 5, "{alerted:?}");
}
