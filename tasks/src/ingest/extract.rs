//! Text extraction per page, behind one trait so backends can be compared
//! and swapped by measurement (issue #4: pdfium is the default).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use pdfium_render::prelude::*;

use super::native;

/// The text of one page, as the backend gives it (not cleaned yet).
#[derive(Debug, Clone, PartialEq)]
pub struct PageText {
    /// 1-based page number.
    pub number: usize,
    pub text: String,
}

/// What an extractor returns for a document it could open.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Extracted {
    /// The backend that produced the text (a fallback may stand in).
    pub backend: &'static str,
    /// Pages in order; `pages.len()` is the document's page count.
    pub pages: Vec<PageText>,
    pub title: Option<String>,
    pub author: Option<String>,
    /// Problems that did not stop extraction (a page that failed to load).
    pub warnings: Vec<String>,
}

impl Extracted {
    /// A result of `backend` with room for `pages` pages and nothing in it.
    fn empty(backend: &'static str, pages: usize) -> Self {
        Self {
            backend,
            pages: Vec::with_capacity(pages),
            ..Self::default()
        }
    }
}

/// Why a document yielded no text. Each variant is a specific, stable
/// reason that the task reports as its FAILURE.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExtractError {
    /// Encrypted with a user password that we do not have.
    #[error("the PDF is password-protected (a user password is required to open it)")]
    PasswordRequired,
    /// Encrypted with a security handler the backend does not support.
    #[error("the PDF uses an unsupported security handler: {0}")]
    UnsupportedSecurity(String),
    /// Not a PDF, or damaged beyond what the backend repairs.
    #[error("the PDF could not be parsed: {0}")]
    Malformed(String),
    #[error("the PDF has {pages} pages, more than the limit of {max}")]
    TooManyPages { pages: usize, max: usize },
    /// The caller asked to stop between pages.
    #[error("extraction was cancelled")]
    Cancelled,
    /// The backend's native library could not be loaded.
    #[error("the PDF backend is unavailable: {0}")]
    Unavailable(String),
    #[error("the PDF backend failed: {0}")]
    Backend(String),
}

/// Limits an extraction must respect.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExtractLimits {
    pub max_pages: usize,
}

impl Default for ExtractLimits {
    fn default() -> Self {
        Self { max_pages: 5000 }
    }
}

impl ExtractLimits {
    /// Refuses a document with more pages than allowed, before any page
    /// is read (every backend asks this first).
    fn check_pages(&self, pages: usize) -> Result<(), ExtractError> {
        if pages > self.max_pages {
            return Err(ExtractError::TooManyPages {
                pages,
                max: self.max_pages,
            });
        }
        Ok(())
    }
}

/// A PDF text extraction backend.
pub trait Extractor: Send + Sync {
    /// Short name for results and logs, e.g. `"pdfium"`.
    fn name(&self) -> &'static str;

    /// Extracts the text of every page. `on_page(done, total)` is called
    /// after each page; returning `false` stops with
    /// [`ExtractError::Cancelled`].
    fn extract(
        &self,
        bytes: &[u8],
        limits: &ExtractLimits,
        on_page: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Extracted, ExtractError>;
}

/// The pdfium backend: `libpdfium.so` (from the PyPI `pypdfium2` wheel),
/// bound dynamically once per process.
///
/// PDFium is not thread-safe, so one document is processed at a time per
/// process (a process-wide lock); scale with processes.
#[derive(Debug, Clone)]
pub struct PdfiumExtractor {
    library: PathBuf,
}

struct Loaded {
    pdfium: Pdfium,
    path: PathBuf,
}

static PDFIUM: OnceLock<Result<Mutex<Loaded>, String>> = OnceLock::new();

impl PdfiumExtractor {
    /// An extractor that binds `library` on first use. Only the first
    /// library bound in a process is used (pdfium binds once per process).
    pub fn new(library: impl Into<PathBuf>) -> Self {
        Self {
            library: library.into(),
        }
    }

    /// The library from `TORI_PDFIUM_LIB`, `TORI_NATIVE_DIR` or `.tori/native/`.
    pub fn from_env() -> Self {
        Self::new(native::NativeFiles::from_env().pdfium_lib)
    }

    /// Binds the library now if it is not bound yet.
    pub fn warm(&self) -> Result<(), ExtractError> {
        self.loaded().map(|_| ())
    }

    fn loaded(&self) -> Result<&'static Mutex<Loaded>, ExtractError> {
        PDFIUM
            .get_or_init(|| bind(&self.library).map(Mutex::new))
            .as_ref()
            .map_err(|e| ExtractError::Unavailable(e.clone()))
    }
}

fn bind(path: &Path) -> Result<Loaded, String> {
    if !path.is_file() {
        return Err(format!(
            "{} not found (run scripts/setup-native, or set TORI_PDFIUM_LIB)",
            path.display()
        ));
    }
    let bindings = Pdfium::bind_to_library(path)
        .map_err(|e| format!("could not load {}: {e}", path.display()))?;
    native::count_pdfium_load();
    Ok(Loaded {
        pdfium: Pdfium::new(bindings),
        path: path.to_path_buf(),
    })
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pdfium").field("path", &self.path).finish()
    }
}

fn map_open_error(e: PdfiumError) -> ExtractError {
    match e {
        PdfiumError::PdfiumLibraryInternalError(PdfiumInternalError::PasswordError) => {
            ExtractError::PasswordRequired
        }
        PdfiumError::PdfiumLibraryInternalError(PdfiumInternalError::SecurityError) => {
            ExtractError::UnsupportedSecurity("pdfium: unsupported security scheme".into())
        }
        PdfiumError::PdfiumLibraryInternalError(PdfiumInternalError::FormatError) => {
            ExtractError::Malformed("pdfium: not a PDF or damaged beyond repair".into())
        }
        PdfiumError::PdfiumLibraryInternalError(PdfiumInternalError::FileError) => {
            ExtractError::Malformed("pdfium: file not found or could not be read".into())
        }
        PdfiumError::PdfiumLibraryInternalError(PdfiumInternalError::PageError) => {
            ExtractError::Malformed("pdfium: page not found or content error".into())
        }
        other => ExtractError::Backend(format!("pdfium: {other:?}")),
    }
}

impl Extractor for PdfiumExtractor {
    fn name(&self) -> &'static str {
        "pdfium"
    }

    fn extract(
        &self,
        bytes: &[u8],
        limits: &ExtractLimits,
        on_page: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Extracted, ExtractError> {
        let lock = self.loaded()?;
        // A panic while holding the lock leaves pdfium usable for the next
        // document (it keeps no per-document global state we rely on).
        let loaded = lock.lock().unwrap_or_else(|p| p.into_inner());
        let doc = loaded
            .pdfium
            .load_pdf_from_byte_slice(bytes, None)
            .map_err(map_open_error)?;
        let pages = doc.pages();
        let total = pages.len() as usize;
        limits.check_pages(total)?;
        let meta = doc.metadata();
        let tag = |t: PdfDocumentMetadataTagType| {
            meta.get(t)
                .map(|v| v.value().trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut out = Extracted {
            title: tag(PdfDocumentMetadataTagType::Title),
            author: tag(PdfDocumentMetadataTagType::Author),
            ..Extracted::empty(self.name(), total)
        };
        collect_pages(&mut out, total, on_page, |index| {
            match pages.get(index as PdfPageIndex) {
                Ok(page) => page
                    .text()
                    .map(|t| t.all())
                    .map_err(|e| PageProblem::Skip(format!("no text layer ({e:?})"))),
                Err(e) => Err(PageProblem::Skip(format!("could not be loaded ({e:?})"))),
            }
        })?;
        Ok(out)
    }
}

/// Why one page yielded no text.
enum PageProblem {
    /// The page is kept, empty, with a warning (the rest may be fine).
    Skip(String),
    /// The document cannot be read at all.
    Stop(ExtractError),
}

/// Fills `out.pages` with `text_of(index)` for every page, in order,
/// reporting progress after each and stopping when asked.
fn collect_pages(
    out: &mut Extracted,
    total: usize,
    on_page: &mut dyn FnMut(usize, usize) -> bool,
    mut text_of: impl FnMut(usize) -> Result<String, PageProblem>,
) -> Result<(), ExtractError> {
    for index in 0..total {
        let number = index + 1;
        let text = match text_of(index) {
            Ok(t) => t,
            Err(PageProblem::Stop(e)) => return Err(e),
            Err(PageProblem::Skip(why)) => {
                out.warnings.push(format!("page {number}: {why}"));
                String::new()
            }
        };
        out.pages.push(PageText { number, text });
        if !on_page(number, total) {
            return Err(ExtractError::Cancelled);
        }
    }
    Ok(())
}

/// The pure-Rust pdf_oxide backend. Used as the fallback (see
/// [`WithFallback`]): on the dev set it opened files pdfium
/// refuses (R5/R6 encryption with an empty user password, some damaged
/// files) at the same text quality, but is 3x slower than pdfium.
#[derive(Debug, Clone, Copy, Default)]
pub struct OxideExtractor;

fn map_oxide_error(e: pdf_oxide::Error) -> ExtractError {
    use pdf_oxide::Error as E;
    match e {
        E::EncryptedPdf => ExtractError::PasswordRequired,
        E::Unsupported(m) | E::UnsupportedFilter(m) => {
            ExtractError::Malformed(format!("pdf_oxide: unsupported: {m}"))
        }
        other => ExtractError::Malformed(format!("pdf_oxide: {other}")),
    }
}

impl Extractor for OxideExtractor {
    fn name(&self) -> &'static str {
        "pdf_oxide"
    }

    fn extract(
        &self,
        bytes: &[u8],
        limits: &ExtractLimits,
        on_page: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Extracted, ExtractError> {
        let doc = pdf_oxide::PdfDocument::from_bytes(bytes.to_vec()).map_err(map_oxide_error)?;
        // `from_bytes` tries the empty user password itself; a document
        // that still needs one is refused by the first page read.
        let total = doc.page_count().map_err(map_oxide_error)?;
        limits.check_pages(total)?;
        let mut out = Extracted::empty(self.name(), total);
        collect_pages(&mut out, total, on_page, |index| {
            doc.extract_text(index).map_err(|e| match e {
                pdf_oxide::Error::EncryptedPdf => PageProblem::Stop(ExtractError::PasswordRequired),
                e => PageProblem::Skip(format!("could not be read ({e})")),
            })
        })?;
        Ok(out)
    }
}

/// A primary backend with a fallback tried only when the primary could
/// not open the document (never for limits, cancellation or an
/// unavailable library). The primary's error is the one reported when
/// both fail: it is the backend the deployment chose.
#[derive(Debug, Clone)]
pub struct WithFallback<P, F> {
    pub primary: P,
    pub fallback: F,
}

fn has_text(out: &Extracted) -> bool {
    out.pages.iter().any(|p| !p.text.trim().is_empty())
}

impl<P: Extractor, F: Extractor> WithFallback<P, F> {
    /// Runs the fallback: `Ok(Some)` when it read some text, `Ok(None)`
    /// when it failed, found nothing or panicked (a panic in the fallback
    /// must not turn the primary's clear outcome into a crash report);
    /// cancellation and the page limit pass through.
    fn run_fallback(
        &self,
        bytes: &[u8],
        limits: &ExtractLimits,
        on_page: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Option<Extracted>, ExtractError> {
        let second = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.fallback.extract(bytes, limits, on_page)
        }));
        match second {
            Ok(Ok(out)) if has_text(&out) => Ok(Some(out)),
            Ok(Err(e @ (ExtractError::Cancelled | ExtractError::TooManyPages { .. }))) => Err(e),
            _ => Ok(None),
        }
    }

    /// `out`, from the fallback, with the reason it was used first.
    fn explained(&self, mut out: Extracted, why: &str) -> Extracted {
        out.warnings.insert(
            0,
            format!(
                "{} {why}; text extracted with {}",
                self.primary.name(),
                self.fallback.name()
            ),
        );
        out
    }

    fn worth_falling_back(e: &ExtractError) -> bool {
        matches!(
            e,
            ExtractError::PasswordRequired
                | ExtractError::UnsupportedSecurity(_)
                | ExtractError::Malformed(_)
                | ExtractError::Backend(_)
        )
    }
}

impl<P: Extractor, F: Extractor> Extractor for WithFallback<P, F> {
    fn name(&self) -> &'static str {
        self.primary.name()
    }

    fn extract(
        &self,
        bytes: &[u8],
        limits: &ExtractLimits,
        on_page: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Extracted, ExtractError> {
        let first = match self.primary.extract(bytes, limits, on_page) {
            Err(e) if Self::worth_falling_back(&e) => e,
            // Opened, but not one character on any page: before calling it
            // a scan, see whether the other parser finds a text layer
            // (pdfium skips text in some malformed content streams). Its
            // pages are used only when it sees the same page count.
            Ok(empty) if !empty.pages.is_empty() && !has_text(&empty) => {
                return Ok(match self.run_fallback(bytes, limits, &mut |_, _| true) {
                    Ok(Some(mut out)) if out.pages.len() == empty.pages.len() => {
                        out.title = empty.title;
                        out.author = empty.author;
                        self.explained(out, "found no text on any page")
                    }
                    _ => empty,
                });
            }
            done => return done,
        };
        match self.run_fallback(bytes, limits, on_page)? {
            Some(out) => Ok(self.explained(out, &format!("could not open the document ({first})"))),
            // An empty "success" from the fallback would hide the
            // primary's specific reason.
            None => Err(first),
        }
    }
}

/// The pdf-extract backend (pure Rust, on lopdf). Available only when
/// asked for by name: it was the least accurate and least robust backend
/// measured (panics on ~3 % of files, 1 GiB on one, empty "successes" for
/// files needing a password), so it never stands in for another. Panics
/// are caught and reported as a malformed document.
#[derive(Debug, Clone, Copy, Default)]
pub struct PdfExtractExtractor;

impl Extractor for PdfExtractExtractor {
    fn name(&self) -> &'static str {
        "pdf-extract"
    }

    fn extract(
        &self,
        bytes: &[u8],
        limits: &ExtractLimits,
        on_page: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Extracted, ExtractError> {
        let pages = std::panic::catch_unwind(|| pdf_extract::extract_text_from_mem_by_pages(bytes))
            .map_err(|p| {
                let why = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panic".into());
                ExtractError::Malformed(format!("pdf-extract panicked: {why}"))
            })?
            .map_err(|e| ExtractError::Malformed(format!("pdf-extract: {e}")))?;
        let total = pages.len();
        limits.check_pages(total)?;
        let mut out = Extracted::empty(self.name(), total);
        let mut pages = pages.into_iter();
        collect_pages(&mut out, total, on_page, |_| {
            Ok(pages.next().unwrap_or_default())
        })?;
        Ok(out)
    }
}

/// The backends a deployment or a call can choose (`TORI_PDF_BACKEND`,
/// or the task option `backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
pub enum Backend {
    /// pdfium, with pdf_oxide where pdfium cannot open a file or finds no
    /// text (the default, decided by measurement: issue #4).
    #[default]
    #[serde(rename = "pdfium")]
    Pdfium,
    #[serde(rename = "pdf_oxide")]
    PdfOxide,
    #[serde(rename = "pdf-extract")]
    PdfExtract,
}

impl Backend {
    pub const NAMES: &'static str = "pdfium, pdf_oxide, pdf-extract";

    pub fn parse(name: &str) -> Option<Self> {
        match name.trim() {
            "pdfium" => Some(Self::Pdfium),
            "pdf_oxide" | "pdf-oxide" => Some(Self::PdfOxide),
            "pdf-extract" | "pdf_extract" => Some(Self::PdfExtract),
            _ => None,
        }
    }
}
