//! The embedder keeps ONNX Runtime's arena while it is busy and gives it
//! back once idle (`RELEASE_AFTER`). Its own test binary, so no other
//! test embeds in this process while memory is read.

mod common;

use std::time::{Duration, Instant};

use tasks::ingest::embed::{Embedder, RELEASE_AFTER};

/// Anonymous memory of this process, in MiB (`/proc/self/smaps_rollup`):
/// where the arena lives; the mapped weights are file-backed.
fn anonymous_mib() -> f64 {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").expect("smaps_rollup");
    let kib: f64 = rollup
        .lines()
        .find_map(|l| l.strip_prefix("Anonymous:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("Anonymous: line");
    kib / 1024.0
}

#[test]
fn arena_is_kept_while_busy_and_released_when_idle() {
    let Some(files) = common::native_or_skip("embedding arena release test") else {
        return;
    };
    let embedder = Embedder::global(&files).expect("embedder loads");
    // Full-length, all distinct (duplicates are run once): 8 batches of
    // 8 x 256 tokens, the largest activations the embedder ever allocates.
    let seqs: Vec<Vec<u32>> = (0..64u32)
        .map(|i| (0..254u32).map(|j| 1000 + (i * 254 + j) % 20000).collect())
        .collect();
    let before = anonymous_mib();
    embedder.embed_ids(&seqs, &mut || true).expect("embeds");
    let busy = anonymous_mib();
    assert!(
        busy - before > 20.0,
        "the arena should have grown while embedding: {before:.0} -> {busy:.0} MiB"
    );

    // A second call right away reuses the arena instead of growing anew.
    embedder.embed_ids(&seqs, &mut || true).expect("embeds");
    let again = anonymous_mib();
    assert!(
        again - busy < 10.0,
        "back-to-back calls should reuse the arena: {busy:.0} -> {again:.0} MiB"
    );

    // Idle: released within a few multiples of RELEASE_AFTER.
    let deadline = Instant::now() + RELEASE_AFTER * 20;
    let mut idle = anonymous_mib();
    while idle > before + (again - before) / 2.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        idle = anonymous_mib();
    }
    assert!(
        idle < before + (again - before) / 2.0,
        "an idle embedder should give most of its arena back: \
         before {before:.0}, busy {again:.0}, idle {idle:.0} MiB"
    );

    eprintln!(
        "anonymous MiB: loaded {before:.0}, busy {busy:.0}, again {again:.0}, idle {idle:.0}"
    );

    // And it still embeds correctly afterwards.
    let v = embedder.embed_texts(&["still works"]).expect("embeds");
    assert_eq!(v[0].len(), tasks::ingest::embed::DIM);
}
