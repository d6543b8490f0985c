//! Micro-benchmarks of the PDF ingestion stages (issue #7), through the
//! `tasks` crate's public API: per-page extraction (pdfium), cleaning,
//! chunk+tokenize (254/32 token windows), embedding batches of 1, 8 and 32
//! full-length chunks (all-MiniLM-L6-v2 on ONNX Runtime, one intra-op
//! thread, as the worker runs it).
//!
//!     cargo bench --bench ingest              # full run
//!     cargo bench --bench ingest -- --quick   # fast check
//!
//! Needs the native files (`scripts/setup-native` → `.tori/native`) and a
//! PDF: `TORI_BENCH_PDF`, else a born-digital file of the shared corpus.
//! Without them it prints why and exits successfully.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use tasks::ingest::chunk::{chunk_pages, ChunkSpec};
use tasks::ingest::clean::clean_pages;
use tasks::ingest::embed::Embedder;
use tasks::ingest::extract::ExtractLimits;
use tasks::ingest::{Extractor, NativeFiles, PdfiumExtractor};

const DEFAULT_PDFS: &[&str] = &[
    "/work/shared/corpus/pdf/deb-asymptote-doc__asy-latex.pdf",
    "/work/main/.tori/storage/sample.pdf",
];

fn pick_pdf() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TORI_BENCH_PDF") {
        return Some(PathBuf::from(p));
    }
    DEFAULT_PDFS.iter().map(PathBuf::from).find(|p| p.is_file())
}

fn main() {
    let files = NativeFiles::from_env();
    if let Err(e) = files.status() {
        println!("ingest benches skipped: native files missing ({e}); run scripts/setup-native");
        return;
    }
    let Some(pdf) = pick_pdf() else {
        println!("ingest benches skipped: no PDF (set TORI_BENCH_PDF)");
        return;
    };
    let bytes = std::fs::read(&pdf).expect("readable PDF");
    let extractor = PdfiumExtractor::new(files.pdfium_lib.clone());
    let limits = ExtractLimits::default();
    let extracted = extractor
        .extract(&bytes, &limits, &mut |_, _| true)
        .expect("PDF extracts");
    let pages = extracted.pages.len();
    let raw: Vec<String> = extracted.pages.iter().map(|p| p.text.clone()).collect();
    let cleaned = clean_pages(&raw).pages;
    let text_bytes: usize = cleaned.iter().map(String::len).sum();
    let embedder = Embedder::global(&files).expect("embedder loads");
    let chunks = chunk_pages(embedder.tokenizer(), &cleaned, ChunkSpec::default()).expect("chunks");
    println!(
        "ingest benches on {} ({} pages, {} bytes of clean text, {} chunks)",
        pdf.display(),
        pages,
        text_bytes,
        chunks.len()
    );

    // 32 distinct full-length (254 + 2 token) sequences: windows over the
    // document's token stream at different offsets.
    let stream: Vec<u32> = chunks.iter().flat_map(|c| c.ids.iter().copied()).collect();
    let seqs: Vec<Vec<u32>> = (0..32)
        .map(|k| {
            (0..254)
                .map(|i| stream[(k * 97 + i) % stream.len().max(1)])
                .collect()
        })
        .collect();

    let mut c = Criterion::default().configure_from_args();

    let mut g = c.benchmark_group("extract");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(pages as u64));
    g.bench_function(
        format!("pdfium/{pages}_pages (per page = time/{pages})"),
        |b| {
            b.iter(|| {
                extractor
                    .extract(black_box(&bytes), &limits, &mut |_, _| true)
                    .unwrap()
            })
        },
    );
    g.finish();

    let mut g = c.benchmark_group("clean");
    g.sample_size(20);
    g.throughput(Throughput::Elements(pages as u64));
    g.bench_function(format!("clean_pages/{pages}_pages"), |b| {
        b.iter(|| clean_pages(black_box(&raw)))
    });
    g.finish();

    let mut g = c.benchmark_group("chunk_tokenize");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(text_bytes as u64));
    g.bench_function(format!("chunk_pages_254_32/{pages}_pages"), |b| {
        b.iter(|| {
            chunk_pages(
                embedder.tokenizer(),
                black_box(&cleaned),
                ChunkSpec::default(),
            )
            .unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("embed");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for n in [1usize, 8, 32] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("batch_{n}x256_tokens"), |b| {
            b.iter(|| {
                embedder
                    .embed_ids(black_box(&seqs[..n]), &mut || true)
                    .unwrap()
            })
        });
    }
    g.finish();

    c.final_summary();
}
