//! A pre-packed model that does not reproduce its probe (packed on another
//! CPU, or damaged) is not used: the embedder says why and loads the
//! unpacked shared form. Its own test binary: the embedder is per process.

mod common;

use std::path::Path;

use serde_json::Value;
use tasks::ingest::embed::{Embedder, ModelForm};
use tasks::ingest::NativeFiles;

#[test]
fn a_packed_model_that_fails_its_probe_is_not_used() {
    let Some(files) = common::native_or_skip("packed-model fallback test") else {
        return;
    };
    let packed = files.model_packed_onnx();
    assert!(
        packed.is_file(),
        "{} missing: run scripts/setup-native",
        packed.display()
    );
    // A model directory with the real files and a probe whose expected
    // embedding is off by 1e-3 in one value.
    let dir = std::env::temp_dir().join(format!("tori-packed-fallback-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&files.model_dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name != "probe.json" {
            let link = dir.join(&name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(entry.path(), link).unwrap();
        }
    }
    let mut probe: Value =
        serde_json::from_slice(&std::fs::read(files.probe_json()).unwrap()).unwrap();
    let first = probe["embedding"][0].as_f64().unwrap();
    probe["embedding"][0] = Value::from(first + 1e-3);
    std::fs::write(dir.join("probe.json"), probe.to_string()).unwrap();

    let moved = NativeFiles {
        model_dir: dir.clone(),
        ..files.clone()
    };
    let embedder = Embedder::global(&moved).expect("falls back and loads");
    assert_eq!(embedder.form(), ModelForm::Shared);
    let v = embedder.embed_texts(&["still embeds"]).unwrap();
    assert_eq!(v[0].len(), tasks::ingest::embed::DIM);
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
