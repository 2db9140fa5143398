//! Link options for the sidecar binary (docs/performance.md, "Fourth
//! session: memory" and "Sixth session: code layout"): its machine code and
//! the tables the dynamic loader reads at start-up are most of a sidecar's
//! resident memory.
use std::process::Command;

fn main() {
    // Relative relocations packed as DT_RELR (glibc >= 2.36, lld, GNU ld >= 2.38):
    // the position-independent binary's ~0.65 MB `.rela.dyn`, read in full
    // by the dynamic loader at every start, shrinks to a few KB.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");

    // The functions a running sidecar executes, laid out first and together
    // (benches/hot-text.sh writes the linker script): the kernel maps code
    // in 64 KiB blocks around each page touched, so executed code scattered
    // over `.text` made nearly all of it resident. The script only adds an
    // output section (`INSERT BEFORE .text`); the default layout stays.
    let script = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("hot-text.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    if links_with_lld() && script.exists() {
        // `-Xlinker`, not `-Wl,-T,<path>`: cc splits `-Wl,` at commas, so a
        // checkout whose path has one would fail the link.
        for arg in ["-Xlinker", "-T", "-Xlinker", &script.display().to_string()] {
            println!("cargo:rustc-link-arg-bins={arg}");
        }
    }
}

/// Whether rustc links this build with its bundled lld: the default for
/// x86_64-unknown-linux-gnu since Rust 1.90 in the Rust project's own
/// builds (those that ship `gcc-ld/ld.lld` in the sysroot; a distribution's
/// rustc may link with the system's `ld`, and gold rejects the script),
/// unless a linker is configured (cargo passes `target.<triple>.linker` as
/// `RUSTC_LINKER`) or rustflags pick one.
fn links_with_lld() -> bool {
    let target = std::env::var("TARGET").unwrap_or_default();
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if target != "x86_64-unknown-linux-gnu" || std::env::var_os("RUSTC_LINKER").is_some() || flags.contains("link") {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let run = |args: &[&str]| {
        Command::new(&rustc).args(args).output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = run(&["-V"]).unwrap_or_default();
    let minor = version.split_whitespace().nth(1).and_then(|v| v.split('.').nth(1)).and_then(|m| m.parse::<u32>().ok());
    let bundled = run(&["--print", "sysroot"]).is_some_and(|sysroot| {
        std::path::Path::new(&sysroot).join("lib/rustlib").join(&target).join("bin/gcc-ld/ld.lld").exists()
    });
    minor.is_some_and(|m| m >= 90) && bundled
}
