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
    /// Pages in order; `pages.len()` is the document's page count.
    pub pages: Vec<PageText>,
    pub title: Option<String>,
    pub author: Option<String>,
    /// Problems that did not stop extraction (a page that failed to load).
    pub warnings: Vec<String>,
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
        if total > limits.max_pages {
            return Err(ExtractError::TooManyPages {
                pages: total,
                max: limits.max_pages,
            });
        }
        let meta = doc.metadata();
        let tag = |t: PdfDocumentMetadataTagType| {
            meta.get(t)
                .map(|v| v.value().trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut out = Extracted {
            pages: Vec::with_capacity(total),
            title: tag(PdfDocumentMetadataTagType::Title),
            author: tag(PdfDocumentMetadataTagType::Author),
            warnings: Vec::new(),
        };
        for index in 0..total {
            let number = index + 1;
            let text = match pages.get(index as PdfPageIndex) {
                Ok(page) => match page.text() {
                    Ok(t) => t.all(),
                    Err(e) => {
                        out.warnings
                            .push(format!("page {number}: no text layer ({e:?})"));
                        String::new()
                    }
                },
                Err(e) => {
                    out.warnings
                        .push(format!("page {number}: could not be loaded ({e:?})"));
                    String::new()
                }
            };
            out.pages.push(PageText { number, text });
            if !on_page(number, total) {
                return Err(ExtractError::Cancelled);
            }
        }
        Ok(out)
    }
}
