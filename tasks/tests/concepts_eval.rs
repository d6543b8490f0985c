//! A small evaluation of the concept extractor (issue #4 item 6): on the
//! corpus documents that carry author keywords (the PDF's /Keywords entry,
//! or a "Keywords:"/"Index Terms" line, removed from the text first), how
//! many of those keywords do the top 10 concepts recover, for
//!
//! - `embedding`: what ingestion ships when it embeds
//!   (`summarize::concepts_by_embedding`): the 60 most frequent candidate
//!   n-grams ranked by cosine similarity to the document's embedding,
//!   KeyBERT-style (here the document is the mean of its first 16 chunk
//!   vectors, to keep the test short; ingestion uses all of them);
//! - `statistical`: what it ships with `embed: false` (`summarize::concepts`:
//!   n-gram count x summed log word frequency, contained phrases folded);
//! - `frequency`: the 10 most frequent content words (baseline).
//!
//! A keyword counts as recovered when a top-10 phrase shares a word with it
//! (compared on 5-letter prefixes, so "network"/"networks" match). The
//! labels are the documents' own; the set is small (10 documents), so the
//! figures say which method is not worse, not by how much. Needs
//! `scripts/setup-native` (skips loudly, or fails with TORI_REQUIRE_NATIVE=1).

mod common;

use std::time::Instant;

use tasks::ingest::embed::Embedder;
use tasks::ingest::summarize;
use tasks::ingest::{IngestOptions, PdfIngestion};

/// (file stem, author keywords, marker of a keyword line to remove).
const LABELLED: &[(&str, &str, Option<&str>)] = &[
    ("deb-texlive-fonts-recommended-doc__euro", "currency; euro; monetary; conversion", None),
    ("deb-texlive-fonts-recommended-doc__marvosym-doc", "marvosym; symbol font", None),
    ("deb-texlive-lang-chinese__example", "latex; cjk; template; thesis", None),
    (
        "pdfminer__nonfree_dmca",
        "digital millennium copyright act; circumvention; technological protection; \
         management information; online service provider; liability limitation; \
         computer maintenance; repair; ephemeral recording; webcasting; distance education; \
         vessel hull",
        None,
    ),
    (
        "pdfplumber__examples_pdfs_ag-energy-round-up-2017-02-24",
        "national; ag; energy; ethanol; biodiesel; bioenergy",
        None,
    ),
    (
        "pdfplumber__tests_pdfs_issue-982-example",
        "recognition; machine learning; neural networks; classification; multilayer perceptron; deep learning",
        None,
    ),
    ("pdfplumber__tests_pdfs_issue-13-151201DSP-Fond-581-90D", "fond du lac", None),
    ("samplefiles__009-pdflatex-geotopo_GeoTopo-komprimiert", "geometrie; topologie", None),
    (
        "pdfminer__nonfree_naacl06-shinyama",
        "storm; evacuate; coast; rain; hurricane",
        Some("keywords"),
    ),
    (
        "pdfminer__contrib_issue-1061-colour-space-stack",
        "data privacy; data utility; differential privacy",
        Some("index terms"),
    ),
];

const K: usize = 10;

fn stems(phrase: &str) -> Vec<String> {
    phrase
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 2)
        .map(|w| w.to_lowercase().chars().take(5).collect())
        .collect()
}

/// Share of `gold` keywords with a word in common with some phrase of `top`.
fn recall(gold: &[&str], top: &[String]) -> f64 {
    let top_stems: Vec<Vec<String>> = top.iter().map(|p| stems(p)).collect();
    let hits = gold
        .iter()
        .filter(|g| {
            let gs = stems(g);
            top_stems.iter().any(|t| t.iter().any(|s| gs.contains(s)))
        })
        .count();
    hits as f64 / gold.len().max(1) as f64
}

fn frequency_top(text: &str) -> Vec<String> {
    let (_, freq) = summarize::candidates(text);
    let mut words: Vec<(String, f64)> = freq
        .into_iter()
        .filter(|(w, _)| w.chars().filter(|c| c.is_alphabetic()).count() >= 3)
        .collect();
    words.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    words.into_iter().take(K).map(|(w, _)| w).collect()
}

/// The shipped ranking, and the seconds it took given the chunk vectors
/// (which ingestion has anyway; the sample's own embedding is not timed).
fn embedding_top(embedder: &Embedder, text: &str, chunk_ids: &[Vec<u32>]) -> (Vec<String>, f64) {
    let sample: Vec<Vec<u32>> = chunk_ids.iter().take(16).cloned().collect();
    if sample.is_empty() {
        return (Vec::new(), 0.0);
    }
    let (vecs, _) = embedder.embed_ids(&sample, &mut || true).unwrap();
    let t = Instant::now();
    let top = summarize::concepts_by_embedding(text, &vecs, K, |p| embedder.embed_texts(p))
        .unwrap()
        .into_iter()
        .map(|c| c.phrase)
        .collect();
    (top, t.elapsed().as_secs_f64())
}

#[test]
fn embedding_ranked_concepts_recover_author_keywords_at_least_as_well_as_the_alternatives() {
    let Some(files) = common::native_or_skip("concept evaluation") else {
        return;
    };
    let Some(corpus) = common::corpus_or_skip("concept evaluation") else {
        return;
    };
    let task = PdfIngestion::new(&corpus, files.clone()).expect("task");
    let embedder = Embedder::global(&files).expect("model loads");
    let opts = IngestOptions {
        embed: Some(false),
        ..IngestOptions::default()
    };
    let mut sums = [0.0f64; 3];
    let mut secs = [0.0f64; 3];
    eprintln!("\n== concepts vs author keywords (recall@{K}: statistical | frequency | embedding)");
    for (stem, gold, marker) in LABELLED {
        let out = common::with_ctx(|ctx| task.ingest(ctx, &format!("pdf/{stem}.pdf"), &opts))
            .unwrap_or_else(|e| panic!("{stem}: {e:?}"));
        let mut text = out.pages.join("\n\n");
        if let Some(m) = marker {
            text = text
                .lines()
                .filter(|l| !l.trim_start().to_lowercase().starts_with(m))
                .collect::<Vec<_>>()
                .join("\n");
        }
        let gold: Vec<&str> = gold
            .split(';')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .collect();
        let t = Instant::now();
        let ours: Vec<String> = summarize::concepts(&text, K)
            .into_iter()
            .map(|c| c.phrase)
            .collect();
        secs[0] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let freq = frequency_top(&text);
        secs[1] += t.elapsed().as_secs_f64();
        let ids: Vec<Vec<u32>> = out.chunks.iter().map(|c| c.ids.clone()).collect();
        let (emb, took) = embedding_top(embedder, &text, &ids);
        secs[2] += took;
        let r = [
            recall(&gold, &ours),
            recall(&gold, &freq),
            recall(&gold, &emb),
        ];
        for (s, x) in sums.iter_mut().zip(r) {
            *s += x;
        }
        eprintln!("  {:<58} {:.2} | {:.2} | {:.2}", stem, r[0], r[1], r[2]);
        eprintln!("      statistical: {ours:?}");
        eprintln!("      embedding:   {emb:?}");
    }
    let n = LABELLED.len() as f64;
    let mean = sums.map(|s| s / n);
    eprintln!(
        "  mean recall@{K}: statistical {:.3}, frequency {:.3}, embedding {:.3}; \
         time: {:.1} ms, {:.1} ms, {:.0} ms for all 10 documents (embedding: the 60 candidates, given the chunk vectors)",
        mean[0],
        mean[1],
        mean[2],
        secs[0] * 1e3,
        secs[1] * 1e3,
        secs[2] * 1e3
    );
    assert!(
        mean[2] >= mean[1] && mean[2] >= mean[0],
        "the shipped ranking (embedding, {:.3}) must not be worse than plain word frequency \
         ({:.3}) or the statistical score ({:.3})",
        mean[2],
        mean[1],
        mean[0]
    );
}
