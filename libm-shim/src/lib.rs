//! `exp` and `pow`, the only two functions of glibc's libm that `weft-proxy`
//! calls, defined in the binary itself so that the dynamic loader never maps
//! `libm.so.6` (issue 10: a sidecar's resident memory).
//!
//! Why: a sidecar needs `exp` for the latency EWMA of its endpoint stats
//! (`f64::exp`) and links tokio's multi-thread scheduler, whose task
//! poll-time EWMA calls `pow` (`f64::powf`). For those two symbols the
//! loader maps all of libm, relocates it and resolves its IFUNCs at start-up,
//! which leaves 0.3–0.5 MiB of it resident in every sidecar (`/proc/PID/smaps`
//! at the pair's peak in `weft-load`, docs/performance.md).
//!
//! How: the linker resolves a symbol defined in the link before it looks in
//! shared libraries, and rustc links with `--as-needed`, so with both symbols
//! defined here lld (rustc's default linker since Rust 1.90) leaves
//! `libm.so.6` out of `DT_NEEDED`. GNU ld keeps it (under `--as-needed` it
//! keeps a library that defines a symbol the program refers to, even one the
//! program defines itself): with a linker override the shim saves nothing,
//! and `proxy/tests/no_libm.rs` says so. The bodies are the `libm` crate's
//! (rust-lang's port of musl's libm; within 1 ULP of the correctly rounded
//! result, special cases — NaN, ±∞, ±0, overflow — as C99 Annex F
//! specifies; `errno` is not set, which Annex F allows and Rust never reads).
//!
//! The two symbols are exported, so a library loaded later (an NSS module
//! for `getaddrinfo`, say) binds to them too; one that itself depends on
//! libm still loads it, which depends on the host's NSS configuration.
//!
//! Link it with `use weft_libm_shim as _;` in the binary's `main.rs`: an
//! unused dependency is not linked. `proxy/tests/no_libm.rs` checks the
//! result; a new call into libm (say `f64::sin`) makes it fail, and the fix
//! is a third function here.

/// C99 `exp(x)`: e raised to the power `x`.
#[allow(unsafe_code)] // `no_mangle`: this symbol is meant to replace libm's.
#[no_mangle]
pub extern "C" fn exp(x: f64) -> f64 {
    libm::exp(x)
}

/// C99 `pow(x, y)`: `x` raised to the power `y`.
#[allow(unsafe_code)] // `no_mangle`: this symbol is meant to replace libm's.
#[no_mangle]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[cfg(test)]
mod tests {
    // In this test binary `f64::exp` and `f64::powf` call the symbols above
    // too, so these check against exact results, constants, and functions
    // that are not ours: `sqrt` (an instruction), `ln` (glibc's `log`) and
    // `powi` (multiplication).
    use super::*;

    /// Distance in units in the last place between two finite doubles of
    /// the same sign.
    fn ulps(a: f64, b: f64) -> u64 {
        assert_eq!(a.is_sign_negative(), b.is_sign_negative(), "{a} vs {b}");
        a.to_bits().abs_diff(b.to_bits())
    }

    #[test]
    fn exp_is_within_an_ulp_of_known_values() {
        use std::f64::consts::{E, LN_10, LN_2};
        assert_eq!(exp(0.0), 1.0);
        assert!(ulps(exp(1.0), E) <= 1, "exp(1) = {}", exp(1.0));
        assert!(ulps(exp(LN_2), 2.0) <= 1, "exp(ln 2) = {}", exp(LN_2));
        assert!(ulps(exp(LN_10), 10.0) <= 1, "exp(ln 10) = {}", exp(LN_10));
        assert!(ulps(exp(-1.0), 1.0 / E) <= 1, "exp(-1) = {}", exp(-1.0));
        for n in [-30, -7, -2, 2, 5, 20] {
            // E.powi(n) is itself up to ~10 ulps off (repeated multiplication).
            let (got, want) = (exp(n as f64), E.powi(n));
            assert!((got - want).abs() <= want * 1e-14, "exp({n}) = {got} vs {want}");
        }
        for i in 1..2000 {
            let y = 0.25 + i as f64 / 500.0; // 0.25 ..= 4.25: ln y small, so exp(ln y) ≈ y to a few ulps
            assert!(ulps(exp(y.ln()), y) <= 3, "exp(ln {y}) = {}", exp(y.ln()));
        }
    }

    #[test]
    fn exp_special_values_follow_c99_annex_f() {
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp(f64::INFINITY), f64::INFINITY);
        assert_eq!(exp(710.0), f64::INFINITY); // overflow
        assert_eq!(exp(-746.0), 0.0); // underflow
        assert!(exp(-740.0) > 0.0 && exp(-740.0) < f64::MIN_POSITIVE); // subnormal
        assert!(exp(f64::NAN).is_nan());
    }

    #[test]
    fn pow_is_within_an_ulp_of_known_values() {
        assert_eq!(pow(2.0, 10.0), 1024.0);
        assert_eq!(pow(10.0, 2.0), 100.0);
        assert_eq!(pow(0.5, -3.0), 8.0);
        assert_eq!(pow(-2.0, 3.0), -8.0);
        assert_eq!(pow(9.0, 0.5), 3.0);
        for i in 1..2000 {
            let x = i as f64 / 97.0;
            assert!(ulps(pow(x, 0.5), x.sqrt()) <= 1, "pow({x}, 0.5) = {} vs sqrt {}", pow(x, 0.5), x.sqrt());
            for n in [2, 3, -2] {
                let want = x.powi(n);
                assert!(ulps(pow(x, n as f64), want) <= 2, "pow({x}, {n}) = {} vs {want}", pow(x, n as f64));
            }
        }
    }

    #[test]
    fn pow_special_values_follow_c99_annex_f() {
        assert_eq!(pow(2.0, 0.0), 1.0);
        assert_eq!(pow(f64::NAN, 0.0), 1.0);
        assert_eq!(pow(1.0, f64::NAN), 1.0);
        assert_eq!(pow(0.0, 0.0), 1.0);
        assert!(pow(-1.0, 0.5).is_nan());
        assert!(pow(f64::NAN, 1.0).is_nan());
        assert_eq!(pow(0.0, -1.0), f64::INFINITY);
        assert_eq!(pow(-0.0, -1.0), f64::NEG_INFINITY);
        assert_eq!(pow(-1.0, f64::INFINITY), 1.0);
        assert_eq!(pow(0.5, f64::INFINITY), 0.0);
        assert_eq!(pow(2.0, f64::INFINITY), f64::INFINITY);
        assert_eq!(pow(2.0, 1024.0), f64::INFINITY); // overflow
        assert_eq!(pow(2.0, -1075.0), 0.0); // underflow
    }
}
