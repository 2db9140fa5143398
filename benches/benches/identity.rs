//! Identity micro-benchmarks.
//!
//! - `svid_issuance`: what the control plane does per Attest/Renew call
//!   (`verify_csr` + `Authority::sign` of a pre-made CSR), the CSR check alone,
//!   and what a workload does before asking (`make_csr`: P-256 key + CSR).
//! - `spiffe_id_parse`: `SpiffeId::parse` of a typical workload ID, of an ID at
//!   the spec's 2048-byte limit, and of an invalid ID (rejected at its last
//!   character, the most work a rejection can take).
//!
//! Every benchmark is one operation per iteration (`Throughput::Elements(1)`),
//! so criterion's "thrpt" is operations per second.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use weft_certs::bundle::parse_pem_certs;
use weft_certs::ca::{self, make_csr, verify_csr, DEFAULT_SVID_TTL};
use weft_certs::spiffe_id::MAX_ID_LEN;
use weft_certs::{Authority, SpiffeId, TrustBundle, TrustDomain};

const TYPICAL_ID: &str = "spiffe://example.org/ns/default/sa/web";
const INVALID_ID: &str = "spiffe://example.org/ns/default/sa/web#fragment";

fn authority() -> Authority {
    let td = TrustDomain::new("example.org").expect("valid trust domain");
    let anchor = ca::make_trust_anchor(&td, Duration::from_secs(86400)).expect("anchor");
    let issuer = ca::make_issuer(&td, &anchor, Duration::from_secs(86400)).expect("issuer");
    let bundle = TrustBundle::from_pem(anchor.cert_pem.as_bytes(), Path::new("anchor")).expect("bundle");
    let issuer_der = parse_pem_certs(issuer.cert_pem.as_bytes(), Path::new("issuer")).expect("issuer PEM").remove(0);
    Authority::new(td, issuer_der, &issuer.key_pem, bundle).expect("authority")
}

/// A valid SPIFFE ID of exactly `MAX_ID_LEN` bytes, in 16-byte segments.
fn max_length_id() -> String {
    let mut id = String::from("spiffe://example.org/ns/default/sa");
    let mut n = 0;
    while id.len() < MAX_ID_LEN {
        let room = MAX_ID_LEN - id.len();
        // "/" plus a segment; the last one takes whatever room is left.
        let seg_len = if room > 17 + 1 { 16 } else { room - 1 };
        id.push('/');
        id.extend(format!("seg-{n:012}").chars().chain(std::iter::repeat('x')).take(seg_len));
        n += 1;
    }
    id
}

fn svid_issuance(c: &mut Criterion) {
    let authority = authority();
    let id = SpiffeId::parse(TYPICAL_ID).expect("valid ID");
    let (csr, _key) = make_csr().expect("CSR");
    // Check once that the measured path really issues an SVID for `id`.
    let chain = authority.sign(&verify_csr(&csr).expect("CSR verifies"), &id, DEFAULT_SVID_TTL).expect("signs");
    assert_eq!(weft_certs::svid::spiffe_id_of(&chain[0]).expect("leaf is an SVID"), id);

    let mut g = c.benchmark_group("svid_issuance");
    g.throughput(Throughput::Elements(1)).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    g.bench_function("verify_csr+sign", |b| {
        b.iter(|| {
            let verified = verify_csr(black_box(&csr)).expect("CSR verifies");
            authority.sign(&verified, black_box(&id), DEFAULT_SVID_TTL).expect("signs")
        })
    });
    g.bench_function("verify_csr", |b| b.iter(|| verify_csr(black_box(&csr)).expect("CSR verifies")));
    g.bench_function("make_csr", |b| b.iter(|| make_csr().expect("CSR")));
    g.finish();
}

fn spiffe_id_parse(c: &mut Criterion) {
    let max = max_length_id();
    assert_eq!(max.len(), MAX_ID_LEN);
    assert!(SpiffeId::parse(&max).is_ok(), "max-length ID must be valid");
    assert!(SpiffeId::parse(TYPICAL_ID).is_ok());
    assert!(SpiffeId::parse(INVALID_ID).is_err());

    let mut g = c.benchmark_group("spiffe_id_parse");
    g.throughput(Throughput::Elements(1)).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    g.bench_function("typical", |b| b.iter(|| SpiffeId::parse(black_box(TYPICAL_ID))));
    g.bench_function("max_length_2048", |b| b.iter(|| SpiffeId::parse(black_box(max.as_str()))));
    g.bench_function("invalid", |b| b.iter(|| SpiffeId::parse(black_box(INVALID_ID))));
    g.finish();
}

criterion_group!(benches, svid_issuance, spiffe_id_parse);
criterion_main!(benches);
