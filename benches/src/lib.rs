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
//! - `src/bin/weft-load.rs`: the end-to-end load harness: direct, a weft
//!   pair, an nginx pair ([`nginx`]) and an HAProxy pair ([`haproxy`]) under
//!   the same load, measured with [`procstat`]. `install-peers.sh` installs
//!   the peers from Debian.

pub mod haproxy;
pub mod nginx;
pub mod procstat;
