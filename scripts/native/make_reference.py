#!/usr/bin/env python3
"""Computes reference sentence embeddings with Python ONNX Runtime for the
Rust embedder's test, on the model that setup-native placed.

    make_reference.py MODEL_DIR OUT.json

MODEL_DIR holds model.onnx and tokenizer.json. Tokenization: the same
tokenizer.json through the Python `tokenizers` package, truncated to 256
tokens, no padding per sentence; the batch is padded to its longest
sentence. Pooling: mean over attended tokens, then L2 norm
(sentence-transformers' all-MiniLM-L6-v2 recipe). The output JSON records the
model's sha256, the token ids and the 384-float vectors.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

MAX_TOKENS = 256

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A worker process keeps one ONNX Runtime session and reuses it for every task.",
    "PDF ingestion turns documents into clean text, chunks and embeddings.",
    "Celery producers call ingest_pdf_task.delay(file_ref) and wait for the result.",
    "Ünïcödé, ligatures like ﬁ and ﬂ, and CJK 漢字 all survive tokenization.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "x",
    "",
    " ".join(["Long sentences are truncated to the model's maximum sequence length."] * 30),
    "Numbers 3.14159, dates 2026-11-28, and e-mail addresses like a.b@example.org.",
]


def main() -> int:
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    model_path = model_dir / "model.onnx"
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    enc = tok.encode_batch(SENTENCES)
    width = max(len(e.ids) for e in enc)

    def pad(rows):
        return np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)

    ids = pad([e.ids for e in enc])
    mask = pad([e.attention_mask for e in enc])
    types = pad([e.type_ids for e in enc])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    (hidden,) = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    m = mask[:, :, None].astype(np.float32)
    pooled = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    vecs = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)

    doc = {
        "about": "Reference embeddings from Python onnxruntime "
                 f"{ort.__version__} for tasks/tests (made by scripts/native/make_reference.py)",
        "model_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "max_tokens": MAX_TOKENS,
        "pooling": "mean over attention_mask, then L2 normalize",
        "items": [
            {"text": s, "input_ids": e.ids, "embedding": [float(x) for x in v]}
            for s, e, v in zip(SENTENCES, enc, vecs.astype(np.float32))
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    items = doc.pop("items")
    head = json.dumps(doc, ensure_ascii=False, indent=1)[:-2]
    body = ",\n  ".join(json.dumps(i, ensure_ascii=False) for i in items)
    out.write_text(f'{head},\n "items": [\n  {body}\n ]\n}}\n')
    return 0


if __name__ == "__main__":
    sys.exit(main())
