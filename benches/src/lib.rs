//! weft-benches: performance measurements for weft, kept out of the shipped
//! crates.
//!
//! - `benches/identity.rs` (criterion, `cargo bench -p weft-benches`): the
//!   cost of SVID issuance on the control plane (CSR check + signing), of a
//!   workload making its key and CSR, and of SPIFFE ID parsing.
//!
//! - `src/bin/weft-fanout.rs`: config fan-out from one control plane to
//!   thousands of simulated sidecars (join storm, route change latency,
//!   bytes per update with and without per-sidecar scope).
//!
//! - `src/bin/weft-load.rs`: the end-to-end load harness (weft vs a direct
//!   connection, and vs a pair of nginx proxies doing mTLS when nginx is
//!   installed: [`nginx`]).

pub mod nginx;
