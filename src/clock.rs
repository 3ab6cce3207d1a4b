//! Wall-clock time, in one place. Timing logic runs on `tokio::time` (pausable in tests);
//! only what is written for people and other processes (store rows, logs, reports)
//! carries wall-clock time, as Unix milliseconds formatted as RFC 3339 UTC.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    to_ms(SystemTime::now())
}

/// The wall-clock milliseconds of `at`, a `tokio` instant ahead of `now` (read at
/// `now_ms`): a breaker's reopening time, for people.
pub fn ms_at(at: tokio::time::Instant, now: tokio::time::Instant, now_ms: i64) -> i64 {
    let wait = at.saturating_duration_since(now).as_millis();
    now_ms.saturating_add(i64::try_from(wait).unwrap_or(i64::MAX))
}

pub fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

pub fn from_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// `2026-11-21T20:58:17.123Z`: the store's timestamp format (sorts as text).
pub fn rfc3339_ms(ms: i64) -> String {
    humantime::format_rfc3339_millis(from_ms(ms.max(0))).to_string()
}

/// `2026-11-21T20:58:17Z`.
pub fn rfc3339_s(ms: i64) -> String {
    humantime::format_rfc3339_seconds(from_ms(ms.max(0))).to_string()
}

/// A point in time given as RFC 3339, or as a duration back from `now_ms` (`7d`,
/// `12h`), or `now`.
pub fn parse_instant(text: &str, now_ms: i64) -> Result<i64, String> {
    let t = text.trim();
    if t == "now" {
        return Ok(now_ms);
    }
    if let Ok(d) = humantime::parse_duration(t) {
        return Ok(now_ms - i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2));
    }
    humantime::parse_rfc3339_weak(t).map(to_ms).map_err(|_| {
        format!("{t:?} is neither a duration back from now (7d, 12h) nor an RFC 3339 time")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_764_627_158_123), "2025-12-01T22:12:38.123Z");
        assert_eq!(rfc3339_s(1_764_627_158_123), "2025-12-01T22:12:38Z");
        let now = 1_764_627_158_123;
        assert_eq!(parse_instant("now", now), Ok(now));
        assert_eq!(parse_instant("7d", now), Ok(now - 7 * 86_400_000));
        assert_eq!(parse_instant("12h", now), Ok(now - 12 * 3_600_000));
        assert_eq!(
            parse_instant("2025-12-01T22:12:38.123Z", 0),
            Ok(1_764_627_158_123)
        );
        assert!(parse_instant("yesterday", now).is_err());
    }
}
