//! Sentence/chunk embeddings with all-MiniLM-L6-v2 through ONNX Runtime:
//! `[CLS] ids [SEP]`, mean pooling over the attention mask, L2 norm.
//!
//! One ONNX Runtime environment and one session per process (intra-op
//! threads 1, spinning off: processes scale better than threads here),
//! created on first use and shared by every task run. Which model file
//! the session runs, and why the weights are shared between processes,
//! is [`super::session`]'s.
//!
//! Activations live in ONNX Runtime's CPU arena while a document is
//! embedded (turning the arena off halved throughput here: every batch
//! then page-faults fresh memory), and the arena is given back once the
//! process has not embedded anything for [`RELEASE_AFTER`], so an idle
//! process keeps ~30 MB private instead of the peak of its largest
//! document. Batches are small (2048 padded tokens, 8 full-length
//! sequences): as fast as 32 on this model and a quarter of the peak.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard, Once, OnceLock};
use std::time::{Duration, Instant};

use ort::session::Session;
use tokenizers::Tokenizer;

use super::native::{self, NativeFiles};
pub use super::session::ModelForm;
use super::session::{load_packed, load_unpacked, run_session};

/// The model's maximum sequence length (sentence-transformers' setting),
/// special tokens included.
pub const MAX_TOKENS: usize = 256;
/// Embedding width of all-MiniLM-L6-v2.
pub const DIM: usize = 384;
pub const MODEL_NAME: &str = "all-MiniLM-L6-v2";

/// At most this many padded tokens per inference call: 8 full-length
/// sequences, which ran as fast as 32 with a quarter of the activation
/// memory (see the module docs).
const MAX_BATCH_TOKENS: usize = 8 * MAX_TOKENS;
/// At most this many sequences per call. Short sequences (the concept
/// candidates are 1-3 words) fill a batch by count, not by tokens; with
/// a cap of 8 they took eight calls where one does, and per-call overhead
/// made ranking 60 candidates cost ~40 ms per document.
const MAX_BATCH_SEQS: usize = 64;
/// How long the embedder must go unused before its arena is given back.
/// Back-to-back documents are a pipe round trip apart, so a busy process
/// keeps its arena; an idle one is small a moment after its last job.
pub const RELEASE_AFTER: Duration = Duration::from_millis(250);

/// The process's tokenizer and ONNX session.
pub struct Embedder {
    // Kept alive for the session's lifetime (ort keeps only a weak ref).
    _env: ort::environment::Environment,
    session: Mutex<Session>,
    tokenizer: Tokenizer,
    cls: u32,
    sep: u32,
    usage: Usage,
    form: ModelForm,
}

/// When the embedder was last busy, for giving its arena back when idle.
#[derive(Default)]
struct Usage {
    state: Mutex<UsageState>,
    changed: Condvar,
}

#[derive(Default)]
struct UsageState {
    /// `embed_ids` calls running now.
    active: usize,
    /// End of the last call, if the arena may have grown since the last
    /// release.
    last_end: Option<Instant>,
}

impl Usage {
    fn lock(&self) -> MutexGuard<'_, UsageState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin(&self) -> UsageGuard<'_> {
        self.lock().active += 1;
        UsageGuard(self)
    }

    /// Blocks until the embedder has been idle for [`RELEASE_AFTER`] since
    /// it was last used, then marks the arena released.
    fn wait_until_idle(&self) {
        let mut st = self.lock();
        loop {
            match st.last_end {
                Some(end) if st.active == 0 => {
                    let now = Instant::now();
                    let due = end + RELEASE_AFTER;
                    if now >= due {
                        st.last_end = None;
                        return;
                    }
                    st = self
                        .changed
                        .wait_timeout(st, due - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                _ => st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

/// Marks one `embed_ids` call as running until dropped (errors and
/// panics included).
struct UsageGuard<'a>(&'a Usage);

impl Drop for UsageGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.active -= 1;
        st.last_end = Some(Instant::now());
        drop(st);
        self.0.changed.notify_one();
    }
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").finish_non_exhaustive()
    }
}

static EMBEDDER: OnceLock<Result<Embedder, String>> = OnceLock::new();

/// Statistics of one [`Embedder::embed_ids`] call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EmbedStats {
    /// Sequences asked for.
    pub sequences: usize,
    /// Distinct sequences actually run (duplicates are embedded once).
    pub unique: usize,
    pub batches: usize,
    /// Tokens run, padding included, and without padding.
    pub padded_tokens: usize,
    pub tokens: usize,
}

impl Embedder {
    /// The process-wide embedder, loading ONNX Runtime, the tokenizer and
    /// the model on first call. Later calls return the same instance (the
    /// `files` of the first call win).
    pub fn global(files: &NativeFiles) -> Result<&'static Embedder, String> {
        let embedder = EMBEDDER
            .get_or_init(|| Self::load(files))
            .as_ref()
            .map_err(Clone::clone)?;
        static RELEASER: Once = Once::new();
        RELEASER.call_once(|| {
            let spawned = std::thread::Builder::new()
                .name("embed-arena-release".into())
                .spawn(move || embedder.release_when_idle());
            if let Err(e) = spawned {
                // Only memory is at stake: the arena then keeps its peak.
                eprintln!("tori-worker: no arena release thread: {e}");
            }
        });
        Ok(embedder)
    }

    /// Gives ONNX Runtime's arena back each time the embedder goes idle.
    /// ONNX Runtime shrinks only at the end of a run, so this runs the
    /// smallest possible batch (`[CLS] [SEP]`, well under a millisecond)
    /// with shrinkage on.
    fn release_when_idle(&self) {
        loop {
            self.usage.wait_until_idle();
            if let Err(e) = self.run_batch(&[&[self.cls, self.sep]], true) {
                eprintln!("tori-worker: releasing the embedding arena failed: {e}");
            }
        }
    }

    fn load(files: &NativeFiles) -> Result<Embedder, String> {
        files.status()?;
        let tokenizer = load_tokenizer(&files.tokenizer_json())?;
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| format!("tokenizer has no {t} token"))
        };
        let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
        let env = ort::init_from(&files.ort_lib)
            .map_err(|e| {
                format!(
                    "could not load ONNX Runtime from {}: {e} (run scripts/setup-native, \
                     which places onnxruntime 1.31.1)",
                    files.ort_lib.display()
                )
            })?
            .with_name("tori-worker")
            .build()
            .map_err(|e| format!("ONNX Runtime environment: {e}"))?;
        native::count_ort_load();
        let (session, form) = match load_packed(&env, files) {
            Ok(Some(session)) => (session, ModelForm::Packed),
            Ok(None) => load_unpacked(&env, files)?,
            Err(why) => {
                eprintln!(
                    "tori-worker: not using {}: {why}; loading the unpacked form",
                    files.model_packed_onnx().display()
                );
                load_unpacked(&env, files)?
            }
        };
        native::count_model_load();
        Ok(Embedder {
            _env: env,
            session: Mutex::new(session),
            tokenizer,
            cls,
            sep,
            usage: Usage::default(),
            form,
        })
    }

    /// Which model file this process runs.
    pub fn form(&self) -> ModelForm {
        self.form
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of `text` without special tokens, truncated so that with
    /// `[CLS]`/`[SEP]` they fit [`MAX_TOKENS`].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| format!("tokenizer: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        ids.truncate(MAX_TOKENS - 2);
        Ok(ids)
    }

    /// Embeds texts (see [`Embedder::encode`] and [`Embedder::embed_ids`]).
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        let ids = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.embed_ids(&ids, &mut || true)?.0)
    }

    /// The full input ids for content ids: `[CLS] ids [SEP]`, truncated.
    pub fn with_specials(&self, ids: &[u32]) -> Vec<u32> {
        let n = ids.len().min(MAX_TOKENS - 2);
        let mut v = Vec::with_capacity(n + 2);
        v.push(self.cls);
        v.extend_from_slice(&ids[..n]);
        v.push(self.sep);
        v
    }

    /// Embeds token sequences (content ids, without special tokens): one
    /// L2-normalized [`DIM`]-vector per sequence, in input order.
    ///
    /// Identical sequences are run once; the rest are sorted by length and
    /// batched so padding is small. `keep_going` is asked before each
    /// batch; `false` stops with `Err("cancelled")`.
    pub fn embed_ids(
        &self,
        seqs: &[Vec<u32>],
        keep_going: &mut dyn FnMut() -> bool,
    ) -> Result<(Vec<Vec<f32>>, EmbedStats), String> {
        let _busy = self.usage.begin();
        let mut stats = EmbedStats {
            sequences: seqs.len(),
            ..EmbedStats::default()
        };
        // Deduplicate.
        let mut unique: Vec<Vec<u32>> = Vec::new();
        let mut slot_of: HashMap<Vec<u32>, usize> = HashMap::new();
        let mut slots = Vec::with_capacity(seqs.len());
        for s in seqs {
            let full = self.with_specials(s);
            let next = unique.len();
            let slot = *slot_of.entry(full.clone()).or_insert_with(|| {
                unique.push(full);
                next
            });
            slots.push(slot);
        }
        stats.unique = unique.len();
        // Sort by length and batch.
        let mut order: Vec<usize> = (0..unique.len()).collect();
        order.sort_by_key(|&i| unique[i].len());
        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); unique.len()];
        let mut start = 0;
        while start < order.len() {
            let mut end = start;
            while end < order.len() && end - start < MAX_BATCH_SEQS {
                // sorted ascending, so the candidate is the longest so far
                let width = unique[order[end]].len();
                if end > start && (end - start + 1) * width > MAX_BATCH_TOKENS {
                    break;
                }
                end += 1;
            }
            if !keep_going() {
                return Err("cancelled".into());
            }
            let batch: Vec<&[u32]> = order[start..end]
                .iter()
                .map(|&i| unique[i].as_slice())
                .collect();
            let out = self.run_batch(&batch, false)?;
            stats.batches += 1;
            stats.padded_tokens += batch.len() * batch.iter().map(|b| b.len()).max().unwrap_or(0);
            stats.tokens += batch.iter().map(|b| b.len()).sum::<usize>();
            for (k, v) in out.into_iter().enumerate() {
                vectors[order[start + k]] = v;
            }
            start = end;
        }
        Ok((slots.iter().map(|&s| vectors[s].clone()).collect(), stats))
    }

    /// Runs one padded batch and pools it; `shrink`: give the arena's
    /// unused memory back afterwards.
    fn run_batch(&self, batch: &[&[u32]], shrink: bool) -> Result<Vec<Vec<f32>>, String> {
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        run_session(&mut session, batch, shrink)
    }
}

fn load_tokenizer(path: &Path) -> Result<Tokenizer, String> {
    let mut tokenizer = Tokenizer::from_file(path)
        .map_err(|e| format!("could not load tokenizer {}: {e}", path.display()))?;
    // tokenizer.json ships padding/truncation for 128-token batches; this
    // module pads and truncates itself.
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| format!("tokenizer: {e}"))?;
    Ok(tokenizer)
}
