//! The shutdown clock: one hard deadline from the first stop request to
//! exit (`--shutdown-timeout`), and how it is shared between the steps.
//!
//! Steps in order: put unstarted messages back and wait for running tasks
//! (both until the warm end), then kill the pool and put the interrupted
//! late-ack messages back, send worker-offline (until the deadline). What
//! could not be put back by then stays in Redis's `unacked` hash, where
//! kombu's visibility restore finds it: nothing is lost, and the exit code
//! says so.

use std::time::Duration;

use tokio::time::Instant;

/// Exit code of a clean stop: everything held was finished or put back.
pub const EXIT_CLEAN: i32 = 0;

/// Exit code when the shutdown deadline passed with messages still in
/// `unacked` (they come back after the visibility timeout).
pub const EXIT_LEFT_FOR_VISIBILITY_RESTORE: i32 = 3;

/// Part of the shutdown kept after the warm wait for killing the pool,
/// putting interrupted late-ack messages back and going offline: a fifth
/// of it, 0.5 to 5 s. With Redis up those take milliseconds; the margin
/// is for a slow Redis, and keeps a warm wait from eating the whole bound.
pub fn settle_reserve(total: Duration) -> Duration {
    (total / 5).clamp(Duration::from_millis(500), Duration::from_secs(5))
}

/// The shutdown deadlines, fixed when the stop was first seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// Putting unstarted messages back and waiting for running tasks end
    /// here: the soft shutdown timeout, or earlier to keep the reserve.
    pub warm_end: Instant,
    /// Everything ends here.
    pub hard: Instant,
}

impl Deadlines {
    pub fn new(stop_at: Instant, soft: Duration, total: Duration) -> Self {
        let hard = stop_at + total;
        let reserve = settle_reserve(total).min(total);
        let warm_end = (stop_at + soft).min(hard - reserve);
        Self { warm_end, hard }
    }
}

/// How the worker ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Everything held was finished or put back (or nothing was fetched).
    Clean,
    /// The deadline passed with these messages still in `unacked`.
    LeftForVisibilityRestore(Vec<Left>),
}

/// A message left in `unacked` at exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Left {
    pub delivery_tag: String,
    pub task_id: String,
}

impl StopOutcome {
    pub fn from_left(left: Vec<Left>) -> Self {
        if left.is_empty() {
            Self::Clean
        } else {
            Self::LeftForVisibilityRestore(left)
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Clean => EXIT_CLEAN,
            Self::LeftForVisibilityRestore(_) => EXIT_LEFT_FOR_VISIBILITY_RESTORE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn the_default_soft_wait_fits_with_its_reserve() {
        let t0 = Instant::now();
        let d = Deadlines::new(t0, secs(20.0), secs(25.0));
        assert_eq!(d.hard - t0, secs(25.0));
        assert_eq!(d.warm_end - t0, secs(20.0));
    }

    #[test]
    fn a_long_soft_wait_is_cut_to_keep_the_reserve() {
        let t0 = Instant::now();
        let d = Deadlines::new(t0, secs(3.0), secs(3.0));
        assert_eq!(d.hard - t0, secs(3.0));
        assert_eq!(d.warm_end - t0, secs(2.4));
        let d = Deadlines::new(t0, secs(60.0), secs(60.0));
        assert_eq!(d.warm_end - t0, secs(55.0), "the reserve is capped at 5 s");
    }

    #[test]
    fn a_short_soft_wait_is_kept() {
        let t0 = Instant::now();
        let d = Deadlines::new(t0, secs(1.0), secs(25.0));
        assert_eq!(d.warm_end - t0, secs(1.0));
    }

    #[test]
    fn a_tiny_bound_never_ends_the_warm_wait_before_the_stop() {
        let t0 = Instant::now();
        let d = Deadlines::new(t0, secs(0.2), secs(0.2));
        assert_eq!(d.hard - t0, secs(0.2));
        assert_eq!(
            d.warm_end, t0,
            "reserve larger than the bound: no warm wait"
        );
    }

    #[test]
    fn reserve_bounds() {
        assert_eq!(settle_reserve(secs(1.0)), secs(0.5));
        assert_eq!(settle_reserve(secs(10.0)), secs(2.0));
        assert_eq!(settle_reserve(secs(600.0)), secs(5.0));
    }

    #[test]
    fn exit_code_says_whether_messages_were_left() {
        assert_eq!(StopOutcome::from_left(vec![]), StopOutcome::Clean);
        assert_eq!(StopOutcome::Clean.exit_code(), 0);
        let left = StopOutcome::from_left(vec![Left {
            delivery_tag: "t".into(),
            task_id: "id".into(),
        }]);
        assert_eq!(left.exit_code(), 3);
    }
}
