//! The `pdf_ingestion` task (alias `ingest_pdf_clean_task`).

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::artifacts::{self, ArtifactStore, ArtifactUrls};
use super::chunk::{chunk_pages, ChunkSpec};
use super::clean::{clean_pages, visible_chars, MIN_TEXT_CHARS};
use super::embed::{self, EmbedStats, Embedder};
use super::extract::{
    Backend, ExtractError, ExtractLimits, Extractor, OxideExtractor, PdfExtractExtractor,
    PdfiumExtractor, WithFallback,
};
use super::inflate_guard::{self, InflateLimits};
use super::native::NativeFiles;
use super::source::{Resolved, Sources};
use crate::task::{PyException, Task, TaskContext, TaskError, TaskOptions};

pub const NAME: &str = "pdf_ingestion";
pub const ALIAS: &str = "ingest_pdf_clean_task";

/// The default size cap (`options.max_bytes`).
pub const DEFAULT_MAX_BYTES: u64 = 512 << 20;

/// Per-call options (all optional; unknown keys are a `TypeError`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestOptions {
    /// Tokens per chunk, without `[CLS]`/`[SEP]` (default 254, max 254).
    pub chunk_tokens: Option<usize>,
    /// Tokens shared by consecutive chunks (default 32).
    pub chunk_overlap: Option<usize>,
    /// Refuse documents with more pages (default 5000).
    pub max_pages: Option<usize>,
    /// Refuse files larger than this many bytes (default 512 MiB).
    pub max_bytes: Option<u64>,
    /// The extraction backend: `pdfium` (default: with `pdf_oxide` where
    /// pdfium fails), `pdf_oxide` or `pdf-extract` (default from
    /// `TORI_PDF_BACKEND`).
    pub backend: Option<Backend>,
    /// Refuse documents with a compressed stream inflating past this
    /// many bytes (default 256 MiB; the decompression-bomb guard).
    pub max_stream_bytes: Option<u64>,
    /// Compute embeddings (default true).
    pub embed: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct IngestArgs {
    pub file_ref: String,
    #[serde(default)]
    pub options: Option<IngestOptions>,
}

/// The language guess for the cleaned text (whatlang, ISO 639-3).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Language {
    pub code: &'static str,
    pub confidence: f64,
    pub reliable: bool,
}

/// Milliseconds per stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timings {
    pub read_ms: f64,
    pub extract_ms: f64,
    pub clean_ms: f64,
    pub chunk_ms: f64,
    pub embed_ms: f64,
    pub summarize_ms: f64,
    pub total_ms: f64,
}

/// The task's (small) result. Per-chunk vectors are not part of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IngestResult {
    pub sha256: String,
    pub file_ref: String,
    pub bytes: u64,
    pub backend: &'static str,
    pub pages: usize,
    /// Characters of cleaned text over all pages.
    pub chars: usize,
    pub language: Option<Language>,
    pub title: Option<String>,
    pub author: Option<String>,
    /// True when some page has (almost) no text layer.
    pub needs_ocr: bool,
    /// 1-based numbers of the pages without text.
    pub needs_ocr_pages: Vec<usize>,
    pub chunks: usize,
    pub embedding_model: Option<&'static str>,
    pub embedding_dim: Option<usize>,
    pub embed_stats: Option<EmbedStats>,
    pub header_footer_lines_removed: usize,
    /// A few central sentences (extractive; see `summarize`).
    pub summary: Vec<String>,
    /// Top keyphrases with scores.
    pub concepts: Vec<super::summarize::Concept>,
    pub warnings: Vec<String>,
    pub timings: Timings,
    /// Where the pages, chunks (with vectors) and this result are stored;
    /// `None` when no artifact store is configured (library use) or the
    /// options change the output (see [`PdfIngestion::ingest_or_reuse`]).
    pub artifacts: Option<ArtifactUrls>,
    /// True when this result was read back from a stored `result.json`
    /// instead of being computed.
    pub reused: bool,
}

/// What [`PdfIngestion::ingest_bytes`] produces besides the result: the
/// cleaned pages, chunks and their vectors (for artifacts and tests).
#[derive(Debug, Clone)]
pub struct IngestOutput {
    pub result: IngestResult,
    pub pages: Vec<String>,
    pub chunks: Vec<super::chunk::Chunk>,
    pub vectors: Vec<Vec<f32>>,
}

/// `pdf_ingestion(file_ref, options=None)`.
#[derive(Debug, Clone)]
pub struct PdfIngestion {
    sources: Sources,
    files: NativeFiles,
    extractor: WithFallback<PdfiumExtractor, OxideExtractor>,
    /// The backend when a call names none.
    default_backend: Backend,
    /// `None`: no artifacts (and no reuse); `Some(Err)`: misconfigured,
    /// every run fails with the reason.
    artifacts: Option<Result<ArtifactStore, String>>,
}

impl PdfIngestion {
    /// Roots from `TORI_STORAGE_ROOT` / `TORI_STORAGE_URL` (see
    /// [`Sources::from_env`]), artifacts from `TORI_ARTIFACTS_URL`, native
    /// files from the environment (see [`NativeFiles::from_env`]). Errs
    /// when the native files are missing.
    pub fn from_env() -> Result<Self, String> {
        let sources = Sources::from_env();
        let store = ArtifactStore::from_env(&sources);
        let mut task = Self::with(sources, NativeFiles::from_env())?;
        task.artifacts = Some(store);
        Ok(task)
    }

    /// Stores artifacts in `store` and reuses them (see
    /// [`Self::ingest_or_reuse`]).
    pub fn with_artifacts(mut self, store: ArtifactStore) -> Self {
        self.artifacts = Some(Ok(store));
        self
    }

    /// A task reading under `storage_root` with the given native files.
    pub fn new(storage_root: &Path, files: NativeFiles) -> Result<Self, String> {
        Self::with(Sources::local(storage_root), files)
    }

    /// A task reading from `sources` with the given native files.
    pub fn with(sources: Sources, files: NativeFiles) -> Result<Self, String> {
        files.status()?;
        Ok(Self {
            sources,
            extractor: WithFallback {
                primary: PdfiumExtractor::new(files.pdfium_lib.clone()),
                fallback: OxideExtractor,
            },
            default_backend: backend_from_env()?,
            files,
            artifacts: None,
        })
    }

    /// Loads pdfium, ONNX Runtime and the model now (otherwise on first use).
    pub fn warm(&self) -> Result<(), String> {
        self.extractor.primary.warm().map_err(|e| e.to_string())?;
        Embedder::global(&self.files).map(|_| ())
    }

    /// Where `file_ref` points (see [`Sources::resolve`]).
    pub fn resolve(&self, file_ref: &str) -> Result<Resolved, TaskError> {
        self.sources.resolve(file_ref)
    }

    /// Ingests one document's bytes (everything but the file lookup).
    pub fn ingest_bytes(
        &self,
        ctx: &TaskContext<'_>,
        file_ref: &str,
        bytes: &[u8],
        opts: &IngestOptions,
        read_ms: f64,
    ) -> Result<IngestOutput, TaskError> {
        let total = Instant::now();
        let spec = ChunkSpec {
            size: opts.chunk_tokens.unwrap_or(ChunkSpec::default().size),
            overlap: opts.chunk_overlap.unwrap_or(ChunkSpec::default().overlap),
        };
        spec.validate(embed::MAX_TOKENS - 2)
            .map_err(|e| exc("TypeError", format!("{NAME}(): {e}")))?;
        let sha256 = hex(&Sha256::digest(bytes));

        // Extract, after the decompression guard.
        let t = Instant::now();
        let inflate = InflateLimits {
            max_stream_bytes: opts
                .max_stream_bytes
                .unwrap_or(InflateLimits::default().max_stream_bytes),
        };
        inflate_guard::check(bytes, &inflate)
            .map_err(|e| value_error(format!("[decompression_bomb] {e}")))?;
        let limits = ExtractLimits {
            max_pages: opts.max_pages.unwrap_or(ExtractLimits::default().max_pages),
        };
        let mut on_page = |page: usize, pages: usize| {
            ctx.report_progress(json!({"stage": "extract", "page": page, "pages": pages}));
            !ctx.cancel.is_cancelled()
        };
        let extractor: &dyn Extractor = match opts.backend.unwrap_or(self.default_backend) {
            Backend::Pdfium => &self.extractor,
            Backend::PdfOxide => &OxideExtractor,
            Backend::PdfExtract => &PdfExtractExtractor,
        };
        let extracted = extractor
            .extract(bytes, &limits, &mut on_page)
            .map_err(extract_failure)?;
        let extract_ms = ms(t);
        ctx.checkpoint()?;

        // Clean.
        let t = Instant::now();
        let raw: Vec<String> = extracted.pages.iter().map(|p| p.text.clone()).collect();
        let cleaned = clean_pages(&raw);
        let needs_ocr_pages: Vec<usize> = cleaned
            .pages
            .iter()
            .enumerate()
            .filter(|(_, p)| visible_chars(p) < MIN_TEXT_CHARS)
            .map(|(i, _)| i + 1)
            .collect();
        let chars: usize = cleaned.pages.iter().map(|p| p.chars().count()).sum();
        let language = detect_language(&cleaned.pages);
        let clean_ms = ms(t);
        ctx.checkpoint()?;

        // Chunk and embed.
        let want_embed = opts.embed.unwrap_or(true);
        let embedder = Embedder::global(&self.files)
            .map_err(|e| runtime(format!("[model_unavailable] {e}")))?;
        let t = Instant::now();
        let chunks = chunk_pages(embedder.tokenizer(), &cleaned.pages, spec)
            .map_err(|e| runtime(format!("[tokenizer] {e}")))?;
        let chunk_ms = ms(t);
        let t = Instant::now();
        let (vectors, embed_stats) = if want_embed && !chunks.is_empty() {
            let ids: Vec<Vec<u32>> = chunks.iter().map(|c| c.ids.clone()).collect();
            let n = chunks.len();
            let pages = cleaned.pages.len();
            let mut done = 0usize;
            let mut keep_going = || {
                ctx.report_progress(json!({
                    "stage": "embed", "page": pages, "pages": pages, "batch": done, "chunks": n
                }));
                done += 1;
                !ctx.cancel.is_cancelled()
            };
            match embedder.embed_ids(&ids, &mut keep_going) {
                Ok((v, s)) => (v, Some(s)),
                Err(_) if ctx.cancel.is_cancelled() => {
                    return Err(TaskError::SoftTimeLimitExceeded)
                }
                Err(e) => return Err(runtime(format!("[embedding_failed] {e}"))),
            }
        } else {
            (Vec::new(), None)
        };
        let embed_ms = ms(t);

        // Concepts and summary, from the text and vectors we already have.
        let t = Instant::now();
        let text = cleaned.pages.join("\n\n");
        let concepts = if vectors.is_empty() {
            super::summarize::concepts(&text, 10)
        } else {
            super::summarize::concepts_by_embedding(&text, &vectors, 10, |phrases| {
                embedder.embed_texts(phrases)
            })
            .map_err(|e| runtime(format!("[embedding_failed] concepts: {e}")))?
        };
        let chunk_texts: Vec<String> = chunks.iter().map(|c| c.text.clone()).collect();
        let summary = super::summarize::summary(&chunk_texts, &vectors, &concepts, 3);
        let summarize_ms = ms(t);

        let result = IngestResult {
            sha256,
            file_ref: file_ref.to_owned(),
            bytes: bytes.len() as u64,
            backend: extracted.backend,
            pages: cleaned.pages.len(),
            chars,
            language,
            title: extracted.title.clone(),
            author: extracted.author.clone(),
            needs_ocr: !needs_ocr_pages.is_empty(),
            needs_ocr_pages,
            chunks: chunks.len(),
            embedding_model: want_embed.then_some(embed::MODEL_NAME),
            embedding_dim: want_embed.then_some(embed::DIM),
            embed_stats,
            header_footer_lines_removed: cleaned.header_footer_lines_removed,
            summary,
            concepts,
            warnings: extracted.warnings.clone(),
            timings: Timings {
                read_ms,
                extract_ms,
                clean_ms,
                chunk_ms,
                embed_ms,
                summarize_ms,
                total_ms: ((read_ms + ms(total)) * 100.0).round() / 100.0,
            },
            artifacts: None,
            reused: false,
        };
        Ok(IngestOutput {
            result,
            pages: cleaned.pages,
            chunks,
            vectors,
        })
    }

    /// Reads `file_ref` (under the storage root) and ingests it.
    pub fn ingest(
        &self,
        ctx: &TaskContext<'_>,
        file_ref: &str,
        opts: &IngestOptions,
    ) -> Result<IngestOutput, TaskError> {
        let t = Instant::now();
        let bytes = self.read(file_ref, opts)?;
        self.ingest_bytes(ctx, file_ref, &bytes, opts, ms(t))
    }

    /// What the task runs: like [`Self::ingest`], plus artifacts. When an
    /// artifact store is configured and `<sha256>/result.json` exists, that
    /// result is returned (`reused: true`, fresh read timings, the other
    /// stages 0) without extracting or embedding. Otherwise the document
    /// is ingested and `pages.jsonl`, `chunks.jsonl` and then, last, as
    /// the completion marker, `result.json` are written. Options that
    /// change the output (chunk size/overlap, `embed: false`) bypass the
    /// store: artifacts are keyed by the bytes alone.
    pub fn ingest_or_reuse(
        &self,
        ctx: &TaskContext<'_>,
        file_ref: &str,
        opts: &IngestOptions,
    ) -> Result<serde_json::Value, TaskError> {
        let total = Instant::now();
        let store = match &self.artifacts {
            Some(Ok(store)) if default_output(opts) => Some(store),
            Some(Err(e)) => return Err(runtime(e.clone())),
            _ => None,
        };
        let bytes = self.read(file_ref, opts)?;
        let Some(store) = store else {
            let read_ms = ms(total);
            let out = self.ingest_bytes(ctx, file_ref, &bytes, opts, read_ms)?;
            return serde_json::to_value(out.result).map_err(|e| runtime(e.to_string()));
        };
        let sha256 = hex(&Sha256::digest(&bytes));
        if let Some(stored) = store.get_result(&sha256).map_err(runtime)? {
            let mut v: serde_json::Value = serde_json::from_slice(&stored).map_err(|e| {
                runtime(format!(
                    "[artifacts_read] {}: {e}",
                    store.urls(&sha256).result
                ))
            })?;
            if let Some(obj) = v.as_object_mut() {
                let read_ms = ms(total);
                if let Some(serde_json::Value::Object(t)) = obj.get_mut("timings") {
                    for x in t.values_mut() {
                        *x = json!(0.0);
                    }
                    t.insert("read_ms".into(), json!(read_ms));
                    t.insert("total_ms".into(), json!(read_ms));
                }
                obj.insert("file_ref".into(), json!(file_ref));
                obj.insert("reused".into(), json!(true));
                obj.insert("artifacts".into(), json!(store.urls(&sha256)));
            }
            return Ok(v);
        }
        let read_ms = ms(total);
        let mut out = self.ingest_bytes(ctx, file_ref, &bytes, opts, read_ms)?;
        ctx.checkpoint()?;
        let t = Instant::now();
        write_artifacts(store, &mut out).map_err(runtime)?;
        let write_ms = ms(t);
        out.result.timings.total_ms =
            ((out.result.timings.total_ms + write_ms) * 100.0).round() / 100.0;
        serde_json::to_value(out.result).map_err(|e| runtime(e.to_string()))
    }

    /// Reads `file_ref` (inside a storage root), within the size cap.
    fn read(&self, file_ref: &str, opts: &IngestOptions) -> Result<Vec<u8>, TaskError> {
        self.sources
            .read(file_ref, opts.max_bytes.unwrap_or(DEFAULT_MAX_BYTES))
    }
}

/// `TORI_PDF_BACKEND`, default pdfium; an unknown name stops the worker
/// from registering the task with the reason.
fn backend_from_env() -> Result<Backend, String> {
    match std::env::var("TORI_PDF_BACKEND") {
        Ok(v) if !v.trim().is_empty() => Backend::parse(&v).ok_or_else(|| {
            format!(
                "TORI_PDF_BACKEND={v} is not a backend (one of {})",
                Backend::NAMES
            )
        }),
        _ => Ok(Backend::Pdfium),
    }
}

/// True when `opts` produce the default output (what artifacts hold).
fn default_output(opts: &IngestOptions) -> bool {
    let d = ChunkSpec::default();
    opts.chunk_tokens.unwrap_or(d.size) == d.size
        && opts.chunk_overlap.unwrap_or(d.overlap) == d.overlap
        && opts.embed.unwrap_or(true)
        && opts.backend.is_none()
}

/// Writes `pages.jsonl`, `chunks.jsonl`, then `result.json` (last: its
/// presence marks a complete set) and records their URLs in the result.
fn write_artifacts(store: &ArtifactStore, out: &mut IngestOutput) -> Result<(), String> {
    let sha = out.result.sha256.clone();
    let mut pages = Vec::new();
    for (i, text) in out.pages.iter().enumerate() {
        serde_json::to_writer(&mut pages, &json!({"page": i + 1, "text": text}))
            .map_err(|e| e.to_string())?;
        pages.push(b'\n');
    }
    store.put(&sha, artifacts::PAGES, pages)?;
    let mut chunks = Vec::new();
    for (i, c) in out.chunks.iter().enumerate() {
        let embedding = out.vectors.get(i).map(Vec::as_slice).unwrap_or(&[]);
        let line = json!({
            "index": c.index,
            "page_start": c.page_start,
            "page_end": c.page_end,
            "text": c.text,
            "embedding": embedding,
        });
        serde_json::to_writer(&mut chunks, &line).map_err(|e| e.to_string())?;
        chunks.push(b'\n');
    }
    store.put(&sha, artifacts::CHUNKS, chunks)?;
    out.result.artifacts = Some(store.urls(&sha));
    let result = serde_json::to_vec(&out.result).map_err(|e| e.to_string())?;
    store.put(&sha, artifacts::RESULT, result)
}

impl Task for PdfIngestion {
    const NAME: &'static str = NAME;
    const PARAMS: &'static [&'static str] = &["file_ref", "options"];
    type Args = IngestArgs;
    type Output = serde_json::Value;

    fn options(&self) -> TaskOptions {
        TaskOptions {
            acks_late: Some(true),
            ..TaskOptions::default()
        }
    }

    fn run(&self, ctx: &TaskContext<'_>, args: IngestArgs) -> Result<Self::Output, TaskError> {
        let opts = args.options.unwrap_or_default();
        self.ingest_or_reuse(ctx, &args.file_ref, &opts)
    }
}

fn detect_language(pages: &[String]) -> Option<Language> {
    let mut sample = String::new();
    for p in pages {
        if sample.len() > 20_000 {
            break;
        }
        sample.push_str(p);
        sample.push('\n');
    }
    let info = whatlang::detect(&sample)?;
    Some(Language {
        code: info.lang().code(),
        confidence: (info.confidence() * 1000.0).round() / 1000.0,
        reliable: info.is_reliable(),
    })
}

/// The FAILURE for a document the extractor could not read.
pub fn extract_failure(e: ExtractError) -> TaskError {
    match e {
        ExtractError::Cancelled => TaskError::SoftTimeLimitExceeded,
        ExtractError::PasswordRequired => {
            exc("PermissionError", format!("[password_protected] {e}"))
        }
        ExtractError::UnsupportedSecurity(_) => {
            exc("PermissionError", format!("[unsupported_encryption] {e}"))
        }
        ExtractError::Malformed(_) => value_error(format!("[malformed_pdf] {e}")),
        ExtractError::TooManyPages { .. } => value_error(format!("[too_many_pages] {e}")),
        ExtractError::Unavailable(_) => runtime(format!("[backend_unavailable] {e}")),
        ExtractError::Backend(_) => runtime(format!("[backend_error] {e}")),
    }
}

pub(super) fn exc(name: &str, message: impl Into<String>) -> TaskError {
    TaskError::failed(PyException::builtin(name, message))
}
pub(super) fn value_error(message: impl Into<String>) -> TaskError {
    exc("ValueError", message)
}
pub(super) fn runtime(message: impl Into<String>) -> TaskError {
    exc("RuntimeError", message)
}

fn ms(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e5).round() / 100.0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
