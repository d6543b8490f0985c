//! Celery's wire formats as pure data: envelopes, task messages, result
//! documents. No I/O here, so every format is unit-tested against the
//! golden captures in `tests/vectors/`.

pub mod canvas;
pub mod envelope;
pub mod limits;
pub mod outgoing;
pub mod pyjson;
pub mod result;
#[cfg(test)]
pub(crate) mod strategies;
pub mod task_message;

pub use envelope::{Envelope, EnvelopeError};
pub use result::{State, StateDoc};
pub use task_message::{DecodeError, TaskMessage, TimeLimit};

/// Every captured broker envelope in `tests/vectors/broker` that parses,
/// with its path, for tests that check a property over all of them.
#[cfg(test)]
pub(crate) fn broker_vector_envelopes() -> Vec<(std::path::PathBuf, Envelope)> {
    let dir = format!("{}/tests/vectors/broker", env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("vectors directory") {
        let path = entry.expect("directory entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("raw") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("readable vector");
        if let Ok(env) = Envelope::parse(&bytes) {
            out.push((path, env));
        }
    }
    out
}
