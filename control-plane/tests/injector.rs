//! The sidecar injector end to end: a real `weft-control-plane` process with
//! `--injector-listen` serving HTTPS, real `AdmissionReview` v1 requests,
//! and the returned JSONPatch applied with a JSONPatch library must give
//! exactly what `weft inject` prints for the same object. Malformed reviews
//! get a clear answer and the server keeps serving.

use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use weft_testkit::{bin, free_addr, ControlPlane};

struct Webhook {
    _cp: ControlPlane,
    addr: std::net::SocketAddr,
    tls: tokio_rustls::TlsConnector,
}

async fn start() -> (Webhook, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let tls = weft_k8s::tls::webhook_tls(&["weft-control-plane.weft-system.svc".into(), "localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, &tls.cert_pem).unwrap();
    std::fs::write(&key, &tls.key_pem).unwrap();
    let addr = free_addr();
    let cp = ControlPlane::start(
        "example.org",
        &[
            "--injector-listen",
            &addr.to_string(),
            "--injector-cert",
            cert.to_str().unwrap(),
            "--injector-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    // The client trusts only the injector CA, as the API server does with caBundle.
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    roots.add(rustls_pki_types::CertificateDer::from_pem_slice(tls.ca_pem.as_bytes()).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Webhook { _cp: cp, addr, tls: tokio_rustls::TlsConnector::from(Arc::new(config)) }, dir)
}

impl Webhook {
    /// POSTs `body` to `path` over TLS (server name "localhost"); (status, body).
    async fn post(&self, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = self.tls.connect(name, tcp).await.expect("TLS handshake with the injector");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::post(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
    }

    async fn review(&self, review: &Value) -> Value {
        let (status, body) = self.post("/inject", serde_json::to_vec(review).unwrap()).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }
}

fn admission_review(uid: &str, object: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": object["kind"]},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": object["kind"]},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// `weft inject` (the real binary) on `object`, as JSON.
fn weft_inject(object: &Value) -> Value {
    use std::io::Write;
    let mut child = std::process::Command::new(bin("weft"))
        .args(["inject", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(serde_json::to_string(object).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let yaml: serde_norway::Value = serde_norway::from_str(text.trim_start_matches("---\n")).unwrap();
    serde_json::to_value(yaml).unwrap()
}

/// A Pod as the ReplicaSet controller creates it for a Deployment.
fn pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-7d4b9c8f6d-",
            "namespace": "shop",
            "labels": {"app": "web", "version": "v2", "pod-template-hash": "7d4b9c8f6d"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c8f6d",
                                 "uid": "0b1f5a0e-8a4e-4d7e-9a53-3f0c1a9c2e11", "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "serviceAccountName": "web",
            "containers": [{
                "name": "web", "image": "registry.example/web:2.0",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "100m"}},
                "volumeMounts": [{"name": "kube-api-access-x1", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]
            }],
            "volumes": [{"name": "kube-api-access-x1", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst"
        }
    })
}

fn patch_of(review: &Value) -> json_patch::Patch {
    let response = &review["response"];
    assert_eq!(response["patchType"], "JSONPatch", "{review}");
    let bytes = base64::engine::general_purpose::STANDARD.decode(response["patch"].as_str().unwrap()).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_webhook_patch_gives_what_weft_inject_prints() {
    let (hook, _dir) = start().await;
    for object in [pod(), {
        let mut deployment = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {"metadata": {"labels": {"app": "web"}}, "spec": pod()["spec"].clone()}}
        });
        deployment["spec"]["template"]["spec"]["initContainers"] = json!([{"name": "migrate", "image": "m"}]);
        deployment
    }] {
        let review = hook.review(&admission_review("5d7c8a5e-1111-4c3b-9b7e-2a0f3e6d9c01", &object)).await;
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(review["kind"], "AdmissionReview");
        assert_eq!(review["response"]["uid"], "5d7c8a5e-1111-4c3b-9b7e-2a0f3e6d9c01");
        assert_eq!(review["response"]["allowed"], true);
        let mut patched = object.clone();
        json_patch::patch(&mut patched, &patch_of(&review)).expect("the patch applies to the object");
        assert_eq!(patched, weft_inject(&object), "webhook and weft inject disagree for {}", object["kind"]);
        assert_ne!(patched, object);

        // The patched object is already injected: no patch the second time.
        let again = hook.review(&admission_review("uid-2", &patched)).await;
        assert_eq!(again["response"]["allowed"], true);
        assert!(again["response"].get("patch").is_none(), "{again}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_reviews_get_clear_answers_and_never_stop_the_server() {
    let (hook, _dir) = start().await;
    // Not JSON, not a review, no uid: 400 with the reason (failurePolicy applies).
    for (body, reason) in [
        (b"{not json".to_vec(), "not JSON"),
        (
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"u"}}"#.to_vec(),
            "expected admission.k8s.io/v1 AdmissionReview",
        ),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"operation":"CREATE"}}"#
                .to_vec(),
            "no `request.uid`",
        ),
        (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(), "no `request`"),
    ] {
        let (status, text) = hook.post("/inject", body).await;
        let text = String::from_utf8_lossy(&text);
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(reason), "{text:?} lacks {reason:?}");
    }
    let (status, _) = hook.post("/elsewhere", b"{}".to_vec()).await;
    assert_eq!(status, 404);

    // A CREATE without an object: allowed unchanged, with a warning.
    let mut review = admission_review("u-1", &pod());
    review["request"]["object"] = Value::Null;
    let r = hook.review(&review).await;
    assert_eq!((r["response"]["allowed"].as_bool(), r["response"].get("patch")), (Some(true), None));
    assert!(r["response"]["warnings"][0].as_str().unwrap().contains("no object"), "{r}");

    // Other operations are allowed unchanged.
    let mut review = admission_review("u-2", &pod());
    review["request"]["operation"] = json!("UPDATE");
    let r = hook.review(&review).await;
    assert_eq!((r["response"]["allowed"].as_bool(), r["response"].get("patch")), (Some(true), None));

    // An object with a bad weft annotation is refused with the reason.
    let mut bad = pod();
    bad["metadata"]["annotations"] = json!({"weft.dev/skip-inbound-ports": "http"});
    let r = hook.review(&admission_review("u-3", &bad)).await;
    assert_eq!(r["response"]["allowed"], false);
    let msg = r["response"]["status"]["message"].as_str().unwrap();
    assert!(
        msg.contains("weft.dev/skip-inbound-ports") && msg.contains("not a comma-separated list of ports"),
        "{msg}"
    );

    // Opted out: allowed, no patch.
    let mut out = pod();
    out["metadata"]["annotations"] = json!({"weft.dev/inject": "false"});
    let r = hook.review(&admission_review("u-4", &out)).await;
    assert_eq!((r["response"]["allowed"].as_bool(), r["response"].get("patch")), (Some(true), None));

    // Still serving.
    let r = hook.review(&admission_review("u-5", &pod())).await;
    assert_eq!(r["response"]["allowed"], true);
    assert!(r["response"]["patch"].is_string());
}
