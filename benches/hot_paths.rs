//! Micro-benchmarks of the per-message hot paths (issue #7):
//! envelope decode, task message decode, result encode.
//!
//!     cargo bench --bench hot_paths              # full run
//!     cargo bench --bench hot_paths -- --quick   # fast check
//!
//! Inputs are the byte-exact Celery 5.7 captures in `tests/vectors/broker/`
//! plus a `tori.noop` message built from the `add.delay(2, 3)` capture the
//! same way `benches/compare.py` builds the messages it pre-loads.

use std::hint::black_box;
use std::path::PathBuf;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::json;
use tori_worker::protocol::{Envelope, State, StateDoc, TaskMessage};

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/broker")
}

/// Every `.raw` capture that is a kombu envelope of a task message.
fn task_vectors() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(vectors_dir()) else {
        return out;
    };
    let mut paths: Vec<PathBuf> = dir
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "raw"))
        .collect();
    paths.sort();
    for p in paths {
        let bytes = std::fs::read(&p).expect("readable vector");
        let ok = Envelope::parse(&bytes)
            .ok()
            .is_some_and(|e| TaskMessage::decode(&e).is_ok());
        if ok {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            out.push((name, bytes));
        }
    }
    out
}

/// `tori.noop()` with fresh ids, built from the captured `add.delay(2, 3)`
/// envelope (same key order and formatting as kombu writes).
fn noop_envelope() -> Vec<u8> {
    let raw = std::fs::read_to_string(vectors_dir().join("task_delay_add_2_3.raw"))
        .expect("tests/vectors/broker/task_delay_add_2_3.raw");
    let body = base64_std(
        br#"[[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#,
    );
    raw.replace("capapp.add", "tori.noop")
        .replace("154dc395-95cd-4e2e-86e4-d404a40cb9bc", "0b6f1a43-6f3c-4c8e-9a55-2f0b0f4b2a11")
        .replace("c266b3d1-822f-441d-880c-88f4a4e8147d", "5d1d3c2e-98a0-4f4e-8d4f-5a3b8f6f2e90")
        .replace("\"(2, 3)\"", "\"()\"")
        .replace(
            "W1syLCAzXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d",
            &body,
        )
        .into_bytes()
}

fn base64_std(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn decode(c: &mut Criterion) {
    let vectors = task_vectors();
    if vectors.is_empty() {
        println!(
            "hot_paths: no task vectors under {}; skipping decode benches",
            vectors_dir().display()
        );
        return;
    }
    let noop = noop_envelope();
    let noop_msg = TaskMessage::decode(&Envelope::parse(&noop).expect("noop envelope"))
        .expect("noop task message");
    assert_eq!(noop_msg.task, "tori.noop");

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("envelope/tori.noop", |b| {
        b.iter(|| Envelope::parse(black_box(&noop)).unwrap())
    });
    g.bench_function("envelope+task/tori.noop", |b| {
        b.iter(|| {
            let env = Envelope::parse(black_box(&noop)).unwrap();
            TaskMessage::decode(&env).unwrap()
        })
    });
    let env = Envelope::parse(&noop).unwrap();
    g.bench_function("task_only/tori.noop", |b| {
        b.iter(|| TaskMessage::decode(black_box(&env)).unwrap())
    });
    for wanted in [
        "task_delay_add_2_3",
        "task_protocol1",
        "task_link_and_link_error",
    ] {
        if let Some((name, bytes)) = vectors.iter().find(|(n, _)| n == wanted) {
            g.bench_function(format!("envelope+task/{name}"), |b| {
                b.iter(|| {
                    let env = Envelope::parse(black_box(bytes)).unwrap();
                    TaskMessage::decode(&env).unwrap()
                })
            });
        }
    }
    g.throughput(Throughput::Elements(vectors.len() as u64));
    g.bench_function(
        format!("envelope+task/all_{}_vectors", vectors.len()),
        |b| {
            b.iter(|| {
                for (_, bytes) in &vectors {
                    let env = Envelope::parse(black_box(bytes)).unwrap();
                    black_box(TaskMessage::decode(&env).unwrap());
                }
            })
        },
    );
    g.finish();
}

fn encode(c: &mut Criterion) {
    let id = "0b6f1a43-6f3c-4c8e-9a55-2f0b0f4b2a11";
    let now = Utc::now();
    let mut g = c.benchmark_group("result_encode");
    g.throughput(Throughput::Elements(1));
    let noop = StateDoc::new(id, State::Success, serde_json::Value::Null);
    g.bench_function("success/null", |b| b.iter(|| black_box(&noop).to_json(now)));
    let echo = StateDoc::new(
        id,
        State::Success,
        json!({"args": [1, "a"], "kwargs": {"k": [1, 2]}}),
    );
    g.bench_function("success/echo", |b| b.iter(|| black_box(&echo).to_json(now)));
    let ingest = StateDoc::new(
        id,
        State::Success,
        json!({
            "sha256": "54fd184aab3475f6ab89a7c35671e59bb14986772587f0ff380eb6d4034aa359",
            "file_ref": "pdf/deb-asymptote-doc__TeXShopAndAsymptote.pdf", "bytes": 80883,
            "backend": "pdfium", "pages": 2, "chars": 4211,
            "language": {"code": "eng", "confidence": 1.0, "reliable": true},
            "title": "TeXShop and Asymptote", "author": null, "needs_ocr": false,
            "needs_ocr_pages": [], "chunks": 5, "embedding_model": "all-MiniLM-L6-v2",
            "embedding_dim": 384,
            "embed_stats": {"sequences": 5, "unique": 5, "batches": 1, "padded_tokens": 1280, "tokens": 1180},
            "header_footer_lines_removed": 0, "warnings": [],
            "timings": {"read_ms": 0.1, "extract_ms": 3.2, "clean_ms": 0.4, "chunk_ms": 1.9, "embed_ms": 80.5, "total_ms": 86.1}
        }),
    );
    g.bench_function("success/ingest_summary", |b| {
        b.iter(|| black_box(&ingest).to_json(now))
    });
    let mut failure = StateDoc::new(
        id,
        State::Failure,
        tori_worker::protocol::result::exception_value(
            "builtins",
            "RuntimeError",
            &[json!("boom")],
        ),
    );
    failure.traceback =
        Some("Traceback (most recent call last):\n  ...\nRuntimeError: boom\n".into());
    g.bench_function("failure/runtime_error", |b| {
        b.iter(|| black_box(&failure).to_json(now))
    });
    g.bench_function("build+encode/success_null", |b| {
        b.iter_batched(
            || (),
            |()| StateDoc::new(black_box(id), State::Success, serde_json::Value::Null).to_json(now),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
