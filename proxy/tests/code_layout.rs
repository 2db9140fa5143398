//! The sidecar binary's code layout (issue 10, `proxy/build.rs`,
//! `proxy/hot-text.ld`): the linker script is applied, and its name
//! patterns find the hot functions in a build other than the one the
//! profile ran on (this test's debug build: other symbol hashes, no LTO).

use std::process::Command;

/// `(name, address, size)` of each section, from `readelf -SW`.
fn sections(binary: &str) -> Vec<(String, u64, u64)> {
    let out = Command::new("readelf").args(["-SW", binary]).output().expect("readelf (binutils) runs");
    assert!(out.status.success(), "readelf -SW {binary}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "  [17] .text.hot  PROGBITS  00000000001af6d0 1ae6d0 34627b 00  AX  0   0 16"
            let rest = l.split_once(']')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let hex = |s: &str| u64::from_str_radix(s, 16).ok();
            Some((f.first()?.to_string(), hex(f.get(2)?)?, hex(f.get(4)?)?))
        })
        .collect()
}

/// `(name, address)` of each function symbol, from `nm`.
fn functions(binary: &str) -> Vec<(String, u64)> {
    let out = Command::new("nm").arg(binary).output().expect("nm (binutils) runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [addr, "t" | "T" | "w" | "W", name] => Some((name.to_string(), u64::from_str_radix(addr, 16).ok()?)),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn hot_functions_are_gathered_ahead_of_the_rest_of_the_code() {
    let binary = env!("CARGO_BIN_EXE_weft-proxy");
    let secs = sections(binary);
    let find = |n: &str| secs.iter().find(|s| s.0 == n).cloned();
    let Some((_, hot, hot_size)) = find(".text.hot") else {
        panic!(
            "{binary} has no .text.hot section: proxy/build.rs links proxy/hot-text.ld only when rustc \
             links with its bundled lld (x86_64-unknown-linux-gnu, a Rust >= 1.90 from the Rust project, whose sysroot has gcc-ld/ld.lld, and no linker configured)"
        )
    };
    let (_, text, _) = find(".text").expect(".text section");
    assert!(hot_size > 0 && hot < text, ".text.hot ({hot:#x}, {hot_size} bytes) must come before .text ({text:#x})");

    // Functions every request or start-up runs, matched through their
    // patterns (the exact names in the script are those of the dist build).
    let script = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/hot-text.ld")).expect("hot-text.ld");
    let funcs = functions(binary);
    for stem in ["_ZN10weft_proxy4main17h", "_ZN4http6header3map15hash_elem_using17h"] {
        assert!(script.contains(&format!("*(.text.{stem}*")), "hot-text.ld has no pattern for {stem}");
        let inside: Vec<_> = funcs.iter().filter(|(n, _)| n.starts_with(stem)).collect();
        assert!(!inside.is_empty(), "{binary} has no function {stem}…");
        for (name, addr) in inside {
            assert!(
                (hot..hot + hot_size).contains(addr),
                "{name} at {addr:#x} is outside .text.hot ({hot:#x}..{:#x})",
                hot + hot_size
            );
        }
    }
}
