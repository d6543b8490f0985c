//! Keeps the worker's background loops alive through a bug.
//!
//! A panic inside a spawned tokio task ends only that task, silently: a
//! lease keeper that stopped would let other workers restore and run again
//! every long task held here, a heartbeat that stopped would have Flower
//! show the worker offline while it works. So each loop runs under a
//! supervisor that logs the panic and starts the loop again, after a pause
//! so that a loop panicking at once on every start does not spin. Each
//! loop decides itself when to end (the lease keeper runs on through a
//! warm shutdown while late-ack tasks finish), so a panic during a stop is
//! followed by a restart too; the worker waits for these loops only a few
//! seconds when it exits.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;

use crate::pool::threads::panic_message;

/// Runs `start()` until it returns, starting it again `pause` after each
/// panic.
pub(crate) async fn supervise<F, Fut>(name: &'static str, pause: Duration, mut start: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let Err(payload) = AssertUnwindSafe(start()).catch_unwind().await else {
            return;
        };
        let why = panic_message(payload.as_ref());
        tracing::error!(background_loop = name, panic = %why, restart_in_ms = pause.as_millis() as u64, "background loop panicked (a tori-worker bug); starting it again");
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_loop_that_panics_is_started_again_until_it_returns() {
        let starts = Arc::new(AtomicUsize::new(0));
        let counted = starts.clone();
        supervise("test", Duration::from_millis(1), move || {
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
}
