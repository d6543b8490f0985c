//! Where the native run-time files are, whether they are there, and how
//! often this process loaded them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The directory `scripts/setup-native` fills, relative to the repository.
pub const DEFAULT_NATIVE_DIR: &str = ".tori/native";

/// Paths of the native files ingestion loads.
///
/// Each comes from its own environment variable when set (`TORI_PDFIUM_LIB`,
/// `TORI_ORT_LIB`, `TORI_MODEL_DIR`), else from `TORI_NATIVE_DIR`, else from
/// the first `.tori/native` found in the current directory or its parents,
/// the executable's directory or its parents, or this source tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeFiles {
    pub pdfium_lib: PathBuf,
    pub ort_lib: PathBuf,
    /// Holds `model.onnx`, `tokenizer.json` and `config.json`.
    pub model_dir: PathBuf,
}

impl NativeFiles {
    /// Resolves the paths from the environment (see the type's docs).
    pub fn from_env() -> Self {
        let dir = std::env::var_os("TORI_NATIVE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(find_native_dir);
        Self {
            pdfium_lib: env_path("TORI_PDFIUM_LIB").unwrap_or_else(|| dir.join("libpdfium.so")),
            ort_lib: env_path("TORI_ORT_LIB").unwrap_or_else(|| dir.join("libonnxruntime.so")),
            model_dir: env_path("TORI_MODEL_DIR").unwrap_or_else(|| dir.join("minilm")),
        }
    }

    /// All files under one directory laid out as `setup-native` does.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            pdfium_lib: dir.join("libpdfium.so"),
            ort_lib: dir.join("libonnxruntime.so"),
            model_dir: dir.join("minilm"),
        }
    }

    pub fn model_onnx(&self) -> PathBuf {
        self.model_dir.join("model.onnx")
    }

    /// The pre-optimized model whose weights processes share (optional:
    /// without it `model.onnx` is loaded privately).
    pub fn model_opt_onnx(&self) -> PathBuf {
        self.model_dir.join("model.opt.onnx")
    }

    /// The optimized model with pre-packed weights in its data file, made
    /// for this machine's CPU (optional; used only if [`Self::probe_json`]
    /// confirms it).
    pub fn model_packed_onnx(&self) -> PathBuf {
        self.model_dir.join("model.packed.onnx")
    }

    /// A reference embedding from the plain model, to check the packed one.
    pub fn probe_json(&self) -> PathBuf {
        self.model_dir.join("probe.json")
    }

    pub fn tokenizer_json(&self) -> PathBuf {
        self.model_dir.join("tokenizer.json")
    }

    /// The files that are not there, as paths.
    pub fn missing(&self) -> Vec<PathBuf> {
        [
            self.pdfium_lib.clone(),
            self.ort_lib.clone(),
            self.model_onnx(),
            self.tokenizer_json(),
        ]
        .into_iter()
        .filter(|p| !p.is_file())
        .collect()
    }

    /// `Ok` when every file is present; otherwise what is missing and how
    /// to get it.
    pub fn status(&self) -> Result<(), String> {
        let missing = self.missing();
        if missing.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
        Err(format!(
            "PDF ingestion (pdf_ingestion) is unavailable: missing {}. \
             Run scripts/setup-native from the repository root to place libpdfium, \
             ONNX Runtime and the all-MiniLM-L6-v2 model in {DEFAULT_NATIVE_DIR}/ \
             (or point TORI_NATIVE_DIR, or TORI_PDFIUM_LIB / TORI_ORT_LIB / TORI_MODEL_DIR, \
             at existing copies).",
            list.join(", ")
        ))
    }
}

/// Whether `pdf_ingestion` can be registered in this process: `Ok`, or what
/// is missing and how to get it ("run scripts/setup-native").
pub fn ingestion_status() -> Result<(), String> {
    NativeFiles::from_env().status()
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn find_native_dir() -> PathBuf {
    let mut starts: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        starts.push(exe_dir);
    }
    // This source tree (tasks/ → the workspace root), for tests and
    // `cargo run` from anywhere.
    starts.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for start in &starts {
        for dir in start.ancestors() {
            let candidate = dir.join(DEFAULT_NATIVE_DIR);
            if candidate.join("libpdfium.so").is_file() {
                return candidate;
            }
        }
    }
    // Nothing found: report the conventional place relative to the cwd.
    PathBuf::from(DEFAULT_NATIVE_DIR)
}

static PDFIUM_LOADS: AtomicUsize = AtomicUsize::new(0);
static ORT_LOADS: AtomicUsize = AtomicUsize::new(0);
static MODEL_LOADS: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn count_pdfium_load() {
    PDFIUM_LOADS.fetch_add(1, Ordering::SeqCst);
}
pub(crate) fn count_ort_load() {
    ORT_LOADS.fetch_add(1, Ordering::SeqCst);
}
pub(crate) fn count_model_load() {
    MODEL_LOADS.fetch_add(1, Ordering::SeqCst);
}

/// How many times this process loaded each native part (each should be
/// 0 or 1: they are loaded once per process and shared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LoadCounts {
    pub pdfium: usize,
    pub onnxruntime: usize,
    pub model_sessions: usize,
}

pub fn load_counts() -> LoadCounts {
    LoadCounts {
        pdfium: PDFIUM_LOADS.load(Ordering::SeqCst),
        onnxruntime: ORT_LOADS.load(Ordering::SeqCst),
        model_sessions: MODEL_LOADS.load(Ordering::SeqCst),
    }
}
