//! Numbers and times as an operator reads them: "in 59m47s", RFC 3339
//! timestamps, "1 route" / "2 routes".

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A span of whole seconds in the largest two units: `45s`, `10m`, `59m47s`,
/// `2h3m`, `3d4h` (the smaller unit dropped when zero).
pub fn duration(secs: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let Some(i) = UNITS.iter().position(|(n, _)| secs >= *n) else { return "0s".into() };
    let (big, big_unit) = UNITS[i];
    let mut out = format!("{}{big_unit}", secs / big);
    if let Some((small, small_unit)) = UNITS.get(i + 1) {
        let rest = (secs % big) / small;
        if rest > 0 {
            out.push_str(&format!("{rest}{small_unit}"));
        }
    }
    out
}

/// How far `at` (Unix seconds) is from `now` (Unix seconds): `in 59m47s`,
/// or `expired 3m ago` once past.
pub fn relative(at: i64, now: i64) -> String {
    if at >= now {
        format!("in {}", duration((at - now).unsigned_abs()))
    } else {
        format!("expired {} ago", duration((now - at).unsigned_abs()))
    }
}

/// `at` (Unix seconds) as an RFC 3339 UTC timestamp, e.g. `2025-01-31T12:00:00Z`.
pub fn rfc3339(at: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(at.max(0).unsigned_abs());
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The current time in Unix seconds.
pub fn now_unix() -> i64 {
    weft_certs::svid::unix_secs(SystemTime::now())
}

/// `n` and the noun, singular for exactly one: `1 route`, `2 routes`.
/// `plural` is given whole because English plurals are irregular ("policies").
pub fn count(n: usize, singular: &str, plural: &str) -> String {
    format!("{n} {}", if n == 1 { singular } else { plural })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_use_the_two_largest_units() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(45), "45s");
        assert_eq!(duration(600), "10m");
        assert_eq!(duration(3587), "59m47s");
        assert_eq!(duration(3600), "1h");
        assert_eq!(duration(7380), "2h3m");
        assert_eq!(duration(7381), "2h3m", "seconds dropped beside hours");
        assert_eq!(duration(3 * 86_400 + 4 * 3600 + 5), "3d4h");
    }

    #[test]
    fn relative_times_say_in_or_ago() {
        assert_eq!(relative(1_000 + 3587, 1_000), "in 59m47s");
        assert_eq!(relative(1_000, 1_180), "expired 3m ago");
        assert_eq!(relative(5, 5), "in 0s");
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn counts_pick_singular_or_plural() {
        assert_eq!(count(1, "route", "routes"), "1 route");
        assert_eq!(count(0, "route", "routes"), "0 routes");
        assert_eq!(count(2, "authorization policy", "authorization policies"), "2 authorization policies");
    }
}
