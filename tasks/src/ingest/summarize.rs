//! Key concepts and an extractive summary, from what ingestion already
//! computed (cleaned text and chunk embeddings) plus one model call for
//! the candidate phrases.
//!
//! Concepts: candidates are the 1- to 3-word n-grams inside runs of
//! content words (runs end at stop words and punctuation) that recur. The
//! 60 most frequent are embedded and ranked by cosine similarity to the
//! document's centroid embedding (KeyBERT-style), and phrases inside a
//! better one are folded into it. On the corpus documents that carry
//! author keywords this found more of them than ranking by frequency or by
//! the statistical score below (`tasks/tests/concepts_eval.rs`). It costs
//! one short batch (~360 padded tokens, tens of milliseconds). With
//! embedding off, [`concepts`] scores a phrase by its count times the
//! summed log-frequency of its words; it needs no corpus statistics, which
//! a worker ingesting one document at a time does not have.
//!
//! Summary: the sentences of the chunks closest to the document's centroid
//! embedding (the most representative passages), ranked by how many of the
//! document's keyphrase words they carry, returned in document order.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

/// A ranked keyphrase.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Concept {
    pub phrase: String,
    pub score: f64,
    /// Occurrences in the document.
    pub count: usize,
}

const STOP_WORDS: &[&str] = &[
    "a",
    "about",
    "above",
    "after",
    "again",
    "against",
    "all",
    "also",
    "am",
    "an",
    "and",
    "any",
    "are",
    "as",
    "at",
    "be",
    "because",
    "been",
    "before",
    "being",
    "below",
    "between",
    "both",
    "but",
    "by",
    "can",
    "could",
    "did",
    "do",
    "does",
    "doing",
    "down",
    "during",
    "each",
    "either",
    "etc",
    "few",
    "for",
    "from",
    "further",
    "had",
    "has",
    "have",
    "having",
    "he",
    "her",
    "here",
    "hers",
    "herself",
    "him",
    "himself",
    "his",
    "how",
    "however",
    "i",
    "if",
    "in",
    "into",
    "is",
    "it",
    "its",
    "itself",
    "just",
    "may",
    "me",
    "might",
    "more",
    "most",
    "must",
    "my",
    "myself",
    "no",
    "nor",
    "not",
    "now",
    "of",
    "off",
    "on",
    "once",
    "one",
    "only",
    "or",
    "other",
    "our",
    "ours",
    "ourselves",
    "out",
    "over",
    "own",
    "same",
    "see",
    "shall",
    "she",
    "should",
    "so",
    "some",
    "such",
    "than",
    "that",
    "the",
    "their",
    "theirs",
    "them",
    "themselves",
    "then",
    "there",
    "these",
    "they",
    "this",
    "those",
    "through",
    "thus",
    "to",
    "too",
    "two",
    "under",
    "until",
    "up",
    "upon",
    "us",
    "use",
    "used",
    "using",
    "very",
    "via",
    "was",
    "we",
    "were",
    "what",
    "when",
    "where",
    "whether",
    "which",
    "while",
    "who",
    "whom",
    "why",
    "will",
    "with",
    "within",
    "without",
    "would",
    "yet",
    "you",
    "your",
    "yours",
    "yourself",
];

fn is_stop(word: &str) -> bool {
    STOP_WORDS.binary_search(&word).is_ok()
}

/// Lower-cased words of `text`, with `None` marking phrase boundaries
/// (punctuation, stop words, numbers).
fn phrase_tokens(text: &str) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut Vec<Option<String>>| {
        if word.is_empty() {
            return;
        }
        let w = word.to_lowercase();
        let content = w.chars().any(char::is_alphabetic) && w.chars().count() >= 2 && !is_stop(&w);
        out.push(content.then_some(w));
        word.clear();
    };
    for ch in text.chars() {
        if ch.is_alphanumeric() || (ch == '-' && !word.is_empty()) {
            word.push(ch);
        } else {
            flush(&mut word, &mut out);
            if !ch.is_whitespace() {
                out.push(None);
            }
        }
    }
    flush(&mut word, &mut out);
    out
}

/// Candidate keyphrases of `text` with their counts: every 1- to 3-word
/// n-gram inside a run of content words (runs end at stop words, numbers
/// and punctuation) that recurs (unless the document is tiny) and has
/// three letters or more; plus each content word's frequency.
pub fn candidates(text: &str) -> (Vec<(String, usize)>, HashMap<String, f64>) {
    let mut word_freq: HashMap<String, f64> = HashMap::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut run: Vec<String> = Vec::new();
    let mut flush = |run: &mut Vec<String>| {
        for n in 1..=3 {
            for gram in run.windows(n) {
                *counts.entry(gram.join(" ")).or_default() += 1;
            }
        }
        run.clear();
    };
    for token in phrase_tokens(text) {
        match token {
            Some(w) => {
                *word_freq.entry(w.clone()).or_default() += 1.0;
                run.push(w);
            }
            None => flush(&mut run),
        }
    }
    flush(&mut run);
    let content_words: f64 = word_freq.values().sum();
    // A phrase must recur, unless the document is tiny.
    let min_count = if content_words < 50.0 { 1 } else { 2 };
    let mut out: Vec<(String, usize)> = counts
        .into_iter()
        .filter(|(phrase, count)| {
            *count >= min_count && phrase.chars().filter(|c| c.is_alphabetic()).count() >= 3
        })
        .collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    (out, word_freq)
}

/// Keeps the first `k` phrases of `ranked` (best first), dropping phrases
/// contained in a better one ("neural" under "neural network").
pub fn fold_contained(ranked: Vec<Concept>, k: usize) -> Vec<Concept> {
    let mut kept: Vec<Concept> = Vec::new();
    for c in ranked {
        if kept.iter().any(|k| contains_words(&k.phrase, &c.phrase)) {
            continue;
        }
        kept.push(c);
        if kept.len() == k {
            break;
        }
    }
    kept
}

/// The `k` best keyphrases of `text`.
pub fn concepts(text: &str, k: usize) -> Vec<Concept> {
    let (candidates, word_freq) = candidates(text);
    let mut scored: Vec<Concept> = candidates
        .into_iter()
        .map(|(phrase, count)| {
            // Frequent phrases made of frequent words: count times the
            // summed log-frequency of its words.
            let weight: f64 = phrase.split(' ').map(|w| (1.0 + word_freq[w]).ln()).sum();
            Concept {
                score: ((count as f64 * weight) * 1000.0).round() / 1000.0,
                phrase,
                count,
            }
        })
        .collect();
    scored.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.phrase.cmp(&b.phrase))
    });
    fold_contained(scored, k)
}

/// How many of the most frequent candidates [`concepts_by_embedding`]
/// embeds and ranks.
pub const CANDIDATES: usize = 60;

/// The `k` candidates of `text` closest to the document in embedding
/// space. `doc_vectors` are the document's chunk vectors (their centroid is
/// the document); `embed` embeds phrases. Scores are cosine similarities.
pub fn concepts_by_embedding(
    text: &str,
    doc_vectors: &[Vec<f32>],
    k: usize,
    embed: impl FnOnce(&[&str]) -> Result<Vec<Vec<f32>>, String>,
) -> Result<Vec<Concept>, String> {
    let Some(first) = doc_vectors.first() else {
        return Ok(Vec::new());
    };
    let mut centroid = vec![0f32; first.len()];
    for v in doc_vectors {
        for (c, x) in centroid.iter_mut().zip(v) {
            *c += x;
        }
    }
    let (mut cands, _) = candidates(text);
    cands.truncate(CANDIDATES);
    if cands.is_empty() {
        return Ok(Vec::new());
    }
    let phrases: Vec<&str> = cands.iter().map(|(p, _)| p.as_str()).collect();
    let vectors = embed(&phrases)?;
    let mut ranked: Vec<Concept> = cands
        .iter()
        .zip(&vectors)
        .map(|((phrase, count), v)| Concept {
            phrase: phrase.clone(),
            score: (f64::from(cosine(&centroid, v).max(0.0)) * 1000.0).round() / 1000.0,
            count: *count,
        })
        .collect();
    ranked.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.phrase.cmp(&b.phrase))
    });
    Ok(fold_contained(ranked, k))
}

fn contains_words(long: &str, short: &str) -> bool {
    long != short && format!(" {long} ").contains(&format!(" {short} "))
}

/// Sentences of `text`: split after `.`, `!`, `?` followed by whitespace,
/// and at blank lines; only those of a readable length.
pub fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch == '\n' && chars.peek() == Some(&'\n') {
            push_sentence(&mut current, &mut out);
            continue;
        }
        current.push(if ch == '\n' { ' ' } else { ch });
        if matches!(ch, '.' | '!' | '?') && chars.peek().is_some_and(|c| c.is_whitespace()) {
            push_sentence(&mut current, &mut out);
        }
    }
    push_sentence(&mut current, &mut out);
    out
}

fn push_sentence(current: &mut String, out: &mut Vec<String>) {
    let s = current.split_whitespace().collect::<Vec<_>>().join(" ");
    current.clear();
    let letters = s.chars().filter(|c| c.is_alphabetic()).count();
    if (40..=400).contains(&s.chars().count()) && letters * 2 > s.chars().count() {
        out.push(s);
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// Up to `n` summary sentences. `chunks` are the chunk texts and `vectors`
/// their embeddings (may be empty when embedding was switched off: then
/// every chunk is a candidate).
pub fn summary(
    chunks: &[String],
    vectors: &[Vec<f32>],
    concepts: &[Concept],
    n: usize,
) -> Vec<String> {
    if chunks.is_empty() || n == 0 {
        return Vec::new();
    }
    // The most representative chunks: closest to the centroid.
    let mut candidates: Vec<usize> = (0..chunks.len()).collect();
    if vectors.len() == chunks.len() && !vectors.is_empty() {
        let dim = vectors[0].len();
        let mut centroid = vec![0f32; dim];
        for v in vectors {
            for (c, x) in centroid.iter_mut().zip(v) {
                *c += x;
            }
        }
        candidates.sort_by(|a, b| {
            cosine(&vectors[*b], &centroid).total_cmp(&cosine(&vectors[*a], &centroid))
        });
        candidates.truncate(3.max(chunks.len() / 5));
    }
    let picked = pick_sentences(chunks, &candidates, concepts, n);
    if picked.is_empty() && candidates.len() < chunks.len() {
        // The central passages had no readable sentence (code, tables):
        // look at the whole document.
        let all: Vec<usize> = (0..chunks.len()).collect();
        return pick_sentences(chunks, &all, concepts, n);
    }
    picked
}

fn pick_sentences(
    chunks: &[String],
    candidates: &[usize],
    concepts: &[Concept],
    n: usize,
) -> Vec<String> {
    let key_words: HashSet<&str> = concepts.iter().flat_map(|c| c.phrase.split(' ')).collect();
    let mut seen = HashSet::new();
    let mut scored: Vec<(usize, usize, f64, String)> = Vec::new();
    for &ci in candidates {
        for (si, s) in sentences(&chunks[ci]).into_iter().enumerate() {
            if !seen.insert(s.clone()) {
                continue; // chunk overlap repeats sentences
            }
            let words = phrase_tokens(&s);
            let hits = words
                .iter()
                .flatten()
                .filter(|w| key_words.contains(w.as_str()))
                .count() as f64;
            let score = hits / (words.len() as f64).sqrt().max(1.0);
            scored.push((ci, si, score, s));
        }
    }
    scored.sort_by(|a, b| b.2.total_cmp(&a.2));
    scored.truncate(n);
    scored.sort_by_key(|(ci, si, _, _)| (*ci, *si));
    scored.into_iter().map(|(_, _, _, s)| s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str =
        "Neural network training needs plenty of labelled data. A neural network learns weights \
        from examples. Gradient descent updates the weights of the neural network.\n\n\
        The weather was nice. Gradient descent is an optimization method used for neural \
        network training in practice.";

    #[test]
    fn stop_words_are_sorted_for_binary_search() {
        let mut sorted = STOP_WORDS.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, STOP_WORDS);
    }

    #[test]
    fn keyphrases_find_the_repeated_multiword_terms() {
        let c = concepts(TEXT, 5);
        let phrases: Vec<&str> = c.iter().map(|c| c.phrase.as_str()).collect();
        assert!(phrases.contains(&"neural network training"), "{phrases:?}");
        assert!(phrases.contains(&"gradient descent"), "{phrases:?}");
        assert!(
            !phrases.contains(&"neural"),
            "sub-phrases are folded: {phrases:?}"
        );
        assert!(!phrases.iter().any(|p| p.split(' ').any(is_stop)));
    }

    #[test]
    fn sentences_split_and_filter() {
        let s = sentences(TEXT);
        assert_eq!(s.len(), 4, "{s:?}"); // "The weather was nice." is too short
        assert!(s[0].starts_with("Neural network training"));
    }

    #[test]
    fn summary_prefers_sentences_with_key_terms_in_document_order() {
        let c = concepts(TEXT, 5);
        let chunks = vec![TEXT.to_owned()];
        let s = summary(&chunks, &[], &c, 2);
        assert_eq!(s.len(), 2);
        let all = sentences(TEXT);
        let pos: Vec<usize> = s
            .iter()
            .map(|x| all.iter().position(|a| a == x).unwrap())
            .collect();
        assert!(pos[0] < pos[1], "document order");
    }

    #[test]
    fn empty_input_gives_empty_output() {
        assert!(concepts("", 5).is_empty());
        assert!(summary(&[], &[], &[], 3).is_empty());
    }
}
