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
//! defined here `libm.so.6` is not a `DT_NEEDED` entry at all. The bodies are
//! the `libm` crate's (rust-lang's port of musl's libm; results within 1 ULP
//! of glibc's, IEEE 754 special cases — NaN, ±∞, ±0, overflow — as C99
//! Annex F specifies).
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
    use super::*;

    #[test]
    fn exp_matches_std_within_an_ulp() {
        for x in [-745.0, -20.5, -1.0, -1e-9, 0.0, 1e-9, 0.5, 1.0, 10.0, 709.0] {
            let (ours, std) = (exp(x), f64::exp(x));
            assert!((ours - std).abs() <= std * f64::EPSILON, "exp({x}): {ours} vs {std}");
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp(f64::INFINITY), f64::INFINITY);
        assert_eq!(exp(1000.0), f64::INFINITY);
        assert!(exp(f64::NAN).is_nan());
    }

    #[test]
    fn pow_matches_std_within_an_ulp() {
        for (x, y) in [(0.9, 3.0), (0.8, 0.5), (2.0, -10.0), (10.0, 2.5), (1.5, 100.0)] {
            let (ours, std) = (pow(x, y), f64::powf(x, y));
            assert!((ours - std).abs() <= std * f64::EPSILON, "pow({x}, {y}): {ours} vs {std}");
        }
        assert_eq!(pow(2.0, 0.0), 1.0);
        assert_eq!(pow(f64::NAN, 0.0), 1.0);
        assert!(pow(-1.0, 0.5).is_nan());
        assert_eq!(pow(0.0, -1.0), f64::INFINITY);
    }
}
