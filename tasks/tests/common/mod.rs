//! Helpers shared by the ingestion tests: finding the native files and the
//! corpus (skipping loudly when absent), a task context, token F1.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use tasks::ingest::NativeFiles;
use tasks::{CancelFlag, NoProgress, TaskContext};
use unicode_normalization::UnicodeNormalization;

/// The workspace root (tasks/..).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tasks/ has a parent")
        .to_path_buf()
}

/// Writes to the real stderr, past the test harness's capture, so a
/// skip is seen even when the test passes.
/// With `TORI_REQUIRE_NATIVE=1` (set by `scripts/test`, which installs
/// everything first) a skip is a failure: CI must never pass by skipping.
fn loud(message: &str) {
    if std::env::var("TORI_REQUIRE_NATIVE").is_ok_and(|v| v == "1") {
        panic!("required test input missing (TORI_REQUIRE_NATIVE=1): {message}");
    }
    let _ = std::io::stderr().write_all(message.as_bytes());
}

/// The native files, or `None` after printing a loud SKIPPED banner.
pub fn native_or_skip(test: &str) -> Option<NativeFiles> {
    let files = NativeFiles::from_env();
    match files.status() {
        Ok(()) => Some(files),
        Err(why) => {
            loud(&format!(
                "\n\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                 !! SKIPPED {test}: native files missing.\n!! {why}\n\
                 !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
            ));
            None
        }
    }
}

/// `shared/corpus` (TORI_CORPUS_DIR, else ../shared/corpus beside the
/// repository), or `None` after a loud SKIPPED banner.
pub fn corpus_or_skip(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("TORI_CORPUS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/corpus"));
    if dir.join("MANIFEST.tsv").is_file() {
        Some(dir)
    } else {
        loud(&format!(
            "\n\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !! SKIPPED {test}: no PDF corpus at {} (set TORI_CORPUS_DIR)\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n",
            dir.display()
        ));
        None
    }
}

/// Runs `f` with a task context that never cancels.
pub fn with_ctx<R>(f: impl FnOnce(&TaskContext<'_>) -> R) -> R {
    let cancel = CancelFlag::new();
    let ctx = TaskContext {
        id: "test",
        name: "pdf_ingestion",
        retries: 0,
        cancel: &cancel,
        progress: &NoProgress,
    };
    f(&ctx)
}

/// Normalized word tokens: NFKC, lowercase, runs of alphanumerics.
pub fn tokens(text: &str) -> Vec<String> {
    let norm: String = text.nfkc().collect::<String>().to_lowercase();
    norm.split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Multiset token F1 of `got` against `want`. Both empty = 1.0.
pub fn token_f1(got: &str, want: &str) -> f64 {
    let (g, w) = (tokens(got), tokens(want));
    if g.is_empty() && w.is_empty() {
        return 1.0;
    }
    if g.is_empty() || w.is_empty() {
        return 0.0;
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &w {
        *counts.entry(t).or_default() += 1;
    }
    let mut common = 0i64;
    for t in &g {
        if let Some(c) = counts.get_mut(t.as_str()) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    let p = common as f64 / g.len() as f64;
    let r = common as f64 / w.len() as f64;
    if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    }
}

/// One row of MANIFEST.tsv.
#[derive(Debug, Clone)]
pub struct Entry {
    pub file: String, // e.g. pdf/NAME.pdf
    pub pages: usize,
    pub category: String,
    /// `qpdf --check` exit code (0: qpdf opens it, without a password).
    pub qpdf_check_rc: Option<i32>,
}

pub fn manifest(corpus: &std::path::Path) -> Vec<Entry> {
    let text = std::fs::read_to_string(corpus.join("MANIFEST.tsv")).expect("MANIFEST.tsv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split('\t').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (f, p, c, q) = (
        col("file"),
        col("pages"),
        col("category"),
        col("qpdf_check_rc"),
    );
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let cells: Vec<&str> = l.split('\t').collect();
            Entry {
                file: cells[f].to_owned(),
                pages: cells[p].parse().unwrap_or(0),
                category: cells[c].to_owned(),
                qpdf_check_rc: cells.get(q).and_then(|v| v.trim().parse().ok()),
            }
        })
        .collect()
}

/// A minimal PDF with one line of text per page (pdfium rebuilds the
/// missing cross-reference table).
pub fn tiny_pdf(pages: &[&str]) -> Vec<u8> {
    let n = pages.len();
    let mut objs: Vec<String> = Vec::new();
    let kids: Vec<String> = (0..n).map(|i| format!("{} 0 R", 4 + 2 * i)).collect();
    objs.push("<< /Type /Catalog /Pages 2 0 R >>".into());
    objs.push(format!(
        "<< /Type /Pages /Kids [{}] /Count {n} >>",
        kids.join(" ")
    ));
    objs.push("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".into());
    for (i, text) in pages.iter().enumerate() {
        let content = format!("BT /F1 12 Tf 72 720 Td ({text}) Tj ET");
        objs.push(format!(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] \
             /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
            5 + 2 * i
        ));
        objs.push(format!(
            "<< /Length {} >>\nstream\n{content}\nendstream",
            content.len()
        ));
    }
    let mut out = String::from("%PDF-1.4\n");
    let mut offsets = Vec::new();
    for (i, o) in objs.iter().enumerate() {
        offsets.push(out.len());
        out.push_str(&format!("{} 0 obj\n{o}\nendobj\n", i + 1));
    }
    let xref = out.len();
    out.push_str(&format!(
        "xref\n0 {}\n0000000000 65535 f \n",
        objs.len() + 1
    ));
    for off in offsets {
        out.push_str(&format!("{off:010} 00000 n \n"));
    }
    out.push_str(&format!(
        "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
        objs.len() + 1
    ));
    out.into_bytes()
}
