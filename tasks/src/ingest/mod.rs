//! PDF ingestion (issue #4): extraction, cleaning, chunking and embeddings.
//!
//! The native parts — libpdfium, ONNX Runtime and the all-MiniLM-L6-v2
//! model — are loaded at run time from files that `scripts/setup-native`
//! places in `.tori/native/` (see [`NativeFiles`]). Each is loaded at most
//! once per process and shared by every task run in it (see
//! [`load_counts`]): the process-pool issue scales this with processes.
//!
//! Stages, one module each:
//! - [`extract`]: the [`Extractor`] trait, with the pdfium backend;
//! - [`clean`]: unicode normalization, de-hyphenation, header/footer
//!   removal, whitespace and control characters;
//! - [`chunk`]: token windows with the model's tokenizer, keeping pages;
//! - [`embed`]: ONNX Runtime embeddings, mean pooled and L2 normalized
//!   ([`session`]: which model file, one batch through it);
//! - [`task`]: the `pdf_ingestion` Celery task tying them together.

pub mod artifacts;
pub mod chunk;
pub mod clean;
pub mod embed;
pub mod extract;
pub mod inflate_guard;
pub mod native;
pub mod objects;
pub mod session;
pub mod source;
pub mod summarize;
pub mod task;

pub use extract::{
    Backend, ExtractError, Extracted, Extractor, OxideExtractor, PageText, PdfExtractExtractor,
    PdfiumExtractor, WithFallback,
};
pub use native::{ingestion_status, load_counts, LoadCounts, NativeFiles};
pub use source::Sources;
pub use task::{IngestOptions, IngestResult, PdfIngestion};

use crate::registry::Registry;

/// Registers `pdf_ingestion` (alias `ingest_pdf_clean_task`) when the
/// native files are present and load; otherwise registers nothing, so the
/// worker answers `NotRegistered` ([`ingestion_status`] says why).
pub fn register(registry: &mut Registry) {
    if ingestion_status().is_err() {
        return;
    }
    match PdfIngestion::from_env() {
        Ok(task) => {
            registry.register(task).alias(task::ALIAS, task::NAME);
        }
        // e.g. an unknown TORI_PDF_BACKEND: say why the task is missing
        // rather than leave producers with a bare NotRegistered.
        Err(why) => eprintln!("tori-worker: pdf_ingestion is not registered: {why}"),
    }
}
