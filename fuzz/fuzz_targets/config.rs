//! `weft_config::parse` on arbitrary text: never panics, and a config it
//! accepts survives the JSON the control plane pushes to sidecars.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(cfg) = weft_config::parse(text) else { return };
    let json = serde_json::to_string(&cfg).expect("an accepted config serializes");
    let back: weft_config::MeshConfig = serde_json::from_str(&json).expect("sidecars accept the pushed config");
    // Not compared byte for byte: a float may come back one ULP off.
    serde_json::to_string(&back).expect("serializes again");
});
