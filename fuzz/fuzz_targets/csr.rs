//! The control plane's CSR check (`weft_certs::ca::verify_csr`, which
//! `Identity.Attest`/`Renew` apply to the DER a workload sends) on arbitrary
//! bytes: never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|der: &[u8]| {
    let _ = weft_certs::ca::verify_csr(der);
});
