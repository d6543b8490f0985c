//! The fuzz targets' checks (tests/fuzz/src/lib.rs), run by `cargo test`
//! on the committed seed corpus (tests/fuzz/seeds/) and on every captured
//! wire vector, so CI exercises them without libFuzzer or cargo-fuzz.
//! Fuzzing itself: `scripts/fuzz`.

#[allow(dead_code)]
#[path = "fuzz/src/lib.rs"]
mod checks;

use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/seeds")
        .join(target);
    let out: Vec<_> = files(&dir)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).expect("readable seed");
            (p, bytes)
        })
        .collect();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

/// The captured envelopes, as popped from Redis.
fn vectors() -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let mut out = Vec::new();
    for sub in ["broker", "pidbox", "events"] {
        for path in files(&root.join(sub)) {
            if path.extension().and_then(|e| e.to_str()) == Some("raw") {
                let bytes = std::fs::read(&path).expect("readable vector");
                out.push((path, bytes));
            }
        }
    }
    assert!(out.len() > 100, "vectors missing: {}", out.len());
    out
}

/// Runs `check` on every input, naming the input that fails.
fn replay(inputs: Vec<(PathBuf, Vec<u8>)>, check: impl Fn(&[u8])) {
    for (path, bytes) in inputs {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&bytes)));
        if let Err(panic) = result {
            eprintln!("failing input: {}", path.display());
            std::panic::resume_unwind(panic);
        }
    }
}

/// How libFuzzer's `fuzz_target!(|x: T| …)` turns bytes into `T`.
fn structured<'a, T: Arbitrary<'a>>(bytes: &'a [u8]) -> Option<T> {
    T::arbitrary_take_rest(Unstructured::new(bytes)).ok()
}

#[test]
fn envelope_seeds_and_vectors() {
    replay(seeds("envelope"), checks::envelope);
    replay(vectors(), checks::envelope);
}

#[test]
fn task_message_raw_seeds_and_vectors() {
    replay(seeds("task_message_raw"), checks::task_message_raw);
    replay(vectors(), checks::task_message_raw);
}

#[test]
fn task_message_seeds() {
    replay(seeds("task_message"), |bytes| {
        if let Some(message) = structured::<checks::Message>(bytes) {
            checks::task_message(&message);
        }
    });
}

#[test]
fn ipc_frame_seeds() {
    replay(seeds("ipc_frame"), checks::ipc_frame);
}

#[test]
fn canvas_seeds() {
    replay(seeds("canvas_raw"), checks::canvas_raw);
    replay(seeds("canvas"), |bytes| {
        if let Some(step) = structured::<checks::Step>(bytes) {
            checks::canvas(&step);
        }
    });
}
