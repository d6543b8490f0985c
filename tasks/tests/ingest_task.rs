//! The `pdf_ingestion` task through the registry, as the worker calls it:
//! registration, argument binding, the storage root, progress, cancellation
//! and specific failures. Needs `scripts/setup-native` (skips loudly).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{json, Value};
use tasks::ingest::{NativeFiles, PdfIngestion};
use tasks::{CancelFlag, DynTask, ProgressSink, TaskContext, TaskError};

/// A fresh storage root with `docs/hello.pdf`, `docs/blank.pdf` and
/// `notpdf.pdf`, plus a file outside it and a symlink pointing there.
fn storage() -> (PathBuf, PathBuf) {
    let base = std::env::temp_dir().join(format!("tori-ingest-test-{}", std::process::id()));
    let root = base.join("root");
    std::fs::create_dir_all(root.join("docs")).unwrap();
    let words = "The ingestion task turns the documents of the company into clean text, \
                 and then it computes embeddings for every chunk of that text";
    std::fs::write(
        root.join("docs/hello.pdf"),
        common::tiny_pdf(&[words, "A second page about vectors and chunks", ""]),
    )
    .unwrap();
    std::fs::write(root.join("docs/blank.pdf"), common::tiny_pdf(&["", ""])).unwrap();
    std::fs::write(root.join("notpdf.pdf"), b"this is not a PDF at all").unwrap();
    std::fs::write(base.join("secret.pdf"), common::tiny_pdf(&["secret"])).unwrap();
    let link = root.join("docs/link.pdf");
    let _ = std::fs::remove_file(&link);
    #[cfg(unix)]
    std::os::unix::fs::symlink(base.join("secret.pdf"), &link).unwrap();
    (root, base)
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Value>>);
impl ProgressSink for Recorder {
    fn progress(&self, meta: Value) {
        self.0.lock().unwrap().push(meta);
    }
}

fn call(
    task: &dyn DynTask,
    cancel: &CancelFlag,
    progress: &dyn ProgressSink,
    args: Value,
    kwargs: Value,
) -> Result<Value, TaskError> {
    let ctx = TaskContext {
        id: "t1",
        name: task.name(),
        retries: 0,
        cancel,
        progress,
    };
    let (Value::Array(a), Value::Object(k)) = (args, kwargs) else {
        panic!("bad test input")
    };
    task.call(&ctx, a, k)
}

fn failure(r: Result<Value, TaskError>) -> (String, String) {
    match r {
        Err(TaskError::Failed { exception, .. }) => (exception.name.clone(), exception.message()),
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn task(root: &Path, files: NativeFiles) -> PdfIngestion {
    PdfIngestion::new(root, files).expect("task")
}

#[test]
fn registered_with_alias_and_acks_late_when_native_files_exist() {
    let Some(_) = common::native_or_skip("registry test") else {
        return;
    };
    assert_eq!(tasks::ingestion_status(), Ok(()));
    let registry = tasks::default_registry();
    let t = registry.get("pdf_ingestion").expect("registered");
    assert!(registry.get("ingest_pdf_clean_task").is_some(), "alias");
    assert_eq!(t.options().acks_late, Some(true));
    let info = registry.describe();
    let info = info.iter().find(|i| i.name == "pdf_ingestion").unwrap();
    assert_eq!(info.aliases, vec!["ingest_pdf_clean_task".to_owned()]);
    assert_eq!(
        info.params,
        vec!["file_ref".to_owned(), "options".to_owned()]
    );
}

#[test]
fn missing_native_files_say_how_to_get_them() {
    let files = NativeFiles::in_dir(Path::new("/nonexistent/native"));
    let err = files.status().unwrap_err();
    assert!(err.contains("scripts/setup-native"), "{err}");
    assert!(err.contains("/nonexistent/native/libpdfium.so"), "{err}");
    assert!(PdfIngestion::new(Path::new("/tmp"), files).is_err());
}

#[test]
fn ingests_a_small_pdf_with_progress_and_needs_ocr_pages() {
    let Some(files) = common::native_or_skip("task test") else {
        return;
    };
    let (root, _) = storage();
    let t = task(&root, files);
    let rec = Recorder::default();
    let out = call(
        &t,
        &CancelFlag::new(),
        &rec,
        json!(["docs/hello.pdf"]),
        json!({}),
    )
    .unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&out).unwrap());
    assert_eq!(out["pages"], 3);
    assert_eq!(out["needs_ocr"], true);
    assert_eq!(out["needs_ocr_pages"], json!([3]));
    assert_eq!(out["chunks"], 1);
    assert_eq!(out["embedding_dim"], 384);
    assert_eq!(out["sha256"].as_str().unwrap().len(), 64);
    assert!(out["chars"].as_u64().unwrap() > 50);
    assert_eq!(out["language"]["code"], "eng");
    for k in [
        "read_ms",
        "extract_ms",
        "clean_ms",
        "chunk_ms",
        "embed_ms",
        "total_ms",
    ] {
        assert!(out["timings"][k].is_number(), "timing {k}");
    }
    let progress = rec.0.lock().unwrap().clone();
    assert!(
        progress.contains(&json!({"stage": "extract", "page": 3, "pages": 3})),
        "{progress:?}"
    );

    // alias, keyword arguments and options
    let registry_like = call(
        &t,
        &CancelFlag::new(),
        &tasks::NoProgress,
        json!([]),
        json!({"file_ref": "file://".to_owned() + root.join("docs/hello.pdf").to_str().unwrap(),
               "options": {"embed": false, "chunk_tokens": 8, "chunk_overlap": 2}}),
    )
    .unwrap();
    assert!(registry_like["chunks"].as_u64().unwrap() > 2);
    assert_eq!(registry_like["embedding_dim"], Value::Null);

    let blank = call(
        &t,
        &CancelFlag::new(),
        &tasks::NoProgress,
        json!(["docs/blank.pdf"]),
        json!({}),
    )
    .unwrap();
    assert_eq!(blank["needs_ocr_pages"], json!([1, 2]));
    assert_eq!(blank["chunks"], 0);
}

#[test]
fn refuses_anything_outside_the_storage_root() {
    let Some(files) = common::native_or_skip("storage root test") else {
        return;
    };
    let (root, base) = storage();
    let t = task(&root, files);
    let none = &tasks::NoProgress;
    let c = CancelFlag::new();
    for bad in [
        "../secret.pdf".to_owned(),
        "docs/../../secret.pdf".to_owned(),
        base.join("secret.pdf").display().to_string(),
        format!("file://{}", base.join("secret.pdf").display()),
        "docs/link.pdf".to_owned(),
    ] {
        let (name, msg) = failure(call(&t, &c, none, json!([bad]), json!({})));
        assert_eq!(name, "PermissionError", "{bad}: {msg}");
        assert!(msg.starts_with("[outside_storage_root]"), "{bad}: {msg}");
    }
    let (name, msg) = failure(call(
        &t,
        &c,
        none,
        json!(["s3://bucket/key.pdf"]),
        json!({}),
    ));
    assert_eq!(name, "PermissionError", "no TORI_STORAGE_URL: {msg}");
    assert!(msg.starts_with("[outside_storage_root]"), "{msg}");
    let (name, msg) = failure(call(
        &t,
        &c,
        none,
        json!(["https://example.com/key.pdf"]),
        json!({}),
    ));
    assert_eq!(name, "ValueError");
    assert!(msg.starts_with("[unsupported_scheme]"), "{msg}");
    let (name, msg) = failure(call(&t, &c, none, json!(["docs/missing.pdf"]), json!({})));
    assert_eq!(name, "FileNotFoundError");
    assert!(msg.starts_with("[not_found]"), "{msg}");
    let (name, msg) = failure(call(&t, &c, none, json!(["notpdf.pdf"]), json!({})));
    assert_eq!(name, "ValueError");
    assert!(msg.starts_with("[malformed_pdf]"), "{msg}");
    let (_, msg) = failure(call(
        &t,
        &c,
        none,
        json!(["docs/hello.pdf", {"max_bytes": 10}]),
        json!({}),
    ));
    assert!(msg.starts_with("[too_large]"), "{msg}");
    let (_, msg) = failure(call(
        &t,
        &c,
        none,
        json!(["docs/hello.pdf", {"max_pages": 2}]),
        json!({}),
    ));
    assert!(msg.starts_with("[too_many_pages]"), "{msg}");
    let (name, _) = failure(call(
        &t,
        &c,
        none,
        json!(["docs/hello.pdf", {"bogus": 1}]),
        json!({}),
    ));
    assert_eq!(name, "TypeError");
}

#[test]
fn cancellation_stops_between_pages() {
    let Some(files) = common::native_or_skip("cancellation test") else {
        return;
    };
    let (root, _) = storage();
    let t = task(&root, files);
    let cancel = CancelFlag::new();
    cancel.cancel();
    let out = call(
        &t,
        &cancel,
        &tasks::NoProgress,
        json!(["docs/hello.pdf"]),
        json!({}),
    );
    assert_eq!(out, Err(TaskError::SoftTimeLimitExceeded));
}

#[test]
fn password_protected_corpus_file_is_a_specific_failure() {
    let Some(files) = common::native_or_skip("password test") else {
        return;
    };
    let Some(corpus) = common::corpus_or_skip("password test") else {
        return;
    };
    let entry = common::manifest(&corpus)
        .into_iter()
        .find(|e| e.category == "encrypted-pw")
        .expect("an encrypted-pw file");
    let t = task(&corpus, files);
    let (name, msg) = failure(call(
        &t,
        &CancelFlag::new(),
        &tasks::NoProgress,
        json!([entry.file]),
        json!({}),
    ));
    assert_eq!(name, "PermissionError");
    assert!(msg.starts_with("[password_protected]"), "{msg}");
}

/// A valid one-page PDF plus one stream of deflated spaces that inflates
/// to `inflated` bytes: a decompression bomb the guard must refuse before
/// any backend decodes it.
fn bomb_pdf(inflated: usize) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&vec![b' '; inflated]).unwrap();
    let bomb = z.finish().unwrap();
    let mut pdf = common::tiny_pdf(&["A page whose sibling object is a decompression bomb"]);
    let mut obj = format!(
        "99 0 obj\n<< /Length {} /Filter /FlateDecode >>\nstream\n",
        bomb.len()
    )
    .into_bytes();
    obj.extend_from_slice(&bomb);
    obj.extend_from_slice(b"\nendstream\nendobj\n");
    // Before the trailer, so the file still parses.
    let at = pdf.len() - 6; // "%%EOF\n"
    pdf.splice(at..at, obj);
    pdf
}

#[test]
fn a_decompression_bomb_is_refused_with_its_size() {
    let Some(files) = common::native_or_skip("decompression guard test") else {
        return;
    };
    let (root, _) = storage();
    std::fs::write(root.join("bomb.pdf"), bomb_pdf(24 << 20)).unwrap();
    let t = task(&root, files);
    let c = CancelFlag::new();
    let none = &tasks::NoProgress;
    let started = std::time::Instant::now();
    let (name, msg) = failure(call(
        &t,
        &c,
        none,
        json!(["bomb.pdf", {"max_stream_bytes": 8 << 20}]),
        json!({}),
    ));
    assert_eq!(name, "ValueError", "{msg}");
    assert!(msg.starts_with("[decompression_bomb]"), "{msg}");
    assert!(msg.contains("8388608"), "names the cap: {msg}");
    eprintln!("bomb refused in {:?}: {msg}", started.elapsed());
    // Under the default cap (256 MiB) the same file is ingested.
    let ok = call(
        &t,
        &c,
        none,
        json!(["bomb.pdf", {"embed": false}]),
        json!({}),
    )
    .unwrap();
    assert_eq!(ok["pages"], 1, "{ok}");
}

#[test]
fn the_backend_can_be_chosen_per_call() {
    let Some(files) = common::native_or_skip("backend choice test") else {
        return;
    };
    let (root, _) = storage();
    let t = task(&root, files);
    let c = CancelFlag::new();
    let none = &tasks::NoProgress;
    let mut texts = Vec::new();
    for backend in ["pdfium", "pdf_oxide", "pdf-extract"] {
        let out = call(
            &t,
            &c,
            none,
            json!(["docs/hello.pdf", {"backend": backend, "embed": false}]),
            json!({}),
        )
        .unwrap_or_else(|e| panic!("{backend}: {e:?}"));
        assert_eq!(out["backend"], backend, "{out}");
        assert_eq!(out["pages"], 3, "{backend}: {out}");
        assert_eq!(
            out["artifacts"],
            Value::Null,
            "a non-default backend bypasses the store"
        );
        texts.push(out["chars"].as_u64().unwrap());
    }
    assert!(
        texts.iter().all(|&n| n > 100),
        "every backend reads the text: {texts:?}"
    );
    let (name, msg) = failure(call(
        &t,
        &c,
        none,
        json!(["docs/hello.pdf", {"backend": "poppler"}]),
        json!({}),
    ));
    assert_eq!(name, "TypeError", "{msg}");
    assert!(msg.contains("poppler"), "{msg}");
}
