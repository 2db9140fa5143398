//! The sidecar does not load glibc's libm (issue 10, its resident memory):
//! `weft-libm-shim` defines the two math functions it calls, so `libm.so.6`
//! is neither a `DT_NEEDED` entry of the binary nor mapped when the process
//! starts. This holds when rustc links with lld (its default since Rust
//! 1.90); GNU ld keeps a library that defines a symbol the program refers
//! to under `--as-needed` even when the program defines it too.

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

/// Names from `nm -D` (`undefined`: the binary's imports; otherwise the
/// library's definitions), without their `@GLIBC_x` versions.
fn dynamic_symbols(file: &str, undefined: bool) -> Vec<String> {
    let flag = if undefined { "--undefined-only" } else { "--defined-only" };
    let out = Command::new("nm").args(["-D", flag, file]).output().expect("nm (binutils) runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|s| s.split('@').next().unwrap_or(s).to_string())
        .collect()
}

/// What the binary imports that the system's libm defines (`ldd` finds
/// the libm it would load).
fn libm_imports(binary: &str) -> (String, Vec<String>) {
    let ldd = Command::new("ldd").arg(binary).output().expect("ldd runs");
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    let Some(libm) = ldd.lines().find(|l| l.contains("libm.so")).and_then(|l| l.split("=> ").nth(1)?.split(' ').next())
    else {
        return ("(ldd names no libm)".into(), Vec::new());
    };
    let defined = dynamic_symbols(libm, false);
    let imports = dynamic_symbols(binary, true).into_iter().filter(|s| defined.contains(s)).collect();
    (libm.to_string(), imports)
}

#[test]
fn the_sidecar_binary_does_not_need_libm() {
    let binary = env!("CARGO_BIN_EXE_weft-proxy");
    let needed = needed(binary);
    assert!(needed.iter().any(|n| n.starts_with("libc.so")), "readelf found no NEEDED entries in {binary}: {needed:?}");
    if needed.iter().any(|n| n.starts_with("libm.so")) {
        let (libm, imports) = libm_imports(binary);
        if imports.is_empty() {
            panic!(
                "{binary} needs libm.so ({needed:?}) but imports nothing from {libm}: the linker kept it \
                 for symbols the binary defines itself (libm-shim). GNU ld does that under --as-needed; \
                 lld, rustc's default linker since Rust 1.90, does not. Link with lld (no `linker` or \
                 `-fuse-ld` override in .cargo/config.toml or RUSTFLAGS)"
            );
        }
        panic!(
            "{binary} needs libm.so ({needed:?}): it imports {imports:?} from {libm}. Define each of these \
             in libm-shim/src/lib.rs (from the libm crate), as `exp` and `pow` are, so the sidecar \
             does not load libm"
        );
    }
}

#[test]
fn the_loader_maps_no_libm_when_the_sidecar_starts() {
    // `--help`: the loader maps every DT_NEEDED library before `main`, so
    // a start-up that ends at argument parsing shows them all. (A library
    // loaded later, such as an NSS module for `getaddrinfo` with its own
    // dependency on libm, depends on the host's configuration.)
    let binary = env!("CARGO_BIN_EXE_weft-proxy");
    let out = Command::new(binary).arg("--help").env("LD_DEBUG", "libs").output().expect("weft-proxy runs");
    let log = String::from_utf8_lossy(&out.stderr);
    // glibc's loader logs "calling init: /lib/…/libc.so.6" for each library it loads.
    assert!(log.contains("libc.so.6"), "LD_DEBUG=libs printed no library loads: {log}");
    let libm: Vec<&str> = log.lines().filter(|l| l.contains("libm.so")).collect();
    assert!(
        libm.is_empty(),
        "weft-proxy --help loaded libm (LD_DEBUG=libs):\n{}\nsee the_sidecar_binary_does_not_need_libm for why",
        libm.join("\n")
    );
}
