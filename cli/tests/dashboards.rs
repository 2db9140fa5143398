//! dashboards/: the Grafana dashboard and the Prometheus scrape example stay
//! true to docs/metrics.md (every metric they query is documented, so a
//! renamed metric breaks this test rather than a panel).

use std::collections::BTreeSet;

use serde_json::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every PromQL expression in the dashboard: panel targets (rows' nested panels too) and template queries.
fn exprs(dash: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((
                    title.clone(),
                    t["expr"].as_str().unwrap_or_else(|| panic!("{title}: target without expr")).into(),
                ));
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dash["panels"], &mut out);
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["definition"].as_str() {
            out.push((format!("variable {}", v["name"]), q.to_string()));
        }
    }
    out
}

/// The `weft_…` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("weft_"))
        .map(str::to_string)
        .collect()
}

/// Whether `name` is a row of docs/metrics.md's tables of exposed metrics
/// (`| \`name\` |`), a histogram's `_bucket`/`_sum`/`_count` counting as its family.
fn documented(docs: &str, name: &str) -> bool {
    let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
    docs.lines().any(|l| {
        l.starts_with(&format!("| `{name}` |"))
            || (family != name && l.starts_with(&format!("| `{family}` (`_bucket`")))
    })
}

#[test]
fn grafana_dashboard_queries_only_documented_metrics() {
    let dash: Value = serde_json::from_str(&read("dashboards/grafana-weft.json")).expect("grafana-weft.json is JSON");
    let docs = read("docs/metrics.md");
    assert_eq!(dash["uid"], "weft-mesh");
    let all = exprs(&dash);
    assert!(all.len() >= 15, "{all:?}");
    let mut used = BTreeSet::new();
    for (title, expr) in &all {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{title}: queries no weft metric: {expr}");
        for n in names {
            assert!(documented(&docs, &n), "{title}: {n} is not in docs/metrics.md");
            used.insert(n);
        }
    }
    // What the brief for the dashboard asks for is all there.
    for needed in [
        "weft_proxy_requests_total",
        "weft_proxy_request_duration_seconds_bucket",
        "weft_proxy_authz_decisions_total",
        "weft_proxy_rate_limited_total",
        "weft_proxy_svid_expiry_timestamp_seconds",
        "weft_proxy_config_updates_total",
        "weft_control_plane_config_version",
    ] {
        assert!(used.contains(needed), "no panel queries {needed}");
    }
    let text = serde_json::to_string(&dash).unwrap();
    for q in ["histogram_quantile(0.5,", "histogram_quantile(0.99,"] {
        assert!(text.contains(q), "no {q} panel");
    }
    // Every panel queries the chosen data source, and no two share a title.
    let mut titles = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap().iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        assert!(titles.insert(p["title"].as_str().unwrap()), "duplicate title {}", p["title"]);
    }
}

#[test]
fn the_check_catches_an_undocumented_metric() {
    let docs = read("docs/metrics.md");
    assert!(documented(&docs, "weft_proxy_request_duration_seconds_bucket"));
    assert!(documented(&docs, "weft_control_plane_sidecars_connected"));
    assert!(!documented(&docs, "weft_proxy_requests"), "the family name is not a sample name");
    assert!(!documented(&docs, "weft_proxy_made_up_total"));
    assert_eq!(
        metric_names("sum by (le) (rate(weft_proxy_request_duration_seconds_bucket{direction=\"outbound\"}[5m]))"),
        ["weft_proxy_request_duration_seconds_bucket".to_string()].into()
    );
}

#[test]
fn prometheus_example_scrapes_the_control_plane_and_the_sidecars() {
    let doc: serde_norway::Value =
        serde_norway::from_str(&read("dashboards/prometheus.yml")).expect("prometheus.yml is YAML");
    let jobs = doc["scrape_configs"].as_sequence().expect("scrape_configs");
    let job = |name: &str| {
        jobs.iter().find(|j| j["job_name"].as_str() == Some(name)).unwrap_or_else(|| panic!("no job {name}"))
    };
    for name in ["weft-control-plane", "weft-sidecars", "weft-sidecars-discovered"] {
        assert_eq!(job(name)["metrics_path"].as_str(), Some("/metrics"), "{name}");
    }
    // The documented default admin ports (docs/metrics.md).
    let targets = |name: &str| format!("{:?}", job(name)["static_configs"][0]["targets"]);
    assert!(targets("weft-control-plane").contains("127.0.0.1:7444"));
    assert!(targets("weft-sidecars").contains("127.0.0.1:15020"));
    let docs = read("docs/metrics.md");
    assert!(docs.contains("`127.0.0.1:7444`") && docs.contains("`127.0.0.1:15020`"));
}
