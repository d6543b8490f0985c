//! Keeps the worker's background loops alive through a bug.
//!
//! A panic inside a spawned tokio task ends only that task, silently: a
//! lease keeper that stopped would let other workers restore and run again
//! every long task held here, a heartbeat that stopped would have Flower
//! show the worker offline while it works. So each loop runs under a
//! supervisor that logs the panic and starts the loop again, after a pause
//! so that a loop panicking at once on every start does not spin.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::watch;

use super::Stop;
use crate::pool::threads::panic_message;

/// Runs `start()` until it returns, starting it again `pause` after each
/// panic; returns early once the worker is stopping.
pub(crate) async fn supervise<F, Fut>(
    name: &'static str,
    mut stop: watch::Receiver<Stop>,
    pause: Duration,
    mut start: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let Err(payload) = AssertUnwindSafe(start()).catch_unwind().await else {
            return;
        };
        let why = panic_message(payload.as_ref());
        tracing::error!(background_loop = name, panic = %why, restart_in_ms = pause.as_millis() as u64, "background loop panicked (a tori-worker bug); starting it again");
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s != Stop::Running) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_loop_that_panics_is_started_again_until_it_returns() {
        let (_tx, rx) = watch::channel(Stop::Running);
        let starts = Arc::new(AtomicUsize::new(0));
        let counted = starts.clone();
        supervise("test", rx, Duration::from_millis(1), move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    panic!("bug #{n}");
                }
            }
        })
        .await;
        assert_eq!(starts.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_stop_ends_the_pause_after_a_panic() {
        let (tx, rx) = watch::channel(Stop::Running);
        let starts = Arc::new(AtomicUsize::new(0));
        let counted = starts.clone();
        let supervised = tokio::spawn(supervise(
            "test",
            rx,
            Duration::from_secs(3600),
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { panic!("always") }
            },
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(Stop::Warm).unwrap();
        tokio::time::timeout(Duration::from_secs(5), supervised)
            .await
            .expect("the supervisor returns once stopping")
            .expect("the supervisor itself does not panic");
        assert_eq!(starts.load(Ordering::SeqCst), 1);
    }
}
