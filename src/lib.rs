//! tori-worker: a Celery-compatible worker for Redis.
//!
//! Layers, each knowing only the ones below it:
//! - [`protocol`]: Celery/kombu wire formats, pure data.
//! - [`redis_link`]: one reconnecting Redis connection.
//! - [`broker`]: the kombu Redis transport (queues, unacked bookkeeping,
//!   restore) — knows messages, not tasks.
//! - [`dead_letter`]: reading and acting on the dead-letter list
//!   (`tori-worker dead-letter`).
//! - [`backend`]: the Celery Redis result backend.
//! - [`pool`]: where task code runs.
//! - [`worker`]: one message's life, wiring the above together.

pub mod backend;
pub mod broker;
pub mod config;
pub mod control;
pub mod dead_letter;
pub mod events;
pub mod memory;
pub mod metrics;
pub mod pool;
pub mod protocol;
mod redis_batch;
pub mod redis_link;
pub mod redis_url;
#[cfg(test)]
mod test_redis;
pub mod worker;

/// The tasks this build runs; `chaos` adds the fault-injection tasks.
/// Building it is each process's task initialisation.
pub fn task_registry(chaos: bool) -> tasks::Registry {
    let mut registry = tasks::default_registry();
    if chaos {
        tasks::chaos::register(&mut registry);
    }
    registry
}
