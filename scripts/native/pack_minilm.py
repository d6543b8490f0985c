"""Writes the fastest run-time form of the model for THIS machine: the
optimized graph with ONNX Runtime's pre-packed weights saved in the data
file (`session.save_external_prepacked_constant_initializers`), plus a
probe the worker checks it against before use.

Why: pre-packing (weights re-laid out for the GEMM kernels) is worth ~7 %
of inference time here, but ONNX Runtime normally packs into private heap
memory, once per process, which is what `model.opt.onnx` avoids. Saved in
the data file, the packed weights are memory-mapped like the others and
shared by every pool process (measured: same private memory as the
unpacked form, 4,485 -> 4,792 padded tokens/s on one core).

The packed layout belongs to the kernels of the CPU it was made on, so
these files are not checksummed like the others; instead `probe.json`
holds a reference embedding computed from the plain `model.onnx`, and the
worker uses the packed form only if it reproduces that embedding (to
1e-4); otherwise it logs why and loads `model.opt.onnx`.

Usage: pack_minilm.py MODEL_DIR   (reads model.onnx, writes
model.packed.onnx, model.packed.onnx.data and probe.json next to it)
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

PROBE_TEXT = ("tori-worker checks that the pre-packed model on this machine "
              "embeds this sentence like the plain one.")


def embed(sess: ort.InferenceSession, ids: list[int]) -> np.ndarray:
    x = np.array([ids], dtype=np.int64)
    (hidden,) = sess.run(["last_hidden_state"], {
        "input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)})
    v = hidden[0].mean(0)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def main() -> None:
    d = Path(sys.argv[1])
    out, data_name = d / "model.packed.onnx", "model.packed.onnx.data"
    for p in (out, d / data_name, d / "probe.json"):
        p.unlink(missing_ok=True)
    so = ort.SessionOptions()
    # The same fusions as model.opt.onnx ("extended"); "all" would add
    # layout transforms tied to this CPU's instruction set.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out)
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    ort.InferenceSession(str(d / "model.onnx"), so, providers=["CPUExecutionProvider"])
    if not out.is_file() or not (d / data_name).is_file():
        sys.exit(f"ONNX Runtime did not write {out} and its data file")

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.no_padding()
    ids = tok.encode(PROBE_TEXT).ids
    plain = ort.SessionOptions()
    plain.intra_op_num_threads = 1
    reference = embed(ort.InferenceSession(str(d / "model.onnx"), plain,
                                           providers=["CPUExecutionProvider"]), ids)
    (d / "probe.json").write_text(json.dumps({
        "about": "reference embedding from the plain model.onnx (scripts/native/pack_minilm.py); "
                 "the worker uses model.packed.onnx only if it reproduces this to 1e-4",
        "text": PROBE_TEXT,
        "input_ids": ids,
        "embedding": [float(x) for x in reference.astype(np.float32)],
    }) + "\n")


if __name__ == "__main__":
    main()
