//! `weft dashboard`: a live web view of the mesh. One self-contained page
//! (`dashboard.html`, embedded) polls `GET /api/mesh` once a second; that
//! JSON is rebuilt every `--interval` from the control plane's Status RPC
//! (the sidecars, their SVID expiry and config sync state, as `weft status`
//! shows them) and the sidecars' /metrics (rates, success and latency per
//! route, computed by the same code as `weft top`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use weft_proto::admin::v1::StatusResponse;

use crate::human;
use crate::operator::{self, ConnArgs};
use crate::output::outln;
use crate::top::{self, RefusalKind, RouteTraffic, Scrape, Target};

/// The page, HTML + CSS + JS in one file: no CDN, no build step.
const PAGE: &str = include_str!("dashboard.html");

#[derive(clap::Args, Debug)]
pub struct DashboardArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Address to serve the dashboard on (HTTP, no authentication: keep it on loopback).
    #[arg(long, env = "WEFT_DASHBOARD_LISTEN", default_value = "127.0.0.1:7480")]
    pub listen: SocketAddr,
    /// Time between scrapes of the control plane and the sidecars, e.g. 1s, 5s.
    #[arg(long, default_value = "1s", value_parser = crate::humantime_duration)]
    pub interval: Duration,
}

/// What `GET /api/mesh` answers: the mesh over the last scrape interval.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MeshView {
    /// The `--control-plane` address.
    pub control_plane: String,
    pub trust_domain: String,
    /// Version of the config snapshot the control plane serves.
    pub config_version: u64,
    /// Why the last edit of the mesh file was rejected; empty if it was not.
    pub config_error: String,
    /// When this view was made (Unix seconds).
    pub generated_at: i64,
    /// Seconds between the two scrapes the rates come from; 0 before the second scrape.
    pub window_seconds: f64,
    /// Why the control plane could not be asked (the rest is then empty).
    pub error: Option<String>,
    /// The nodes of the service graph.
    pub services: Vec<ServiceNode>,
    /// caller service -> callee service.
    pub edges: Vec<Edge>,
    /// Per caller, service subset and route: the rows of `weft top`.
    pub routes: Vec<RouteTraffic>,
    /// Share of each backend subset per (service, route).
    pub splits: Vec<Split>,
    /// Requests refused by the callee's sidecar (403 denied, 429 rate-limited), per caller.
    pub refusals: Vec<top::Refusal>,
    /// The same refusals by the AuthorizationPolicy or RateLimit that made them.
    pub refused_by_rule: Vec<RuleRefusals>,
    pub sidecars: Vec<SidecarView>,
}

/// A service: a node of the graph.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceNode {
    pub name: String,
    /// Connected sidecars of the service.
    pub sidecars: usize,
    /// Their SPIFFE IDs (one per service account, however many replicas).
    pub identities: Vec<String>,
}

/// Calls from one service to another over the last interval.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Edge {
    /// Caller service (or the caller's SPIFFE ID when no connected sidecar has it).
    pub from: String,
    /// Callee service.
    pub to: String,
    /// SPIFFE IDs of the calling sidecars.
    pub callers: Vec<String>,
    /// SPIFFE IDs of the endpoints that answered.
    pub callees: Vec<String>,
    /// Requests per second, as the callers counted them.
    pub rps: f64,
    /// Share of answers below 400 (0..=1); `None` without requests.
    pub success: Option<f64>,
    /// Requests per second the callee's sidecars denied (403).
    pub denied_rps: f64,
    /// Requests per second the callee's sidecars rate-limited (429).
    pub rate_limited_rps: f64,
}

/// How one route's requests are shared among a service's subsets.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Split {
    pub service: String,
    /// `<HTTPRoute>/<rule>`, empty for the default route.
    pub route: String,
    /// Requests per second over all subsets.
    pub rps: f64,
    pub backends: Vec<SplitShare>,
}

/// One subset's part of a [`Split`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct SplitShare {
    /// Subset name, empty when the backend ref names none.
    pub backend: String,
    pub rps: f64,
    /// Share of the route's requests, 0..=1; `None` without requests.
    pub share: Option<f64>,
}

/// Refusals by the rule that made them, summed over a service's sidecars.
#[derive(Debug, Clone, Serialize)]
pub struct RuleRefusals {
    /// The service whose sidecars refused.
    pub service: String,
    pub kind: RefusalKind,
    /// AuthorizationPolicy name (or `no-allow-match`, `default`), or RateLimit name.
    pub rule: String,
    /// Per second over the last interval.
    pub rps: f64,
    /// Since the sidecars started.
    pub total: f64,
}

/// A connected sidecar, as `weft status` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SidecarView {
    pub spiffe_id: String,
    pub service: String,
    pub address: String,
    pub admin_address: String,
    pub labels: BTreeMap<String, String>,
    /// Unix seconds.
    pub svid_expires_at: i64,
    /// RFC 3339.
    pub svid_expires: String,
    /// `in 59m47s` / `expired 3m ago`.
    pub svid_expires_in: String,
    pub svid_seconds_left: i64,
    pub acked_version: u64,
    pub in_sync: bool,
    /// `in sync`, `stale (lag N)` or `REJECTED: reason`.
    pub sync: String,
    /// Whether its /metrics answered at the last scrape.
    pub metrics_reachable: bool,
}

/// Builds the view from a Status answer and two scrapes `dt` apart (`prev`
/// is `None` at the first scrape: no rates yet).
pub fn build_view(
    conn: &ConnArgs,
    status: &StatusResponse,
    prev: Option<&Scrape>,
    cur: &Scrape,
    dt: Duration,
    now: i64,
) -> MeshView {
    let service_of: HashMap<&str, &str> =
        status.sidecars.iter().map(|p| (p.spiffe_id.as_str(), p.service.as_str())).collect();
    let (routes, refusals) = match prev {
        Some(prev) => (top::traffic(prev, cur, dt), top::refusals(prev, cur, dt)),
        None => (Vec::new(), Vec::new()),
    };

    let mut services: BTreeMap<String, ServiceNode> = BTreeMap::new();
    for p in &status.sidecars {
        let node = services
            .entry(p.service.clone())
            .or_insert_with(|| ServiceNode { name: p.service.clone(), ..Default::default() });
        node.sidecars += 1;
        if !node.identities.contains(&p.spiffe_id) {
            node.identities.push(p.spiffe_id.clone());
        }
    }

    // Edges: the callers' view of requests, then the callees' refusals added on.
    #[derive(Default)]
    struct Acc {
        callers: BTreeSet<String>,
        callees: BTreeSet<String>,
        rps: f64,
        ok_rps: f64,
        denied: f64,
        limited: f64,
    }
    let caller_service = |id: &str| service_of.get(id).map_or_else(|| id.to_string(), |s| s.to_string());
    let mut edges: BTreeMap<(String, String), Acc> = BTreeMap::new();
    for r in &routes {
        let e = edges.entry((caller_service(&r.caller), r.service.clone())).or_default();
        e.callers.insert(r.caller.clone());
        if !r.server.is_empty() {
            e.callees.insert(r.server.clone());
        }
        e.rps += r.rps;
        e.ok_rps += r.rps * r.success.unwrap_or(0.0);
    }
    for f in &refusals {
        let e = edges.entry((caller_service(&f.caller), f.service.clone())).or_default();
        e.callers.insert(f.caller.clone());
        match f.kind {
            RefusalKind::Denied => e.denied += f.rps,
            RefusalKind::RateLimited => e.limited += f.rps,
        }
    }
    for (from, to) in edges.keys() {
        for name in [from, to] {
            services.entry(name.clone()).or_insert_with(|| ServiceNode { name: name.clone(), ..Default::default() });
        }
    }
    let edges = edges
        .into_iter()
        .map(|((from, to), a)| Edge {
            from,
            to,
            callers: a.callers.into_iter().collect(),
            callees: a.callees.into_iter().collect(),
            rps: a.rps,
            success: (a.rps > 0.0).then(|| a.ok_rps / a.rps),
            denied_rps: a.denied,
            rate_limited_rps: a.limited,
        })
        .collect();

    // Splits: routes whose requests went to named subsets.
    let mut splits: BTreeMap<(String, String), BTreeMap<String, f64>> = BTreeMap::new();
    for r in routes.iter().filter(|r| !r.backend.is_empty()) {
        *splits.entry((r.service.clone(), r.route.clone())).or_default().entry(r.backend.clone()).or_default() += r.rps;
    }
    let splits = splits
        .into_iter()
        .map(|((service, route), backends)| {
            let rps: f64 = backends.values().sum();
            Split {
                service,
                route,
                rps,
                backends: backends
                    .into_iter()
                    .map(|(backend, b)| SplitShare { backend, rps: b, share: (rps > 0.0).then(|| b / rps) })
                    .collect(),
            }
        })
        .collect();

    // Refusals by rule: per sidecar counter deltas, summed per service.
    let admin_service: HashMap<SocketAddr, &str> =
        status.sidecars.iter().filter_map(|p| Some((p.admin_address.parse().ok()?, p.service.as_str()))).collect();
    let secs = dt.as_secs_f64().max(0.001);
    let mut by_rule: BTreeMap<(String, RefusalKind, String), (f64, f64)> = BTreeMap::new();
    for (admin, sc) in &cur.sidecars {
        let Some(service) = admin_service.get(admin) else { continue };
        let before = prev.and_then(|p| p.sidecars.get(admin));
        for (kind, now_counts, before_counts) in [
            (RefusalKind::Denied, &sc.denied_by_policy, before.map(|b| &b.denied_by_policy)),
            (RefusalKind::RateLimited, &sc.limited_by_limit, before.map(|b| &b.limited_by_limit)),
        ] {
            for (rule, total) in now_counts {
                let delta = before_counts.map_or(0.0, |b| (total - b.get(rule).copied().unwrap_or(0.0)).max(0.0));
                let e = by_rule.entry((service.to_string(), kind, rule.clone())).or_default();
                e.0 += delta / secs;
                e.1 += total;
            }
        }
    }
    let refused_by_rule = by_rule
        .into_iter()
        .map(|((service, kind, rule), (rps, total))| RuleRefusals { service, kind, rule, rps, total })
        .collect();

    let mut sidecars: Vec<SidecarView> = status
        .sidecars
        .iter()
        .map(|p| {
            let reachable = p
                .admin_address
                .parse::<SocketAddr>()
                .ok()
                .and_then(|a| cur.sidecars.get(&a))
                .is_some_and(|s| s.reachable);
            SidecarView {
                spiffe_id: p.spiffe_id.clone(),
                service: p.service.clone(),
                address: p.inbound_address.clone(),
                admin_address: p.admin_address.clone(),
                labels: p.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                svid_expires_at: p.svid_expires_at,
                svid_expires: human::rfc3339(p.svid_expires_at),
                svid_expires_in: human::relative(p.svid_expires_at, now),
                svid_seconds_left: p.svid_expires_at - now,
                acked_version: p.acked_version,
                in_sync: operator::in_sync(p, status).unwrap_or(false),
                sync: operator::sync_state(p, status),
                metrics_reachable: reachable,
            }
        })
        .collect();
    sidecars.sort_by(|a, b| (&a.service, &a.address).cmp(&(&b.service, &b.address)));

    MeshView {
        control_plane: conn.control_plane.clone(),
        trust_domain: status.trust_domain.clone(),
        config_version: status.config_version,
        config_error: status.config_error.clone(),
        generated_at: now,
        window_seconds: if prev.is_some() { dt.as_secs_f64() } else { 0.0 },
        error: None,
        services: services.into_values().collect(),
        edges,
        routes,
        splits,
        refusals,
        refused_by_rule,
        sidecars,
    }
}

/// Asks the control plane and scrapes the sidecars every `interval`,
/// publishing each view as JSON on `tx`. Runs until the receiver is gone.
async fn refresh(conn: ConnArgs, interval: Duration, tx: tokio::sync::watch::Sender<Bytes>) -> anyhow::Result<()> {
    let mut client = operator::client(&conn).await?;
    let mut prev: Option<(Scrape, Instant)> = None;
    while !tx.is_closed() {
        let tick = Instant::now();
        let view = match operator::fetch_status(&mut client, &conn).await {
            Ok(status) => {
                let targets: Vec<Target> = status
                    .sidecars
                    .iter()
                    .filter_map(|p| {
                        Some(Target { admin: p.admin_address.parse().ok()?, spiffe_id: p.spiffe_id.clone() })
                    })
                    .collect();
                let cur = top::scrape(&targets).await;
                let at = Instant::now();
                let view = match &prev {
                    Some((p, then)) => build_view(&conn, &status, Some(p), &cur, at - *then, human::now_unix()),
                    None => build_view(&conn, &status, None, &cur, Duration::ZERO, human::now_unix()),
                };
                prev = Some((cur, at));
                view
            }
            Err(e) => {
                // Rates would span the outage; start them afresh.
                prev = None;
                MeshView {
                    control_plane: conn.control_plane.clone(),
                    generated_at: human::now_unix(),
                    error: Some(format!("{e:#}")),
                    ..Default::default()
                }
            }
        };
        tx.send_replace(Bytes::from(serde_json::to_vec(&view)?));
        tokio::time::sleep(interval.saturating_sub(tick.elapsed())).await;
    }
    Ok(())
}

fn respond(status: StatusCode, content_type: &str, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(Full::new(body))
        .expect("static response parts")
}

fn handle(req: &Request<Incoming>, latest: &tokio::sync::watch::Receiver<Bytes>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", Bytes::from_static(b"only GET\n"));
    }
    match req.uri().path() {
        "/" | "/index.html" => respond(StatusCode::OK, "text/html; charset=utf-8", Bytes::from_static(PAGE.as_bytes())),
        "/api/mesh" => respond(StatusCode::OK, "application/json", latest.borrow().clone()),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", Bytes::from_static(b"not found; try / or /api/mesh\n")),
    }
}

pub async fn run(args: DashboardArgs) -> anyhow::Result<()> {
    // Fail now on a wrong --pki, rather than as a banner in a page nobody opened yet.
    operator::client(&args.conn).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot listen there (pick another address)", args.listen))?;
    let addr = listener.local_addr()?;
    let starting = MeshView {
        control_plane: args.conn.control_plane.clone(),
        generated_at: human::now_unix(),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::watch::channel(Bytes::from(serde_json::to_vec(&starting)?));
    outln!("weft dashboard on http://{addr}/ (control plane {}); Ctrl-C to stop", args.conn.control_plane)?;
    let refresher = tokio::spawn(refresh(args.conn.clone(), args.interval, tx));
    let serve = async {
        loop {
            let (tcp, _) = listener.accept().await?;
            let rx = rx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let resp = handle(&req, &rx);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    };
    tokio::select! {
        r = serve => r,
        r = refresher => r.context("dashboard refresh task")?,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::admin::v1::SidecarStatus;

    fn sidecar(id: &str, service: &str, admin: &str, version: Option<&str>) -> SidecarStatus {
        SidecarStatus {
            spiffe_id: id.into(),
            service: service.into(),
            inbound_address: format!("{admin}-in"),
            admin_address: admin.into(),
            labels: version.map(|v| [("version".to_string(), v.to_string())].into_iter().collect()).unwrap_or_default(),
            svid_expires_at: 1_000 + 3587,
            acked_version: 7,
            ..Default::default()
        }
    }

    const METRICS_FRONTEND_0: &str = "\
weft_proxy_requests_total{direction=\"outbound\",service=\"backend\",route=\"canary/split\",backend=\"v1\",peer=\"spiffe://td/sa/backend\",code=\"200\"} 100
weft_proxy_requests_total{direction=\"outbound\",service=\"backend\",route=\"canary/split\",backend=\"v2\",peer=\"spiffe://td/sa/backend\",code=\"200\"} 10
";
    const METRICS_FRONTEND_1: &str = "\
weft_proxy_requests_total{direction=\"outbound\",service=\"backend\",route=\"canary/split\",backend=\"v1\",peer=\"spiffe://td/sa/backend\",code=\"200\"} 190
weft_proxy_requests_total{direction=\"outbound\",service=\"backend\",route=\"canary/split\",backend=\"v2\",peer=\"spiffe://td/sa/backend\",code=\"200\"} 20
";
    const METRICS_BACKEND_0: &str = "\
weft_proxy_requests_total{direction=\"inbound\",service=\"backend\",route=\"\",backend=\"\",peer=\"spiffe://td/sa/batch\",code=\"403\"} 4
weft_proxy_authz_decisions_total{policy=\"callers\",outcome=\"deny\",protocol=\"http\"} 4
weft_proxy_svid_expiry_timestamp_seconds 4587
";
    const METRICS_BACKEND_1: &str = "\
weft_proxy_requests_total{direction=\"inbound\",service=\"backend\",route=\"\",backend=\"\",peer=\"spiffe://td/sa/batch\",code=\"403\"} 14
weft_proxy_requests_total{direction=\"inbound\",service=\"backend\",route=\"\",backend=\"\",peer=\"spiffe://td/sa/frontend\",code=\"429\"} 6
weft_proxy_authz_decisions_total{policy=\"callers\",outcome=\"deny\",protocol=\"http\"} 14
weft_proxy_authz_decisions_total{policy=\"callers\",outcome=\"allow\",protocol=\"http\"} 99
weft_proxy_rate_limited_total{limit=\"per-caller\"} 6
";

    /// A real HTTP server answering /metrics with whatever `text` holds now.
    async fn metrics_server(text: std::sync::Arc<std::sync::Mutex<&'static str>>) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = l.accept().await else { return };
                let text = text.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        let body = *text.lock().unwrap();
                        async move {
                            Ok::<_, Infallible>(respond(
                                StatusCode::OK,
                                "text/plain",
                                Bytes::from_static(body.as_bytes()),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn view_has_edges_splits_refusals_and_sidecars() {
        let frontend_text = std::sync::Arc::new(std::sync::Mutex::new(METRICS_FRONTEND_0));
        let backend_text = std::sync::Arc::new(std::sync::Mutex::new(METRICS_BACKEND_0));
        let frontend = metrics_server(frontend_text.clone()).await;
        let backend = metrics_server(backend_text.clone()).await;
        let batch = weft_testkit::free_addr(); // nothing listens: unreachable
        let targets = [
            Target { spiffe_id: "spiffe://td/sa/frontend".into(), admin: frontend },
            Target { spiffe_id: "spiffe://td/sa/backend".into(), admin: backend },
            Target { spiffe_id: "spiffe://td/sa/batch".into(), admin: batch },
        ];
        let prev = top::scrape(&targets).await;
        *frontend_text.lock().unwrap() = METRICS_FRONTEND_1;
        *backend_text.lock().unwrap() = METRICS_BACKEND_1;
        let cur = top::scrape(&targets).await;
        let status = StatusResponse {
            trust_domain: "td".into(),
            config_version: 7,
            sidecars: vec![
                sidecar("spiffe://td/sa/frontend", "frontend", &frontend.to_string(), None),
                sidecar("spiffe://td/sa/backend", "backend", &backend.to_string(), Some("v1")),
                SidecarStatus {
                    acked_version: 5,
                    ..sidecar("spiffe://td/sa/batch", "batch", &batch.to_string(), None)
                },
            ],
            ..Default::default()
        };
        let conn = ConnArgs { control_plane: "cp:7443".into(), pki: "pki".into() };
        let v = build_view(&conn, &status, Some(&prev), &cur, Duration::from_secs(2), 1_000);

        let names: Vec<&str> = v.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["backend", "batch", "frontend"]);
        let e = |from: &str| v.edges.iter().find(|e| e.from == from && e.to == "backend").unwrap();
        let fe = e("frontend");
        assert_eq!(fe.callers, ["spiffe://td/sa/frontend"]);
        assert_eq!(fe.callees, ["spiffe://td/sa/backend"]);
        assert!((fe.rps - 50.0).abs() < 1e-9, "{fe:?}");
        assert_eq!(fe.success, Some(1.0));
        assert!((fe.rate_limited_rps - 3.0).abs() < 1e-9, "{fe:?}");
        let be = e("batch");
        assert!((be.denied_rps - 5.0).abs() < 1e-9 && be.rps == 0.0, "denied calls only: {be:?}");

        let split = &v.splits[0];
        assert_eq!((split.service.as_str(), split.route.as_str()), ("backend", "canary/split"));
        let shares: Vec<(&str, f64)> = split.backends.iter().map(|b| (b.backend.as_str(), b.share.unwrap())).collect();
        assert_eq!(shares, [("v1", 0.9), ("v2", 0.1)]);

        let rules: Vec<(&str, RefusalKind, &str, f64)> =
            v.refused_by_rule.iter().map(|r| (r.service.as_str(), r.kind, r.rule.as_str(), r.rps)).collect();
        assert_eq!(
            rules,
            [
                ("backend", RefusalKind::Denied, "callers", 5.0),
                ("backend", RefusalKind::RateLimited, "per-caller", 3.0)
            ]
        );

        let batch = v.sidecars.iter().find(|s| s.service == "batch").unwrap();
        assert_eq!((batch.in_sync, batch.sync.as_str()), (false, "stale (lag 2)"));
        assert!(!batch.metrics_reachable);
        let backend = v.sidecars.iter().find(|s| s.service == "backend").unwrap();
        assert_eq!(backend.svid_expires_in, "in 59m47s");
        assert!(backend.in_sync && backend.metrics_reachable);

        // The first scrape has nothing to take rates from.
        let first = build_view(&conn, &status, None, &cur, Duration::ZERO, 1_000);
        assert!(first.routes.is_empty() && first.edges.is_empty() && first.window_seconds == 0.0);
        assert_eq!(first.sidecars.len(), 3);
    }
}
