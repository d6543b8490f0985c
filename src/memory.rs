//! Giving memory back to the operating system after a large message.
//!
//! mimalloc keeps freed pages for reuse and returns them to the OS only
//! after a delay, and only when the thread that owns them next allocates:
//! what makes it fast on the small, short-lived allocations of a drain.
//! After a message of tens of megabytes, handled across several threads
//! (fetch, decode, the pool pipe, the result write), that left the worker
//! holding several times the message for good. So while a large message
//! is in flight, freed pages are returned at once, and once the last one
//! is settled the allocator is asked to collect; the default comes back
//! for everything else, so the hot path of small tasks pays nothing.

use std::sync::Mutex;

/// Messages at least this large are handled under a [`LargeMessage`]
/// guard.
pub const LARGE_MESSAGE: usize = 4 << 20;

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (the sys crate
/// names no constant for it): milliseconds before freed memory is
/// returned to the OS; 0 is at once. Its default is a delay (the unit test
/// checks the guard's effect on it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Large messages in flight, and the purge delay to restore after them.
static IN_FLIGHT: Mutex<(usize, Option<std::os::raw::c_long>)> = Mutex::new((0, None));

/// Held while a large message is handled; see the module docs.
#[derive(Debug)]
pub struct LargeMessage(());

impl LargeMessage {
    pub fn begin() -> Self {
        let mut g = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 == 0 {
            g.1 = Some(purge_delay());
            set_purge_delay(0);
        }
        g.0 += 1;
        LargeMessage(())
    }
}

impl Drop for LargeMessage {
    fn drop(&mut self) {
        let mut g = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = g.0.saturating_sub(1);
        if g.0 == 0 {
            release_to_os();
            if let Some(delay) = g.1.take() {
                set_purge_delay(delay);
            }
        }
    }
}

fn purge_delay() -> std::os::raw::c_long {
    // SAFETY: reads one of mimalloc's option values; no pointers involved.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY)
    }
}

fn set_purge_delay(value: std::os::raw::c_long) {
    // SAFETY: sets one of mimalloc's option values, which mimalloc reads
    // with relaxed atomics from any thread; no pointers involved.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, value)
    }
}

/// Frees what mimalloc holds but does not use on this thread and returns
/// it to the OS.
pub fn release_to_os() {
    // SAFETY: `mi_collect` takes no pointers and only walks mimalloc's own
    // bookkeeping; it is safe to call from any thread at any time. Without
    // mimalloc as the global allocator (unit tests) it has nothing to do.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guard sets the purge delay to 0 while any large message is in
    /// flight and restores the default (a delay: 1,000 ms in the mimalloc
    /// this links) after the last.
    #[test]
    fn a_large_message_purges_at_once_then_restores_the_default() {
        let default = purge_delay();
        assert!(default > 0, "{default}");
        let a = LargeMessage::begin();
        let b = LargeMessage::begin();
        assert_eq!(purge_delay(), 0);
        drop(a);
        assert_eq!(purge_delay(), 0, "another large message is still in flight");
        drop(b);
        assert_eq!(purge_delay(), default);
    }
}
