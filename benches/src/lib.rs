//! weft-benches: performance measurements for weft, kept out of the shipped
//! crates.
//!
//! - `benches/identity.rs` (criterion, `cargo bench -p weft-benches`): the
//!   cost of SVID issuance on the control plane (CSR check + signing), of a
//!   workload making its key and CSR, and of SPIFFE ID parsing.
//!
//! The library itself is empty; it exists so the package has a target for
//! shared bench helpers and the end-to-end load harness.
