//! Link options for the sidecar binary (docs/performance.md, "Fourth
//! session: memory"): its machine code and the tables the dynamic loader
//! reads at start-up are most of a sidecar's resident memory.
fn main() {
    // Relative relocations packed as DT_RELR (glibc >= 2.36, lld, GNU ld >= 2.38):
    // the position-independent binary's ~0.65 MB `.rela.dyn`, read in full
    // by the dynamic loader at every start, shrinks to a few KB.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
