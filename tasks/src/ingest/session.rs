//! The ONNX Runtime session for the model: which model file a process
//! runs, and one padded batch through it.
//!
//! Memory: N pool processes must not hold N copies of the weights. So the
//! session loads a model fused once by `scripts/setup-native`, with
//! run-time optimizations off, which makes ONNX Runtime memory-map its
//! data file: the weights are page-cache pages shared by every process on
//! the host. The first choice, `model.packed.onnx`, also holds ONNX
//! Runtime's pre-packed copies of the weights (re-laid out for the GEMM
//! kernels, ~7 % faster inference), mapped the same way; its layout
//! belongs to the CPU it was packed on, so it is used only if it
//! reproduces the plain model's probe embedding (`probe.json`). Otherwise
//! `model.opt.onnx` with packing off (packing would copy the mapped
//! weights into private memory), and without either `model.onnx` with
//! private weights (logged).

use std::path::Path;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::{RunOptions, Session};
use ort::value::Tensor;

use super::embed::DIM;
use super::native::NativeFiles;

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

/// One padded batch through `session`, mean-pooled and normalized.
pub(super) fn run_session(
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
pub(super) fn load_packed(
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
pub(super) fn load_unpacked(
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
