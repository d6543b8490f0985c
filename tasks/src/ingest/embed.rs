//! Sentence/chunk embeddings with all-MiniLM-L6-v2 through ONNX Runtime:
//! `[CLS] ids [SEP]`, mean pooling over the attention mask, L2 norm.
//!
//! One ONNX Runtime environment and one session per process (intra-op
//! threads 1, spinning off: processes scale better than threads here),
//! created on first use and shared by every task run.
//!
//! Memory: N pool processes must not hold N copies of the weights, nor
//! keep the peak of the largest batch they ever ran. So the session loads
//! a model fused once by `scripts/setup-native`, with run-time
//! optimizations off, which makes ONNX Runtime memory-map its data file:
//! the weights are page-cache pages shared by every process on the host.
//! The first choice, `model.packed.onnx`, also holds ONNX Runtime's
//! pre-packed copies of the weights (re-laid out for the GEMM kernels,
//! ~7 % faster inference), mapped the same way; its layout belongs to the
//! CPU it was packed on, so it is used only if it reproduces the plain
//! model's probe embedding (`probe.json`). Otherwise `model.opt.onnx`
//! with packing off (packing would copy the mapped weights into private
//! memory). Activations live in ONNX
//! Runtime's CPU arena while a document is embedded (turning the arena
//! off halved throughput here: every batch then page-faults fresh memory)
//! and the arena is given back once the process has not embedded anything
//! for [`RELEASE_AFTER`], so an idle process keeps ~30 MB private instead
//! of the peak of its largest document. Shrinking after every call instead
//! made each document start by page-faulting its arena back in, which cost
//! 5-10 % of the embedding stage on a busy worker. Batches are small (2048 padded tokens, 8 full-length
//! sequences): as fast as 32 on this model and a quarter of the peak.
//! Without either it falls back to `model.onnx` (private weights; logged).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard, Once, OnceLock};
use std::time::{Duration, Instant};

use ort::session::builder::GraphOptimizationLevel;
use ort::session::{RunOptions, Session};
use ort::value::Tensor;
use tokenizers::Tokenizer;

use super::native::{self, NativeFiles};

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

/// The model file a process loaded, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelForm {
    /// `model.packed.onnx`: weights and their pre-packed copies mapped
    /// from the data file, shared by every process.
    Packed,
    /// `model.opt.onnx`: weights mapped and shared; packing off.
    Shared,
    /// `model.onnx`: private weights in every process (fallback).
    Private,
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

/// One padded batch through `session`, mean-pooled and normalized.
fn run_session(
    session: &mut Session,
    batch: &[&[u32]],
    shrink: bool,
) -> Result<Vec<Vec<f32>>, String> {
    let b = batch.len();
    let s = batch.iter().map(|x| x.len()).max().unwrap_or(0);
    let mut ids = vec![0i64; b * s];
    let mut mask = vec![0i64; b * s];
    for (r, seq) in batch.iter().enumerate() {
        for (c, &id) in seq.iter().enumerate() {
            ids[r * s + c] = i64::from(id);
            mask[r * s + c] = 1;
        }
    }
    let types = vec![0i64; b * s];
    let shape = [b as i64, s as i64];
    let t = |v: Vec<i64>| Tensor::from_array((shape, v)).map_err(|e| format!("tensor: {e}"));
    let inputs = ort::inputs![
        "input_ids" => t(ids)?,
        "attention_mask" => t(mask.clone())?,
        "token_type_ids" => t(types)?,
    ];
    let mut options = RunOptions::new().map_err(|e| format!("run options: {e}"))?;
    if shrink {
        options
            .set("memory.enable_memory_arena_shrinkage", "cpu:0")
            .map_err(|e| format!("run options: {e}"))?;
    }
    let outputs = session
        .run_with_options(inputs, &options)
        .map_err(|e| format!("ONNX Runtime run failed: {e}"))?;
    let (out_shape, data) = outputs["last_hidden_state"]
        .try_extract_tensor::<f32>()
        .map_err(|e| format!("model output: {e}"))?;
    let dims: Vec<i64> = out_shape.iter().copied().collect();
    if dims != [b as i64, s as i64, DIM as i64] {
        return Err(format!(
            "model output has shape {dims:?}, expected [{b}, {s}, {DIM}]"
        ));
    }
    Ok((0..b)
        .map(|r| {
            pool(
                &data[r * s * DIM..(r + 1) * s * DIM],
                &mask[r * s..(r + 1) * s],
            )
        })
        .collect())
}

/// The largest difference a packed model may show against the plain
/// model's probe embedding (the reference test's tolerance).
const PROBE_TOLERANCE: f32 = 1e-4;

/// `[CLS] ids [SEP]` and the plain model's embedding of them, written by
/// `scripts/native/pack_minilm.py`.
#[derive(Debug, serde::Deserialize)]
pub struct Probe {
    pub input_ids: Vec<u32>,
    pub embedding: Vec<f32>,
}

impl Probe {
    /// `Err` with the largest difference when `got` does not reproduce
    /// the reference within [`PROBE_TOLERANCE`].
    pub fn check(&self, got: &[f32]) -> Result<(), String> {
        if got.len() != self.embedding.len() {
            return Err(format!(
                "probe embedding has {} values, expected {}",
                got.len(),
                self.embedding.len()
            ));
        }
        let worst = got
            .iter()
            .zip(&self.embedding)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        if worst.is_nan() || worst > PROBE_TOLERANCE {
            return Err(format!(
                "its probe embedding differs from the plain model's by {worst:e} \
                 (tolerance {PROBE_TOLERANCE:e}); it was probably packed on another CPU \
                 (re-run scripts/setup-native on this host)"
            ));
        }
        Ok(())
    }
}

/// The packed form, if it is there and reproduces its probe on this CPU.
fn load_packed(
    env: &ort::environment::Environment,
    files: &NativeFiles,
) -> Result<Option<Session>, String> {
    let (model, probe) = (files.model_packed_onnx(), files.probe_json());
    if !model.is_file() || !probe.is_file() {
        return Ok(None);
    }
    let probe: Probe = std::fs::read(&probe)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| format!("cannot read {}: {e}", probe.display()))?;
    let mut session = build_session(env, &model, ModelForm::Packed)
        .map_err(|e| format!("ONNX Runtime could not load it: {e}"))?;
    let got = run_session(&mut session, &[&probe.input_ids], true)?;
    probe.check(&got[0])?;
    Ok(Some(session))
}

/// `model.opt.onnx` (shared weights), else `model.onnx` (private).
fn load_unpacked(
    env: &ort::environment::Environment,
    files: &NativeFiles,
) -> Result<(Session, ModelForm), String> {
    let shared = files.model_opt_onnx();
    let (model, form) = if shared.is_file() {
        (shared, ModelForm::Shared)
    } else {
        eprintln!(
            "tori-worker: {} is missing (run scripts/setup-native); loading {} with \
             private weights in every process",
            shared.display(),
            files.model_onnx().display()
        );
        (files.model_onnx(), ModelForm::Private)
    };
    let session = build_session(env, &model, form)
        .map_err(|e| format!("could not load the model {}: {e}", model.display()))?;
    Ok((session, form))
}

/// Mean over the attended positions of `[seq, DIM]` hidden states, then
/// L2 normalization.
pub fn pool(hidden: &[f32], mask: &[i64]) -> Vec<f32> {
    let mut acc = vec![0f64; DIM];
    let mut n = 0f64;
    for (pos, &m) in mask.iter().enumerate() {
        if m == 0 {
            continue;
        }
        n += 1.0;
        for (a, &h) in acc.iter_mut().zip(&hidden[pos * DIM..(pos + 1) * DIM]) {
            *a += f64::from(h);
        }
    }
    let n = n.max(1e-9);
    let mean: Vec<f64> = acc.iter().map(|a| a / n).collect();
    let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    mean.iter().map(|x| (x / norm) as f32).collect()
}

/// A session for `model` in `form` (see the module docs).
fn build_session(
    env: &ort::environment::Environment,
    model: &Path,
    form: ModelForm,
) -> ort::Result<Session> {
    let builder = Session::builder(env)?
        .with_intra_threads(1)?
        .with_inter_threads(1)?
        .with_intra_op_spinning(false)?
        .with_inter_op_spinning(false)?;
    let mut builder = match form {
        // Already optimized; optimizing again would copy the mapped
        // weights. Packing reads the packed copies from the data file.
        ModelForm::Packed => builder.with_optimization_level(GraphOptimizationLevel::Disable)?,
        // Packing here would copy the mapped weights into private memory.
        ModelForm::Shared => builder
            .with_optimization_level(GraphOptimizationLevel::Disable)?
            .with_prepacking(false)?,
        ModelForm::Private => builder.with_optimization_level(GraphOptimizationLevel::Level3)?,
    };
    builder.commit_from_file(model)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_accepts_within_tolerance_and_names_the_difference_otherwise() {
        let probe = Probe {
            input_ids: vec![101, 102],
            embedding: vec![0.5, -0.25],
        };
        assert!(probe.check(&[0.50005, -0.25]).is_ok());
        let err = probe.check(&[0.5, -0.2]).unwrap_err();
        assert!(
            err.contains("differs from the plain model's by 4.99")
                && err.contains("tolerance 1e-4"),
            "{err}"
        );
        assert!(probe.check(&[0.5]).is_err());
        assert!(probe.check(&[f32::NAN, 0.0]).is_err());
    }
}
