//! Live per-route traffic from the sidecars' own metrics: `weft top`, and
//! the table `weft up` shows. Rates and percentiles come from the change in
//! each sidecar's counters and histogram buckets between two scrapes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::output::{out, outln};

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses Prometheus / OpenMetrics text (comments skipped).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (head, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match head.split_once('{') {
            None => (head.to_string(), BTreeMap::new()),
            Some((name, rest)) => (name.to_string(), parse_labels(rest.trim_end_matches('}'))),
        };
        out.push(Sample { name, labels, value });
    }
    out
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        let Some(after) = after.strip_prefix('"') else { break };
        let mut val = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        labels.insert(key, val);
        rest = &after[end..];
    }
    labels
}

/// A sidecar to scrape.
#[derive(Debug, Clone)]
pub struct Target {
    pub spiffe_id: String,
    pub admin: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct RowKey {
    service: String,
    backend: String,
    /// `<HTTPRoute>/<rule>`, empty for a service without routes.
    route: String,
    caller: String,
    server: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LatKey {
    caller: String,
    service: String,
    route: String,
    backend: String,
}

/// Requests a callee's sidecar refused itself, by (callee service, caller SPIFFE ID, kind).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct RefusalKey {
    service: String,
    caller: String,
    kind: RefusalKind,
}

/// Why a callee's sidecar refused a request (docs/metrics.md, "Statuses the sidecars make").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    /// 403: an AuthorizationPolicy (or the default policy) denied it.
    Denied,
    /// 429: a RateLimit refused it.
    RateLimited,
}

/// What one sidecar's own gauges and counters say about it (not per request).
#[derive(Debug, Clone, Default)]
pub struct SidecarScrape {
    /// Whether /metrics answered.
    pub reachable: bool,
    /// `weft_proxy_svid_expiry_timestamp_seconds` (Unix seconds).
    pub svid_expiry: Option<f64>,
    /// `weft_proxy_config_updates_total` by outcome (`applied`, `rejected`).
    pub config_updates: BTreeMap<String, f64>,
    /// `weft_proxy_authz_decisions_total{outcome="deny"}` by policy.
    pub denied_by_policy: BTreeMap<String, f64>,
    /// `weft_proxy_rate_limited_total` by limit.
    pub limited_by_limit: BTreeMap<String, f64>,
}

/// The counters of every target at one moment; two of them give rates.
#[derive(Default, Clone)]
pub struct Scrape {
    /// (row) -> (total, successes)
    counts: HashMap<RowKey, (f64, f64)>,
    /// (row) -> (answers 403 or grpc-status 7, answers 429 or grpc-status 8)
    refused: HashMap<RowKey, (f64, f64)>,
    /// (caller, service, route, backend) -> le -> cumulative count
    buckets: HashMap<LatKey, Vec<(f64, f64)>>,
    /// inbound 403/429 answers -> count
    refusals: HashMap<RefusalKey, f64>,
    /// per sidecar, by admin address
    pub sidecars: HashMap<SocketAddr, SidecarScrape>,
}

/// Whether a request counts as a success: an HTTP status below 400 and, for
/// a gRPC call (`grpc_status` label not empty), grpc-status 0 (OK). A gRPC
/// failure is carried in HTTP 200, so the HTTP status alone would count it.
pub fn succeeded(code: &str, grpc_status: &str) -> bool {
    code.parse::<u16>().is_ok_and(|c| c < 400) && (grpc_status.is_empty() || grpc_status == "0")
}

/// Whether an answer is a refusal by the callee's sidecar: 403 (denied by an
/// AuthorizationPolicy) or 429 (rate limited), or their gRPC forms, HTTP 200
/// with grpc-status 7 or 8.
fn refusal_kind(code: &str, grpc_status: &str) -> Option<RefusalKind> {
    match (code, grpc_status) {
        ("403", _) | ("200", "7") => Some(RefusalKind::Denied),
        ("429", _) | ("200", "8") => Some(RefusalKind::RateLimited),
        _ => None,
    }
}

async fn fetch(admin: SocketAddr) -> Option<String> {
    crate::http_get(admin, "/metrics").await.map(|(_, body)| body)
}

/// Reads every target's /metrics (one after another; an unreachable one is
/// marked so and skipped).
pub async fn scrape(targets: &[Target]) -> Scrape {
    let mut s = Scrape::default();
    for t in targets {
        let Some(text) = fetch(t.admin).await else {
            s.sidecars.entry(t.admin).or_default();
            continue;
        };
        let sidecar = s.sidecars.entry(t.admin).or_default();
        sidecar.reachable = true;
        for sample in parse_metrics(&text) {
            let l = |k: &str| sample.labels.get(k).cloned().unwrap_or_default();
            match sample.name.as_str() {
                "weft_proxy_svid_expiry_timestamp_seconds" => sidecar.svid_expiry = Some(sample.value),
                "weft_proxy_config_updates_total" => {
                    *sidecar.config_updates.entry(l("outcome")).or_default() += sample.value
                }
                "weft_proxy_authz_decisions_total" if l("outcome") == "deny" => {
                    *sidecar.denied_by_policy.entry(l("policy")).or_default() += sample.value
                }
                "weft_proxy_rate_limited_total" => {
                    *sidecar.limited_by_limit.entry(l("limit")).or_default() += sample.value
                }
                "weft_proxy_requests_total" if l("direction") == "inbound" => {
                    // A gRPC caller is refused in gRPC form: HTTP 200 with
                    // grpc-status 7 (denied) or 8 (rate limited).
                    let Some(kind) = refusal_kind(&l("code"), &l("grpc_status")) else { continue };
                    let key = RefusalKey { service: l("service"), caller: l("peer"), kind };
                    *s.refusals.entry(key).or_default() += sample.value;
                }
                "weft_proxy_requests_total" if l("direction") == "outbound" => {
                    let key = RowKey {
                        service: l("service"),
                        backend: l("backend"),
                        route: l("route"),
                        caller: t.spiffe_id.clone(),
                        server: l("peer"),
                    };
                    let ok = succeeded(&l("code"), &l("grpc_status"));
                    match refusal_kind(&l("code"), &l("grpc_status")) {
                        Some(RefusalKind::Denied) => s.refused.entry(key.clone()).or_default().0 += sample.value,
                        Some(RefusalKind::RateLimited) => s.refused.entry(key.clone()).or_default().1 += sample.value,
                        None => {}
                    }
                    let e = s.counts.entry(key).or_default();
                    e.0 += sample.value;
                    if ok {
                        e.1 += sample.value;
                    }
                }
                "weft_proxy_request_duration_seconds_bucket" if l("direction") == "outbound" => {
                    let le = match l("le").as_str() {
                        "+Inf" => f64::INFINITY,
                        v => v.parse().unwrap_or(f64::INFINITY),
                    };
                    let key = LatKey {
                        caller: t.spiffe_id.clone(),
                        service: l("service"),
                        route: l("route"),
                        backend: l("backend"),
                    };
                    s.buckets.entry(key).or_default().push((le, sample.value));
                }
                _ => {}
            }
        }
    }
    s
}

/// The value below which `q` of the observations fall, from bucket deltas.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.iter().map(|b| b.1).fold(0.0, f64::max);
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, cum) in buckets {
        if cum >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let frac = if cum > prev.1 { (rank - prev.1) / (cum - prev.1) } else { 1.0 };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, cum);
    }
    None
}

fn fmt_latency(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(s) if s < 1.0 => format!("{:.1}ms", s * 1000.0),
        Some(s) => format!("{s:.2}s"),
    }
}

fn short(id: &str) -> &str {
    id.strip_prefix("spiffe://").unwrap_or(id)
}

/// One caller's requests to one service subset over one route, between two
/// scrapes: a row of `weft top` and of the dashboard's route table.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RouteTraffic {
    /// The called service (the request's `Host`).
    pub service: String,
    /// The subset the split chose (`v1`), empty without subsets.
    pub backend: String,
    /// `<HTTPRoute>/<rule>`, empty for a service without routes.
    pub route: String,
    /// The calling sidecar's SPIFFE ID.
    pub caller: String,
    /// The SPIFFE ID of the endpoint that answered, empty if none was picked.
    pub server: String,
    /// Requests per second.
    pub rps: f64,
    /// Share of answers below 400, 0..=1; `None` without requests.
    pub success: Option<f64>,
    /// Share of answers that were 403 (denied by policy), 0..=1; `None` without requests.
    pub denied: Option<f64>,
    /// Share of answers that were 429 (rate limited), 0..=1; `None` without requests.
    pub rate_limited: Option<f64>,
    /// Median latency in seconds (from histogram buckets); `None` without requests.
    pub p50_seconds: Option<f64>,
    /// 99th percentile latency in seconds; `None` without requests.
    pub p99_seconds: Option<f64>,
}

/// The per-route traffic between scrapes `prev` and `cur`, `dt` apart, sorted
/// by service, backend, route, caller, server.
pub fn traffic(prev: &Scrape, cur: &Scrape, dt: Duration) -> Vec<RouteTraffic> {
    let secs = dt.as_secs_f64().max(0.001);
    let mut keys: Vec<&RowKey> = cur.counts.keys().collect();
    keys.sort();
    keys.into_iter()
        .map(|k| {
            let (t1, s1) = cur.counts[k];
            let (t0, s0) = prev.counts.get(k).copied().unwrap_or((0.0, 0.0));
            let (dn, ds) = (t1 - t0, s1 - s0);
            let (d1, l1) = cur.refused.get(k).copied().unwrap_or((0.0, 0.0));
            let (d0, l0) = prev.refused.get(k).copied().unwrap_or((0.0, 0.0));
            let lat_key = LatKey {
                caller: k.caller.clone(),
                service: k.service.clone(),
                route: k.route.clone(),
                backend: k.backend.clone(),
            };
            let delta: Vec<(f64, f64)> = match (cur.buckets.get(&lat_key), prev.buckets.get(&lat_key)) {
                (Some(c), Some(p)) if c.len() == p.len() => c.iter().zip(p).map(|(a, b)| (a.0, a.1 - b.1)).collect(),
                (Some(c), _) => c.clone(),
                _ => Vec::new(),
            };
            RouteTraffic {
                service: k.service.clone(),
                backend: k.backend.clone(),
                route: k.route.clone(),
                caller: k.caller.clone(),
                server: k.server.clone(),
                rps: dn / secs,
                success: (dn > 0.0).then(|| ds / dn),
                denied: (dn > 0.0).then(|| (d1 - d0) / dn),
                rate_limited: (dn > 0.0).then(|| (l1 - l0) / dn),
                p50_seconds: quantile(&delta, 0.5),
                p99_seconds: quantile(&delta, 0.99),
            }
        })
        .collect()
}

/// Requests the callee's sidecar refused, per (callee service, caller, kind),
/// between two scrapes.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Refusal {
    /// The callee service whose sidecar refused.
    pub service: String,
    /// The caller's verified SPIFFE ID.
    pub caller: String,
    pub kind: RefusalKind,
    /// Refusals per second between the scrapes.
    pub rps: f64,
    /// Refusals since the callee's sidecars started.
    pub total: f64,
}

/// Inbound 403 and 429 answers between scrapes `prev` and `cur`, `dt` apart.
pub fn refusals(prev: &Scrape, cur: &Scrape, dt: Duration) -> Vec<Refusal> {
    let secs = dt.as_secs_f64().max(0.001);
    let mut keys: Vec<&RefusalKey> = cur.refusals.keys().collect();
    keys.sort();
    keys.into_iter()
        .map(|k| {
            let total = cur.refusals[k];
            let before = prev.refusals.get(k).copied().unwrap_or(0.0);
            Refusal {
                service: k.service.clone(),
                caller: k.caller.clone(),
                kind: k.kind,
                rps: (total - before).max(0.0) / secs,
                total,
            }
        })
        .collect()
}

/// The SUCCESS cell: `-` without requests; `denied` or `rate-limited` when
/// every request was refused that way by the callee's sidecar (a caller
/// missing from an ALLOW policy is not a "0.0%" service); else the percentage.
fn success_cell(r: &RouteTraffic) -> String {
    const ALL: f64 = 1.0 - 1e-9;
    match (r.success, r.denied, r.rate_limited) {
        (None, ..) => "-".into(),
        (_, Some(d), _) if d >= ALL => "denied".into(),
        (_, _, Some(l)) if l >= ALL => "rate-limited".into(),
        (Some(s), ..) => format!("{:.1}%", 100.0 * s),
    }
}

/// Renders the table for the change between two scrapes `dt` apart.
fn render(prev: &Scrape, cur: &Scrape, dt: Duration) -> String {
    let rows = traffic(prev, cur, dt);
    let mut out = format!(
        "{:<20} {:<24} {:<36} {:<36} {:>8} {:>12} {:>9} {:>9}\n",
        "SERVICE/BACKEND", "ROUTE", "CALLER (SPIFFE ID)", "SERVER (SPIFFE ID)", "RPS", "SUCCESS", "P50", "P99"
    );
    for r in &rows {
        let success = success_cell(r);
        let name = if r.backend.is_empty() { r.service.clone() } else { format!("{}/{}", r.service, r.backend) };
        out.push_str(&format!(
            "{:<20} {:<24} {:<36} {:<36} {:>8.1} {:>12} {:>9} {:>9}\n",
            name,
            if r.route.is_empty() { "-" } else { &r.route },
            short(&r.caller),
            if r.server.is_empty() { "-" } else { short(&r.server) },
            r.rps,
            success,
            fmt_latency(r.p50_seconds),
            fmt_latency(r.p99_seconds),
        ));
    }
    if rows.is_empty() {
        out.push_str("(no traffic yet)\n");
    }
    out
}

/// Scrapes `targets()` every `interval` and prints a table each time, with
/// `header()` above it; `clear` redraws in place. Stops after `iterations`.
///
/// Errors: only writing to stdout (e.g. `BrokenPipe` when piped into `head`).
pub async fn run<T, H>(
    mut targets: T,
    header: H,
    interval: Duration,
    iterations: Option<u64>,
    clear: bool,
) -> std::io::Result<()>
where
    T: FnMut() -> Vec<Target>,
    H: Fn() -> String,
{
    let mut prev = scrape(&targets()).await;
    let mut at = Instant::now();
    let mut n = 0;
    loop {
        tokio::time::sleep(interval).await;
        let cur = scrape(&targets()).await;
        let now = Instant::now();
        let table = render(&prev, &cur, now - at);
        if clear {
            out!("\x1b[2J\x1b[H")?;
        }
        outln!("{}{table}", header())?;
        prev = cur;
        at = now;
        n += 1;
        if iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text() {
        let text = "# HELP x\nweft_proxy_requests_total{direction=\"outbound\",service=\"b\",peer=\"spiffe://td/a\",code=\"200\"} 42\nup 1\nweft_x{a=\"q\\\"uote\"} 2.5\n";
        let s = parse_metrics(text);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].labels["peer"], "spiffe://td/a");
        assert_eq!(s[0].value, 42.0);
        assert_eq!(s[1].name, "up");
        assert_eq!(s[2].labels["a"], "q\"uote");
    }

    #[test]
    fn grpc_failures_in_http_200_are_failures() {
        assert!(succeeded("200", ""));
        assert!(succeeded("200", "0"));
        assert!(!succeeded("200", "14"), "UNAVAILABLE");
        assert!(!succeeded("200", "7"), "PERMISSION_DENIED");
        assert!(!succeeded("200", "none"), "a call that ended without a status");
        assert!(!succeeded("503", ""));
        assert!(!succeeded("", ""));

        // Through scrape's parsing: a row of grpc-status 14 calls has no successes.
        let text = "weft_proxy_requests_total{direction=\"outbound\",service=\"b\",peer=\"spiffe://td/a\",code=\"200\",grpc_status=\"14\"} 5\nweft_proxy_requests_total{direction=\"outbound\",service=\"b\",peer=\"spiffe://td/a\",code=\"200\",grpc_status=\"0\"} 3\n";
        let samples = parse_metrics(text);
        let ok: f64 =
            samples.iter().filter(|s| succeeded(&s.labels["code"], &s.labels["grpc_status"])).map(|s| s.value).sum();
        assert_eq!(ok, 3.0);
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        // 100 observations: 50 below 1ms, 49 in (1ms, 2ms], 1 in (2ms, 4ms].
        let b = vec![(0.001, 50.0), (0.002, 99.0), (0.004, 100.0), (f64::INFINITY, 100.0)];
        let p50 = quantile(&b, 0.5).unwrap();
        assert!((p50 - 0.001).abs() < 1e-9, "{p50}");
        let p99 = quantile(&b, 0.99).unwrap();
        assert!((p99 - 0.002).abs() < 1e-9, "{p99}");
        assert!(quantile(&[(0.001, 0.0)], 0.5).is_none());
    }

    #[test]
    fn table_shows_rates_and_success() {
        let key = RowKey {
            service: "b".into(),
            backend: "v2".into(),
            route: "b-canary/split".into(),
            caller: "spiffe://td/f".into(),
            server: "spiffe://td/b".into(),
        };
        let default_route = RowKey { route: String::new(), backend: String::new(), ..key.clone() };
        let mut prev = Scrape::default();
        prev.counts.insert(key.clone(), (10.0, 10.0));
        let mut cur = Scrape::default();
        cur.counts.insert(key, (30.0, 25.0));
        cur.counts.insert(default_route, (4.0, 4.0));
        let t = render(&prev, &cur, Duration::from_secs(2));
        let row = t.lines().find(|l| l.starts_with("b/v2")).unwrap_or_else(|| panic!("{t}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[..6], ["b/v2", "b-canary/split", "td/f", "td/b", "10.0", "75.0%"], "{t}");
        let row = t.lines().find(|l| l.starts_with("b ")).unwrap_or_else(|| panic!("{t}"));
        assert_eq!(row.split_whitespace().nth(1), Some("-"), "no route: {t}");
    }

    #[test]
    fn refused_callers_show_as_denied_or_rate_limited() {
        let row = |caller: &str| RowKey {
            service: "b".into(),
            backend: String::new(),
            route: String::new(),
            caller: caller.into(),
            server: String::new(),
        };
        let mut cur = Scrape::default();
        cur.counts.insert(row("spiffe://td/denied"), (10.0, 0.0));
        cur.refused.insert(row("spiffe://td/denied"), (10.0, 0.0));
        cur.counts.insert(row("spiffe://td/limited"), (10.0, 0.0));
        cur.refused.insert(row("spiffe://td/limited"), (0.0, 10.0));
        cur.counts.insert(row("spiffe://td/half"), (10.0, 5.0));
        cur.refused.insert(row("spiffe://td/half"), (5.0, 0.0));
        cur.counts.insert(row("spiffe://td/failing"), (10.0, 0.0));
        let t = render(&Scrape::default(), &cur, Duration::from_secs(1));
        let success = |caller: &str| {
            let line = t.lines().find(|l| l.contains(caller)).unwrap_or_else(|| panic!("{t}"));
            line.split_whitespace().nth(5).unwrap_or_default().to_string()
        };
        assert_eq!(success("td/denied"), "denied", "{t}");
        assert_eq!(success("td/limited"), "rate-limited", "{t}");
        assert_eq!(success("td/half"), "50.0%", "{t}");
        assert_eq!(success("td/failing"), "0.0%", "{t}");
    }
}
