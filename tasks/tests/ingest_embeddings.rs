//! The Rust embedder (ORT via `ort`, tokenizer via `tokenizers`) against
//! Python onnxruntime + the Python `tokenizers` on the same ONNX file:
//! `tests/fixtures/minilm_reference.json`, written by
//! `scripts/native/make_reference.py` from `scripts/setup-native`.

mod common;

use serde_json::Value;
use sha2::{Digest, Sha256};
use tasks::ingest::embed::{Embedder, ModelForm, DIM};

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/minilm_reference.json"
    );
    serde_json::from_str(
        &std::fs::read_to_string(path).expect("fixture (run scripts/setup-native)"),
    )
    .expect("fixture is JSON")
}

#[test]
fn embeddings_match_python_onnxruntime_to_1e_4() {
    let Some(files) = common::native_or_skip("embedding reference test") else {
        return;
    };
    let fx = fixture();
    let model = std::fs::read(files.model_onnx()).unwrap();
    let sha: String = Sha256::digest(&model)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        sha,
        fx["model_sha256"].as_str().unwrap(),
        "the placed model.onnx is not the one the fixture was made from: \
         run scripts/setup-native (or --update-checksums after a deliberate change)"
    );
    let embedder = Embedder::global(&files).expect("embedder loads");
    let items = fx["items"].as_array().unwrap();
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();

    // Same token ids as Python's tokenizers (special tokens included).
    for (item, text) in items.iter().zip(&texts) {
        let want: Vec<u32> = item["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = embedder.with_specials(&embedder.encode(text).unwrap());
        assert_eq!(got, want, "token ids differ for {text:?}");
    }

    // Batched embeddings match Python to 1e-4.
    let got = embedder.embed_texts(&texts).unwrap();
    let mut max_diff = 0f32;
    for (item, v) in items.iter().zip(&got) {
        assert_eq!(v.len(), DIM);
        for (a, b) in v.iter().zip(item["embedding"].as_array().unwrap()) {
            max_diff = max_diff.max((a - b.as_f64().unwrap() as f32).abs());
        }
    }
    eprintln!(
        "Rust ORT vs Python onnxruntime: max abs diff {max_diff:.2e} over {} sentences",
        texts.len()
    );
    assert!(max_diff <= 1e-4, "max abs diff {max_diff}");

    // One at a time gives the same vectors as in a batch (padding and batch
    // composition do not change a vector).
    let mut batch_diff = 0f32;
    for (text, v) in texts.iter().zip(&got) {
        let single = embedder.embed_texts(&[text]).unwrap();
        for (a, b) in single[0].iter().zip(v) {
            batch_diff = batch_diff.max((a - b).abs());
        }
    }
    eprintln!("single vs batched: max abs diff {batch_diff:.2e}");
    assert!(batch_diff <= 1e-5, "batch dependence {batch_diff}");

    // Loaded once per process, however often it is asked for.
    Embedder::global(&files).unwrap();
    let counts = tasks::ingest::load_counts();
    assert_eq!(
        (counts.onnxruntime, counts.model_sessions),
        (1, 1),
        "{counts:?}"
    );
}

#[test]
fn duplicate_sequences_are_embedded_once() {
    let Some(files) = common::native_or_skip("embedding dedup test") else {
        return;
    };
    let embedder = Embedder::global(&files).expect("embedder loads");
    let a = embedder.encode("the same chunk twice").unwrap();
    let b = embedder.encode("another chunk").unwrap();
    let (vecs, stats) = embedder
        .embed_ids(&[a.clone(), b, a], &mut || true)
        .unwrap();
    assert_eq!((stats.sequences, stats.unique), (3, 2));
    assert_eq!(vecs[0], vecs[2]);
    // cancellation before a batch stops the call
    let err = embedder
        .embed_ids(&[vec![1000]], &mut || false)
        .unwrap_err();
    assert_eq!(err, "cancelled");
}

#[test]
fn the_packed_model_made_here_is_the_one_in_use() {
    // setup-native packs the model on this machine; its probe must pass,
    // so the reference test above ran the packed form.
    let Some(files) = common::native_or_skip("packed-model test") else {
        return;
    };
    if !files.model_packed_onnx().is_file() {
        assert_ne!(
            std::env::var("TORI_REQUIRE_NATIVE").as_deref(),
            Ok("1"),
            "model.packed.onnx missing (run scripts/setup-native)"
        );
        return;
    }
    let embedder = Embedder::global(&files).expect("embedder loads");
    assert_eq!(embedder.form(), ModelForm::Packed);
}
