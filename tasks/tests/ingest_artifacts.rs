//! Artifacts in object storage (issue #4 item 7): the same PDF twice
//! reuses `<sha256>/result.json` (much faster, identical result), the
//! artifact files have one line per page / chunk, on a local directory and
//! on a real S3-compatible server (moto's standalone server from
//! `.tori/native-venv`, started on a free port). Needs
//! `scripts/setup-native` (skips loudly, or fails with TORI_REQUIRE_NATIVE=1).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tasks::ingest::artifacts::ArtifactStore;
use tasks::ingest::{IngestOptions, PdfIngestion, Sources};

fn sample_pdf() -> Vec<u8> {
    let pages: Vec<String> = (0..12)
        .map(|p| {
            format!(
                "Page {p} of the artifact test describes how ingestion stores pages, chunks \
                 and embeddings in object storage keyed by the digest of the document bytes, \
                 so that a second run over identical bytes finds result json number {p}"
            )
        })
        .collect();
    let refs: Vec<&str> = pages.iter().map(String::as_str).collect();
    common::tiny_pdf(&refs)
}

fn fresh_root(name: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("tori-artifacts-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("doc.pdf"), sample_pdf()).unwrap();
    root
}

fn run_twice(task: &PdfIngestion, label: &str) -> (Value, Value) {
    let opts = IngestOptions::default();
    let t = Instant::now();
    let first = common::with_ctx(|ctx| task.ingest_or_reuse(ctx, "doc.pdf", &opts)).unwrap();
    let first_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let second = common::with_ctx(|ctx| task.ingest_or_reuse(ctx, "doc.pdf", &opts)).unwrap();
    let second_s = t.elapsed().as_secs_f64();
    eprintln!(
        "[{label}] first run {:.1} ms (reported total_ms {}), second run {:.1} ms (reported total_ms {}); {:.0}x faster",
        first_s * 1e3,
        first["timings"]["total_ms"],
        second_s * 1e3,
        second["timings"]["total_ms"],
        first_s / second_s
    );
    assert_eq!(first["reused"], false);
    assert_eq!(second["reused"], true);
    for k in [
        "sha256",
        "pages",
        "chunks",
        "chars",
        "bytes",
        "artifacts",
        "embed_stats",
    ] {
        assert_eq!(first[k], second[k], "{k}");
    }
    assert!(first["chunks"].as_u64().unwrap() >= 2, "{first}");
    assert_eq!(second["timings"]["embed_ms"], 0.0);
    assert_eq!(second["timings"]["extract_ms"], 0.0);
    assert!(
        second_s * 5.0 < first_s,
        "reuse should be much faster: {first_s} s vs {second_s} s"
    );
    (first, second)
}

fn check_lines(pages: &str, chunks: &str, result: &Value) {
    let n_pages = result["pages"].as_u64().unwrap() as usize;
    let n_chunks = result["chunks"].as_u64().unwrap() as usize;
    let pages: Vec<Value> = pages
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let chunks: Vec<Value> = chunks
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(pages.len(), n_pages);
    assert_eq!(chunks.len(), n_chunks);
    assert_eq!(pages[0]["page"], 1);
    assert!(pages[0]["text"].as_str().unwrap().contains("artifact test"));
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert!(c["page_start"].as_u64().unwrap() <= c["page_end"].as_u64().unwrap());
        let v = c["embedding"].as_array().unwrap();
        assert_eq!(v.len(), 384);
        let norm: f64 = v.iter().map(|x| x.as_f64().unwrap().powi(2)).sum();
        assert!((norm - 1.0).abs() < 1e-3, "L2-normalized: {norm}");
    }
}

#[test]
fn same_pdf_twice_reuses_local_artifacts() {
    let Some(files) = common::native_or_skip("artifacts (file://)") else {
        return;
    };
    let root = fresh_root("fs");
    let dir = root.join("store");
    let url = url::Url::from_directory_path(&dir).unwrap().to_string();
    let store = ArtifactStore::from_url(&url).unwrap();
    let task = PdfIngestion::new(&root, files)
        .unwrap()
        .with_artifacts(store);
    let (first, _) = run_twice(&task, "file://");

    let sha = first["sha256"].as_str().unwrap();
    let urls = &first["artifacts"];
    let expect = |name: &str| {
        format!(
            "file://{}/{sha}/{name}",
            dir.canonicalize().unwrap().display()
        )
    };
    assert_eq!(urls["pages"], expect("pages.jsonl"));
    assert_eq!(urls["chunks"], expect("chunks.jsonl"));
    assert_eq!(urls["result"], expect("result.json"));
    let read = |name: &str| std::fs::read_to_string(dir.join(sha).join(name)).unwrap();
    check_lines(&read("pages.jsonl"), &read("chunks.jsonl"), &first);
    let stored: Value = serde_json::from_str(&read("result.json")).unwrap();
    assert_eq!(stored["reused"], false);
    assert_eq!(stored["sha256"], first["sha256"]);

    // Options that change the output bypass the store (no stale reuse).
    let opts = IngestOptions {
        chunk_tokens: Some(64),
        ..IngestOptions::default()
    };
    let other = common::with_ctx(|ctx| task.ingest_or_reuse(ctx, "doc.pdf", &opts)).unwrap();
    assert_eq!(other["reused"], false);
    assert_eq!(other["artifacts"], Value::Null);
    assert!(other["chunks"].as_u64() > first["chunks"].as_u64());
    let _ = std::fs::remove_dir_all(&root);
}

/// The standalone moto server, killed on drop.
struct Moto(Child);
impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto_or_skip() -> Option<PathBuf> {
    let bin = common::workspace_root().join(".tori/native-venv/bin/moto_server");
    if bin.is_file() {
        return Some(bin);
    }
    let msg = format!(
        "\n\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         !! SKIPPED artifacts (s3://): {} is missing (run scripts/setup-native)\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n",
        bin.display()
    );
    if std::env::var("TORI_REQUIRE_NATIVE").is_ok_and(|v| v == "1") {
        panic!("required test input missing (TORI_REQUIRE_NATIVE=1): {msg}");
    }
    let _ = std::io::stderr().write_all(msg.as_bytes());
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One plain HTTP/1.1 request; returns the status line and body.
fn http(port: u16, method: &str, path: &str) -> std::io::Result<String> {
    http_body(port, method, path, b"")
}

/// Like [`http`], sending `body` (moto does not check signatures, so a
/// bare PUT uploads an object the way a producer's S3 client would).
fn http_body(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn start_moto(bin: &Path) -> (Moto, u16) {
    let port = free_port();
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server");
    let moto = Moto(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while http(port, "GET", "/").is_err() {
        assert!(
            Instant::now() < deadline,
            "moto_server did not answer on {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (moto, port)
}

#[test]
fn same_pdf_twice_reuses_s3_artifacts_on_moto() {
    let Some(files) = common::native_or_skip("artifacts (s3://)") else {
        return;
    };
    let Some(bin) = moto_or_skip() else {
        return;
    };
    let (_moto, port) = start_moto(&bin);
    let created = http(port, "PUT", "/tori-artifacts").unwrap();
    assert!(
        created.starts_with("HTTP/1.1 200"),
        "create bucket: {created}"
    );

    // The standard AWS variables, as a deployment would set them. Only
    // this test in this binary reads them.
    std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"));
    std::env::set_var("AWS_ALLOW_HTTP", "true");
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    std::env::set_var("AWS_REGION", "us-east-1");
    let store = ArtifactStore::from_url("s3://tori-artifacts/ingest/v1").unwrap();
    let root = fresh_root("s3");
    let task = PdfIngestion::new(&root, files)
        .unwrap()
        .with_artifacts(store);
    let (first, _) = run_twice(&task, "s3://");

    let sha = first["sha256"].as_str().unwrap();
    assert_eq!(
        first["artifacts"]["result"],
        format!("s3://tori-artifacts/ingest/v1/{sha}/result.json")
    );
    // Read the objects back through a second client: they exist with the
    // right line counts.
    let reader = ArtifactStore::from_url("s3://tori-artifacts/ingest/v1").unwrap();
    let body = |name: &str| {
        let bytes = reader
            .get(sha, name)
            .unwrap()
            .unwrap_or_else(|| panic!("{name} missing"));
        String::from_utf8(bytes).unwrap()
    };
    check_lines(&body("pages.jsonl"), &body("chunks.jsonl"), &first);
    let stored: Value = serde_json::from_str(&body("result.json")).unwrap();
    assert_eq!(stored["sha256"], first["sha256"]);

    // Input from S3 too: a producer uploaded the PDF under the storage
    // URL; the task reads it from there (and finds the artifacts above,
    // since the bytes are the same).
    let put = http_body(
        port,
        "PUT",
        "/tori-artifacts/uploads/in/doc.pdf",
        &sample_pdf(),
    )
    .unwrap();
    assert!(put.starts_with("HTTP/1.1 200"), "upload: {put}");
    let sources = Sources::local(&root).with_remote("s3://tori-artifacts/uploads");
    let from_s3 = PdfIngestion::with(sources.clone(), common::native_or_skip("s3 input").unwrap())
        .unwrap()
        .with_artifacts(ArtifactStore::from_url("s3://tori-artifacts/ingest/v1").unwrap());
    let opts = IngestOptions::default();
    let got = common::with_ctx(|ctx| {
        from_s3.ingest_or_reuse(ctx, "s3://tori-artifacts/uploads/in/doc.pdf", &opts)
    })
    .unwrap();
    assert_eq!(got["sha256"], first["sha256"]);
    assert_eq!(got["reused"], true);
    assert_eq!(got["file_ref"], "s3://tori-artifacts/uploads/in/doc.pdf");
    // Without artifacts the bytes from S3 are really ingested.
    let plain = PdfIngestion::with(sources, common::native_or_skip("s3 input").unwrap()).unwrap();
    let fresh = common::with_ctx(|ctx| {
        plain.ingest_or_reuse(ctx, "s3://tori-artifacts/uploads/in/doc.pdf", &opts)
    })
    .unwrap();
    assert_eq!(fresh["reused"], false);
    assert_eq!(fresh["pages"], first["pages"]);
    assert_eq!(fresh["chunks"], first["chunks"]);
    let fail = |file_ref: &str, o: &IngestOptions| match common::with_ctx(|ctx| {
        plain.ingest_or_reuse(ctx, file_ref, o)
    }) {
        Err(tasks::TaskError::Failed { exception, .. }) => {
            format!("{} {}", exception.name, exception.args[0])
        }
        other => panic!("{file_ref}: expected a failure, got {other:?}"),
    };
    let missing = fail("s3://tori-artifacts/uploads/in/missing.pdf", &opts);
    assert!(
        missing.starts_with("FileNotFoundError \"[not_found]"),
        "{missing}"
    );
    let outside = fail("s3://tori-artifacts/ingest/v1/x.pdf", &opts);
    assert!(
        outside.starts_with("PermissionError \"[outside_storage_root]"),
        "{outside}"
    );
    let small = IngestOptions {
        max_bytes: Some(100),
        ..IngestOptions::default()
    };
    let big = fail("s3://tori-artifacts/uploads/in/doc.pdf", &small);
    assert!(big.starts_with("ValueError \"[too_large]"), "{big}");
    let _ = std::fs::remove_dir_all(&root);
}
