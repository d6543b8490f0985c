//! Celery's wire formats as pure data: envelopes, task messages, result
//! documents. No I/O here, so every format is unit-tested against the
//! golden captures in `tests/vectors/`.

pub mod canvas;
pub mod envelope;
pub mod outgoing;
pub mod pyjson;
pub mod result;
pub mod task_message;

pub use envelope::{Envelope, EnvelopeError};
pub use result::{State, StateDoc};
pub use task_message::{DecodeError, TaskMessage, TimeLimit};
