//! `SpiffeId::parse` on arbitrary text: never panics, and what it accepts
//! parses again to the same ID, with its parts consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_certs::SpiffeId;

fuzz_target!(|s: &str| {
    let Ok(id) = SpiffeId::parse(s) else { return };
    assert_eq!(id.as_str(), s);
    let again = SpiffeId::parse(id.as_str()).expect("an accepted ID parses again");
    assert_eq!(again, id);
    let rebuilt = format!("spiffe://{}{}", id.trust_domain(), id.path());
    assert_eq!(rebuilt, s);
    let _ = id.namespace();
    // The trust domain of an ID is itself a valid trust domain.
    weft_certs::TrustDomain::new(id.trust_domain().as_str()).expect("the trust domain of a valid ID is valid");
});
