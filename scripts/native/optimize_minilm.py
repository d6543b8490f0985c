"""Writes the run-time form of the model: ONNX Runtime's own graph
optimizations (attention, GELU and layer-norm fusions: the "extended" level)
applied once here, and every weight in a separate, page-aligned data file.

Why: a worker process that loads `model.onnx` optimizes it itself and packs
the weights into private heap memory, so N pool processes hold N copies of
the ~90 MB of weights. Loading this form with optimizations and pre-packing
off, ONNX Runtime memory-maps the data file instead; the pages are shared
through the page cache by every process on the host (measured: private
memory per process from ~270 MB to ~30 MB, see benches/RESULTS.md).

Usage: optimize_minilm.py MODEL_DIR   (reads model.onnx, writes
model.opt.onnx and model.opt.onnx.data next to it)
"""
import sys
from pathlib import Path

import onnxruntime as ort


def main() -> None:
    d = Path(sys.argv[1])
    out = d / "model.opt.onnx"
    data_name = "model.opt.onnx.data"
    for p in (out, d / data_name):
        p.unlink(missing_ok=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out)
    so.intra_op_num_threads = 1
    so.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", data_name)
    so.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(d / "model.onnx"), so, providers=["CPUExecutionProvider"])
    if not out.is_file() or not (d / data_name).is_file():
        sys.exit(f"ONNX Runtime did not write {out} and its data file")


if __name__ == "__main__":
    main()
