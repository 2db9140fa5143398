//! The sidecar does not load glibc's libm (issue 10, its resident memory):
//! `weft-libm-shim` defines the two math functions it calls, so `libm.so.6`
//! is neither a `DT_NEEDED` entry of the binary nor mapped in a running
//! sidecar.

use std::process::Command;

/// The binary's `DT_NEEDED` entries, from `readelf -d`.
fn needed(binary: &str) -> Vec<String> {
    let out = Command::new("readelf").args(["-dW", binary]).output().expect("readelf (binutils) runs");
    assert!(out.status.success(), "readelf -d {binary}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split_once('[')?.1.trim_end_matches(']').to_string()))
        .collect()
}

/// Undefined dynamic symbols the binary takes from libm (`objdump -T`
/// names each with its version, such as `(GLIBC_2.29) exp`).
fn libm_imports(binary: &str) -> Vec<String> {
    let out = Command::new("objdump").args(["-T", binary]).output().expect("objdump (binutils) runs");
    // Functions glibc moved to libm; a binary that imports one of these
    // needs libm.so.6.
    let libm = [
        "exp", "exp2", "expm1", "pow", "log", "log2", "log10", "log1p", "sin", "cos", "tan", "atan2", "cbrt", "hypot",
        "fmod",
    ];
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("*UND*"))
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        // `expf` and the like: the f32 variants.
        .filter(|s| libm.iter().any(|f| s == f || s.strip_suffix('f') == Some(f)))
        .collect()
}

#[test]
fn the_sidecar_binary_does_not_need_libm() {
    let binary = env!("CARGO_BIN_EXE_weft-proxy");
    let needed = needed(binary);
    assert!(needed.iter().any(|n| n.starts_with("libc.so")), "readelf found no NEEDED entries in {binary}: {needed:?}");
    assert!(
        !needed.iter().any(|n| n.starts_with("libm.so")),
        "{binary} needs libm.so ({needed:?}); it imports {:?} from it. Define each such function in \
         libm-shim/src/lib.rs (from the libm crate) so the sidecar does not load libm",
        libm_imports(binary)
    );
}

#[test]
fn a_running_sidecar_maps_no_libm() {
    // `--help` is enough for the loader to map every DT_NEEDED library, and
    // it runs the whole of start-up up to argument parsing; `ldd` would read
    // the same list, this checks the process itself.
    let binary = env!("CARGO_BIN_EXE_weft-proxy");
    let out = Command::new(binary).arg("--help").env("LD_DEBUG", "libs").output().expect("weft-proxy runs");
    let log = String::from_utf8_lossy(&out.stderr);
    // glibc's loader logs "calling init: /lib/…/libc.so.6" for each library it loads.
    assert!(log.contains("libc.so.6"), "LD_DEBUG=libs printed no library loads: {log}");
    assert!(!log.contains("libm.so"), "weft-proxy loaded libm:\n{log}");
}
