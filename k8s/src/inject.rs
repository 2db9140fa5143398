//! Sidecar injection: the one transformation behind `weft inject` and the
//! control plane's mutating admission webhook.
//!
//! A workload's pod template gets, ahead of its own init containers:
//! 1. `weft-init`, the interception init container (`weft init-iptables`,
//!    which redirects the pod's traffic through the sidecar; it needs
//!    `NET_ADMIN`/`NET_RAW` and runs once);
//! 2. `weft-proxy`, the sidecar as a Kubernetes *native sidecar* (an init
//!    container with `restartPolicy: Always`, Kubernetes ≥ 1.29), so it starts
//!    before the app, is ready (`/ready`) before the app starts, and does not
//!    keep a Job from completing;
//!
//! and the volumes they use: the SVID state directory (`emptyDir`), the
//! projected service-account token (audience `weft`) it attests with, and
//! the trust bundle (a ConfigMap). Injecting twice changes nothing, and the
//! annotation `weft.dev/inject: "false"` (on the workload or its pod
//! template) opts a workload out.

use serde_norway::{Mapping, Value};

/// The annotation that opts a workload out with `"false"`.
pub const ANNOTATION_INJECT: &str = "weft.dev/inject";
/// The app's port (the sidecar's `--app 127.0.0.1:<port>`); default: the
/// first `containerPort` of the first app container, else 80.
pub const ANNOTATION_APP_PORT: &str = "weft.dev/app-port";
/// Inbound ports not redirected to the sidecar (comma-separated).
pub const ANNOTATION_SKIP_INBOUND_PORTS: &str = "weft.dev/skip-inbound-ports";
/// Outbound ports not redirected to the sidecar (comma-separated).
pub const ANNOTATION_SKIP_OUTBOUND_PORTS: &str = "weft.dev/skip-outbound-ports";
/// Outbound destinations (CIDRs, comma-separated) not redirected to the sidecar.
pub const ANNOTATION_SKIP_OUTBOUND_CIDRS: &str = "weft.dev/skip-outbound-cidrs";

/// The sidecar's container name (its presence means "already injected").
pub const PROXY_CONTAINER: &str = "weft-proxy";
/// The interception init container's name.
pub const INIT_CONTAINER: &str = "weft-init";
/// Volume names added to the pod.
pub const STATE_VOLUME: &str = "weft-state";
pub const TOKEN_VOLUME: &str = "weft-token";
pub const BUNDLE_VOLUME: &str = "weft-trust-bundle";
/// Where the volumes are mounted in the sidecar.
pub const STATE_DIR: &str = "/var/run/weft/state";
pub const TOKEN_DIR: &str = "/var/run/secrets/weft";
pub const BUNDLE_DIR: &str = "/var/run/weft/bundle";
/// The audience of the projected service-account token the sidecar attests
/// with; the control plane accepts only this audience.
pub const TOKEN_AUDIENCE: &str = "weft";

/// What the injected containers look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectOptions {
    /// The image holding `weft` and `weft-proxy`.
    pub image: String,
    /// The control plane's gRPC address as pods reach it (`host:port`).
    pub control_plane: String,
    /// The ConfigMap (in the workload's namespace) whose key `ca.pem` is the
    /// mesh's trust bundle.
    pub trust_bundle_config_map: String,
    /// The UID the sidecar runs as; `weft init-iptables --proxy-uid` exempts
    /// this UID's own traffic from redirection, so the sidecar's connections
    /// are not looped back into itself.
    pub proxy_uid: u32,
    /// The sidecar's inbound (mTLS) port; redirected inbound traffic lands here.
    pub inbound_port: u16,
    /// The sidecar's outbound port; redirected outbound traffic lands here.
    pub outbound_port: u16,
    /// The sidecar's admin port (`/live`, `/ready`, `/metrics`), never redirected.
    pub admin_port: u16,
    /// Resource requests and memory limit of the sidecar (Kubernetes quantities).
    pub cpu_request: String,
    pub memory_request: String,
    pub memory_limit: String,
    /// Lifetime of the projected token, in seconds (Kubernetes' minimum is 600).
    pub token_expiration_seconds: u32,
}

impl Default for InjectOptions {
    fn default() -> Self {
        Self {
            image: format!("weft:{}", env!("CARGO_PKG_VERSION")),
            control_plane: "weft-control-plane.weft-system.svc:7443".into(),
            trust_bundle_config_map: "weft-trust-bundle".into(),
            proxy_uid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            admin_port: 15020,
            cpu_request: "50m".into(),
            memory_request: "64Mi".into(),
            memory_limit: "256Mi".into(),
            token_expiration_seconds: 3600,
        }
    }
}

/// What injection did to one workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    /// It already has a `weft-proxy` container; left unchanged.
    AlreadyInjected,
    /// Left unchanged, for the reason given.
    OptedOut(String),
    /// Not a kind with a pod template (a Service, a ConfigMap…); left unchanged.
    NotAWorkload,
}

/// One object's outcome: `Kind/name` and what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    pub object: String,
    pub outcome: Outcome,
}

/// Why a workload could not be injected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("{object}: {field} must be a mapping")]
    NotAMapping { object: String, field: String },
    #[error("{object}: annotation {annotation}: {value:?} {reason}")]
    BadAnnotation { object: String, annotation: &'static str, value: String, reason: String },
    #[error("{object}: {field}: {reason}")]
    BadField { object: String, field: String, reason: String },
}

/// Where each kind keeps its pod template (object path to the pod's
/// `metadata`/`spec` parent), or None for kinds without one.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" | "ReplicationController" => {
            &["spec", "template"]
        }
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return None,
    })
}

/// Injects one object; a `List` (`kind: List` or any `…List` with `items`)
/// is injected item by item. Returns each workload's outcome.
///
/// Errors: a malformed object (a pod template that is not a mapping, a bad
/// annotation value); `obj` is then left unchanged.
pub fn inject(obj: &mut Value, opts: &InjectOptions) -> Result<Vec<Injected>, InjectError> {
    let kind = str_at(obj, &["kind"]).unwrap_or_default().to_string();
    if kind.ends_with("List") {
        let mut out = Vec::new();
        if let Some(items) = obj.get_mut("items").and_then(Value::as_sequence_mut) {
            for item in items {
                out.extend(inject(item, opts)?);
            }
        }
        return Ok(out);
    }
    let name = str_at(obj, &["metadata", "name"])
        .or_else(|| str_at(obj, &["metadata", "generateName"]))
        .unwrap_or("")
        .to_string();
    let object = format!("{kind}/{name}");
    let Some(path) = template_path(&kind) else {
        return Ok(vec![Injected { object, outcome: Outcome::NotAWorkload }]);
    };
    let mut copy = obj.clone();
    let outcome = inject_workload(&mut copy, path, &object, opts)?;
    if outcome == Outcome::Injected {
        *obj = copy;
    }
    Ok(vec![Injected { object, outcome }])
}

fn inject_workload(obj: &mut Value, path: &[&str], object: &str, opts: &InjectOptions) -> Result<Outcome, InjectError> {
    let workload_annotations = annotations(obj);
    let mut template = &mut *obj;
    for (i, key) in path.iter().enumerate() {
        template = template
            .get_mut(*key)
            .filter(|v| v.is_mapping())
            .ok_or_else(|| InjectError::NotAMapping { object: object.into(), field: path[..=i].join(".") })?;
    }
    let pod_annotations = annotations(template);
    let annotation = |name: &str| pod_annotations.get(name).or_else(|| workload_annotations.get(name)).cloned();
    if annotation(ANNOTATION_INJECT).as_deref() == Some("false") {
        return Ok(Outcome::OptedOut(format!("annotation {ANNOTATION_INJECT}: \"false\"")));
    }
    let spec_field = if path.is_empty() { "spec".to_string() } else { format!("{}.spec", path.join(".")) };
    let spec = template
        .get_mut("spec")
        .filter(|v| v.is_mapping())
        .ok_or_else(|| InjectError::NotAMapping { object: object.into(), field: spec_field.clone() })?;
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::OptedOut(
            "hostNetwork: true (redirecting the node's traffic through a sidecar would break the node)".into(),
        ));
    }
    let has = |list: &str, name: &str| {
        spec.get(list)
            .and_then(Value::as_sequence)
            .is_some_and(|s| s.iter().any(|c| c.get("name").and_then(Value::as_str) == Some(name)))
    };
    if has("initContainers", PROXY_CONTAINER) || has("containers", PROXY_CONTAINER) {
        return Ok(Outcome::AlreadyInjected);
    }

    // Parsed as `weft init-iptables` parses the flags they become, so what it would refuse is refused here.
    let bad = |annotation: &'static str, value: &str, e: weft_intercept::ListError| InjectError::BadAnnotation {
        object: object.into(),
        annotation,
        value: value.to_string(),
        reason: match e {
            weft_intercept::ListError::EmptyItem { position, .. } => {
                format!("has an empty item {position}: expected values separated by single commas, e.g. 22,8443")
            }
            weft_intercept::ListError::Port(p) => {
                format!("is not a comma-separated list of ports ({p:?} is not a port: a port is 1-65535)")
            }
            weft_intercept::ListError::Cidr(e) => format!("is not a comma-separated list of CIDRs ({e})"),
            other => format!("is refused: {other}"),
        },
    };
    let ports = |name: &'static str| -> Result<Vec<u16>, InjectError> {
        let Some(v) = annotation(name) else { return Ok(Vec::new()) };
        weft_intercept::parse_ports(&v).map_err(|e| bad(name, &v, e))
    };
    let mut skip_inbound = vec![opts.admin_port];
    skip_inbound.extend(ports(ANNOTATION_SKIP_INBOUND_PORTS)?.into_iter().filter(|p| *p != opts.admin_port));
    let skip_outbound = ports(ANNOTATION_SKIP_OUTBOUND_PORTS)?;
    let skip_cidrs: Vec<String> = match annotation(ANNOTATION_SKIP_OUTBOUND_CIDRS) {
        None => Vec::new(),
        Some(v) => {
            let cidrs = weft_intercept::parse_cidrs(&v).map_err(|e| bad(ANNOTATION_SKIP_OUTBOUND_CIDRS, &v, e))?;
            if let Some(c) = cidrs.iter().find(|c| c.addr.is_ipv6()) {
                // `weft init-iptables` intercepts IPv4 only, and refuses these.
                return Err(InjectError::BadAnnotation {
                    object: object.into(),
                    annotation: ANNOTATION_SKIP_OUTBOUND_CIDRS,
                    value: v.clone(),
                    reason: format!("names \"{c}\", an IPv6 network: only IPv4 is intercepted"),
                });
            }
            cidrs.iter().map(ToString::to_string).collect()
        }
    };
    let app_port = match annotation(ANNOTATION_APP_PORT) {
        Some(v) => v.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| InjectError::BadAnnotation {
            object: object.into(),
            annotation: ANNOTATION_APP_PORT,
            value: v.clone(),
            reason: "is not a port (1-65535)".into(),
        })?,
        None => first_container_port(spec).unwrap_or(80),
    };
    let service_account = spec
        .get("serviceAccountName")
        .or_else(|| spec.get("serviceAccount"))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let labels: Vec<String> = template
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_mapping)
        .map(|m| m.iter().filter_map(|(k, v)| Some(format!("{}={}", k.as_str()?, scalar(v)?))).collect::<Vec<_>>())
        .unwrap_or_default();

    let init = init_container(opts, &skip_inbound, &skip_outbound, &skip_cidrs);
    let proxy = proxy_container(opts, &service_account, app_port, &labels);
    let spec = template.get_mut("spec").expect("checked above");
    let spec_map = spec.as_mapping_mut().expect("checked above");
    let inits = list_mut(spec_map, "initContainers", object, &spec_field)?;
    inits.splice(0..0, [init, proxy]);
    let volumes = list_mut(spec_map, "volumes", object, &spec_field)?;
    volumes.extend(pod_volumes(opts));
    Ok(Outcome::Injected)
}

/// The sequence at `key`, created empty if absent.
fn list_mut<'a>(
    spec: &'a mut Mapping,
    key: &str,
    object: &str,
    spec_field: &str,
) -> Result<&'a mut Vec<Value>, InjectError> {
    let v = spec.entry(Value::String(key.into())).or_insert_with(|| Value::Sequence(Vec::new()));
    if v.is_null() {
        *v = Value::Sequence(Vec::new());
    }
    v.as_sequence_mut().ok_or_else(|| InjectError::BadField {
        object: object.into(),
        field: format!("{spec_field}.{key}"),
        reason: "must be a list".into(),
    })
}

/// The first TCP `containerPort` of the first app container that has one.
fn first_container_port(spec: &Value) -> Option<u16> {
    spec.get("containers")?.as_sequence()?.iter().find_map(|c| {
        c.get("ports")?.as_sequence()?.iter().find_map(|p| {
            let tcp = p.get("protocol").and_then(Value::as_str).is_none_or(|proto| proto == "TCP");
            if tcp {
                p.get("containerPort")?.as_u64().and_then(|n| u16::try_from(n).ok())
            } else {
                None
            }
        })
    })
}

fn annotations(v: &Value) -> std::collections::BTreeMap<String, String> {
    v.get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_mapping)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.as_str()?.to_string(), scalar(v)?))).collect())
        .unwrap_or_default()
}

/// A scalar as text (labels and annotations are strings, but YAML may type them).
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for k in path {
        cur = cur.get(*k)?;
    }
    cur.as_str()
}

/// YAML text → value; the templates below are ours, so a failure is a bug.
fn yaml(text: &str) -> Value {
    serde_norway::from_str(text).expect("injection template is valid YAML")
}

/// A list as a YAML flow sequence (JSON is valid YAML and escapes every string).
fn flow<T: serde::Serialize>(items: &[T]) -> String {
    serde_json::to_string(items).expect("strings serialize")
}

fn join<T: ToString>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// `weft init-iptables`: redirect the pod's inbound TCP to the sidecar's
/// inbound port and its outbound TCP to the outbound port, except the
/// sidecar's own traffic (`--proxy-uid`) and the skipped ports and CIDRs.
fn init_container(opts: &InjectOptions, skip_in: &[u16], skip_out: &[u16], skip_cidrs: &[String]) -> Value {
    let mut args = vec![
        "init-iptables".to_string(),
        "--proxy-uid".into(),
        opts.proxy_uid.to_string(),
        "--inbound-port".into(),
        opts.inbound_port.to_string(),
        "--outbound-port".into(),
        opts.outbound_port.to_string(),
        "--skip-inbound-ports".into(),
        join(skip_in),
    ];
    if !skip_out.is_empty() {
        args.extend(["--skip-outbound-ports".into(), join(skip_out)]);
    }
    if !skip_cidrs.is_empty() {
        args.extend(["--skip-outbound-cidrs".into(), skip_cidrs.join(",")]);
    }
    yaml(&format!(
        r#"
name: {INIT_CONTAINER}
image: {image}
command: ["weft"]
args: {args}
resources:
  requests: {{cpu: 10m, memory: 16Mi}}
  limits: {{memory: 64Mi}}
securityContext:
  runAsUser: 0
  runAsNonRoot: false
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    add: [NET_ADMIN, NET_RAW]
    drop: [ALL]
"#,
        image = serde_json::to_string(&opts.image).expect("string"),
        args = flow(&args),
    ))
}

/// The sidecar, as a native sidecar (`restartPolicy: Always`).
fn proxy_container(opts: &InjectOptions, service_account: &str, app_port: u16, labels: &[String]) -> Value {
    let mut args = vec![
        "--control-plane".to_string(),
        opts.control_plane.clone(),
        "--trust-bundle".into(),
        format!("{BUNDLE_DIR}/ca.pem"),
        "--token-file".into(),
        format!("{TOKEN_DIR}/token"),
        "--state-dir".into(),
        STATE_DIR.into(),
        "--service".into(),
        service_account.into(),
        "--app".into(),
        format!("127.0.0.1:{app_port}"),
        "--inbound".into(),
        format!("0.0.0.0:{}", opts.inbound_port),
        // The wildcard inbound cannot be registered; peers dial the pod's IP
        // (Kubernetes expands $(POD_IP) from the env below).
        "--advertise-address".into(),
        "$(POD_IP)".into(),
        "--outbound".into(),
        format!("127.0.0.1:{}", opts.outbound_port),
        "--admin".into(),
        format!("0.0.0.0:{}", opts.admin_port),
        // The init container's rules exempt this UID: the sidecar refuses to
        // start as another (its own connections would loop back into it).
        "--proxy-uid".into(),
        opts.proxy_uid.to_string(),
        "--log-format".into(),
        "json".into(),
    ];
    for l in labels {
        args.extend(["--label".into(), l.clone()]);
    }
    let image = serde_json::to_string(&opts.image).expect("string");
    yaml(&format!(
        r#"
name: {PROXY_CONTAINER}
image: {image}
restartPolicy: Always
command: ["weft-proxy"]
args: {args}
env:
  - name: POD_IP
    valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
ports:
  - {{name: weft-inbound, containerPort: {inbound}, protocol: TCP}}
  - {{name: weft-admin, containerPort: {admin}, protocol: TCP}}
startupProbe:
  httpGet: {{path: /ready, port: {admin}}}
  periodSeconds: 1
  failureThreshold: 120
readinessProbe:
  httpGet: {{path: /ready, port: {admin}}}
  periodSeconds: 5
livenessProbe:
  httpGet: {{path: /live, port: {admin}}}
  periodSeconds: 10
resources:
  requests: {{cpu: {cpu}, memory: {mem}}}
  limits: {{memory: {mem_limit}}}
securityContext:
  runAsUser: {uid}
  runAsGroup: {uid}
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {{drop: [ALL]}}
volumeMounts:
  - {{name: {STATE_VOLUME}, mountPath: {STATE_DIR}}}
  - {{name: {TOKEN_VOLUME}, mountPath: {TOKEN_DIR}, readOnly: true}}
  - {{name: {BUNDLE_VOLUME}, mountPath: {BUNDLE_DIR}, readOnly: true}}
"#,
        args = flow(&args),
        inbound = opts.inbound_port,
        admin = opts.admin_port,
        cpu = serde_json::to_string(&opts.cpu_request).expect("string"),
        mem = serde_json::to_string(&opts.memory_request).expect("string"),
        mem_limit = serde_json::to_string(&opts.memory_limit).expect("string"),
        uid = opts.proxy_uid,
    ))
}

/// The SVID state directory, the projected token and the trust bundle.
fn pod_volumes(opts: &InjectOptions) -> Vec<Value> {
    let Value::Sequence(v) = yaml(&format!(
        r#"
- name: {STATE_VOLUME}
  emptyDir: {{medium: Memory}}
- name: {TOKEN_VOLUME}
  projected:
    sources:
      - serviceAccountToken:
          audience: {TOKEN_AUDIENCE}
          expirationSeconds: {exp}
          path: token
- name: {BUNDLE_VOLUME}
  configMap:
    name: {cm}
    items: [{{key: ca.pem, path: ca.pem}}]
"#,
        exp = opts.token_expiration_seconds,
        cm = serde_json::to_string(&opts.trust_bundle_config_map).expect("string"),
    )) else {
        unreachable!("the template is a list")
    };
    v
}
