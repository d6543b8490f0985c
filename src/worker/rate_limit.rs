//! Per-task rate limits (Celery's `rate_limit="10/s"`), settable at run
//! time by the `rate_limit` control command.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Parses Celery's rate strings: `"10/s"`, `"100/m"`, `"5/h"`, or a bare
/// number (per second). `"0"` or empty means no limit.
pub fn parse_rate(s: &str) -> Result<Option<f64>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let (num, per) = match s.split_once('/') {
        Some((n, unit)) => {
            let per = match unit.trim() {
                "s" | "sec" => 1.0,
                "m" | "min" => 60.0,
                "h" | "hour" => 3600.0,
                other => return Err(format!("unknown rate unit {other:?}")),
            };
            (n, per)
        }
        None => (s, 1.0),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid rate {s:?}"))?;
    if n <= 0.0 {
        Ok(None)
    } else {
        Ok(Some(n / per))
    }
}

/// Spaces task starts so each task name runs at most at its rate.
#[derive(Debug, Default)]
pub struct RateLimits {
    inner: Mutex<HashMap<String, (Option<f64>, Instant)>>,
}

impl RateLimits {
    /// Sets (or clears with `None`) the rate in tasks per second.
    pub fn set(&self, task: &str, per_second: Option<f64>) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.insert(task.to_owned(), (per_second, Instant::now()));
    }

    pub fn get(&self, task: &str) -> Option<Option<f64>> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.get(task).map(|(r, _)| *r)
    }

    /// Reserves the next start time for `task` and returns how long to
    /// wait for it (zero when unlimited).
    pub fn reserve(&self, task: &str) -> Duration {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some((Some(rate), next)) = g.get_mut(task) else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        let start = (*next).max(now);
        // A rate so small its interval is no duration waits the longest
        // a limit may ask (`limits::MAX_SECONDS`) rather than panic.
        let interval = crate::protocol::limits::seconds(1.0 / *rate).unwrap_or(
            Duration::from_secs_f64(crate::protocol::limits::MAX_SECONDS),
        );
        *next = start.checked_add(interval).unwrap_or(start);
        start - now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_celery_rates() {
        assert_eq!(parse_rate("10/s"), Ok(Some(10.0)));
        assert_eq!(parse_rate("120/m"), Ok(Some(2.0)));
        assert_eq!(parse_rate("3600/h"), Ok(Some(1.0)));
        assert_eq!(parse_rate("5"), Ok(Some(5.0)));
        assert_eq!(parse_rate("0"), Ok(None));
        assert!(parse_rate("1/x").is_err());
    }

    #[test]
    fn spaces_starts() {
        let r = RateLimits::default();
        assert_eq!(r.reserve("t"), Duration::ZERO);
        r.set("t", Some(10.0));
        assert_eq!(r.reserve("t"), Duration::ZERO);
        let w = r.reserve("t");
        assert!(
            w > Duration::from_millis(90) && w <= Duration::from_millis(100),
            "{w:?}"
        );
    }
}
