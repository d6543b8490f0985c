"""The PDF ingestion pipeline in Python, for the side-by-side benchmark.

Same stages and parameters as tori-worker's `pdf_ingestion`
(tasks/src/ingest/): pdfium text per page (pypdfium2, the same libpdfium
build), cleaning (NFKC, control characters, repeated header/footer lines,
de-hyphenation), 254-token windows with 32 tokens of overlap from the
model's own tokenizer (HF `tokenizers`, the same tokenizer.json),
all-MiniLM-L6-v2 embeddings with onnxruntime on the SAME model.onnx
(`[CLS] ids [SEP]`, duplicates once, length-sorted batches of at most 64
sequences / 2048 padded tokens, mean pooling, L2 norm), one intra-op
thread and no spinning, as the worker's session; then the same key
concepts (the 60 most frequent candidate phrases ranked by embedding
similarity to the document, with the worker's stop words, read from its
source) and extractive summary. Language detection (whatlang in Rust) is
not ported: it costs well under 1 % there.

`python pypipeline.py raw-ort FILE...` runs only the model on the batches
this pipeline builds for those files and prints JSON: the physical limit
for the embedding stage (benchmark (e)).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NATIVE = Path(os.environ.get("TORI_NATIVE_DIR", HERE.parent / ".tori" / "native"))
MODEL_DIR = Path(os.environ.get("TORI_MODEL_DIR", NATIVE / "minilm"))
CHUNK_SIZE, CHUNK_OVERLAP = 254, 32
MAX_TOKENS, DIM = 256, 384
MAX_BATCH, MAX_BATCH_TOKENS = 64, 8 * 256
CANDIDATES = 60
EDGE_LINES = 3
MIN_TEXT_CHARS = 16

_state: dict = {}


def _tokenizer():
    if "tok" not in _state:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        _state["tok"] = tok
        _state["cls"] = tok.token_to_id("[CLS]")
        _state["sep"] = tok.token_to_id("[SEP]")
    return _state["tok"]


def _session():
    if "sess" not in _state:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        _state["sess"] = ort.InferenceSession(
            str(MODEL_DIR / "model.onnx"), so, providers=["CPUExecutionProvider"])
    return _state["sess"]


# ---------------------------------------------------------------- extract

def extract(data: bytes) -> list[str]:
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(data)
    pages = []
    try:
        for i in range(len(pdf)):
            page = pdf[i]
            try:
                tp = page.get_textpage()
                pages.append(tp.get_text_range())
                tp.close()
            except Exception:  # noqa: BLE001 - a page without text layer
                pages.append("")
            finally:
                page.close()
    finally:
        pdf.close()
    return pages


# ---------------------------------------------------------------- clean

_DROP = {"\u00ad", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\ufffe", "\uffff", "\ufffd"}
_NL = {"\n", "\x0b", "\x0c", "\u2028", "\u2029", "\x85"}


def normalize_page(text: str) -> str:
    text = text.replace("\r\n", "\n")
    buf = []
    for c in text:
        if c == "\r" or c in _NL:
            buf.append("\n")
        elif c == "\x02":
            buf.append("-")
        elif c == "\t":
            buf.append(" ")
        elif c in _DROP or unicodedata.category(c) == "Cc":
            continue
        else:
            buf.append(c)
    nfkc = unicodedata.normalize("NFKC", "".join(buf))
    out, blank = [], 0
    for line in nfkc.split("\n"):
        collapsed = " ".join(line.split())
        if not collapsed:
            blank += 1
            if blank > 1 or not out:
                continue
        else:
            blank = 0
        out.append(collapsed)
    return "\n".join(out).rstrip("\n")


_HYPHEN = re.compile(r"([^\W\d_])-\n([^\W\d_])")


def dehyphenate(text: str) -> str:
    return _HYPHEN.sub(lambda m: m.group(1) + m.group(2) if m.group(2).islower() else m.group(0), text)


def _line_key(line: str) -> str:
    key = []
    for c in line:
        if c.isspace():
            continue
        if "0" <= c <= "9":
            if not key or key[-1] != "#":
                key.append("#")
        else:
            key.append(c.lower())
    return "".join(key)


def remove_headers_footers(pages: list[str]) -> tuple[list[str], int]:
    with_text = sum(1 for p in pages if p.strip())
    if with_text < 3:
        return list(pages), 0
    threshold = max(-(-with_text // 2), 3)
    top: dict[str, int] = {}
    bottom: dict[str, int] = {}
    for page in pages:
        lines = [ln for ln in page.split("\n") if ln.strip()]
        for table, edge in ((top, lines[:EDGE_LINES]), (bottom, lines[::-1][:EDGE_LINES])):
            for k in {_line_key(ln) for ln in edge} - {""}:
                table[k] = table.get(k, 0) + 1
    removed, out = 0, []
    for page in pages:
        lines = page.split("\n")
        non_empty = [i for i, ln in enumerate(lines) if ln.strip()]
        drop = [False] * len(lines)
        for i in non_empty[:EDGE_LINES]:
            if top.get(_line_key(lines[i]), 0) >= threshold:
                drop[i] = True
            else:
                break
        for i in non_empty[::-1][:EDGE_LINES]:
            if bottom.get(_line_key(lines[i]), 0) >= threshold:
                drop[i] = True
            else:
                break
        if all(drop[i] for i in non_empty):
            drop = [False] * len(lines)
        removed += sum(drop)
        out.append("\n".join(ln for ln, d in zip(lines, drop) if not d).strip("\n"))
    return out, removed


def clean(raw: list[str]) -> list[str]:
    pages, _ = remove_headers_footers([normalize_page(p) for p in raw])
    return [dehyphenate(p) for p in pages]


# ---------------------------------------------------------------- chunk

def chunk(pages: list[str]) -> list[dict]:
    tok = _tokenizer()
    toks = []  # (page, id, start, end)
    texts = [(i, p) for i, p in enumerate(pages) if p.strip()]
    # one page at a time, as the worker does (encode_batch would add threads)
    encs = [tok.encode(p, add_special_tokens=False) for _, p in texts]
    for (page, _), enc in zip(texts, encs):
        for tid, (s, e) in zip(enc.ids, enc.offsets):
            toks.append((page, tid, s, e))
    chunks = []
    if not toks:
        return chunks
    step = CHUNK_SIZE - CHUNK_OVERLAP
    begin = 0
    while True:
        end = min(begin + CHUNK_SIZE, len(toks))
        window = toks[begin:end]
        parts, i = [], 0
        while i < len(window):
            page = window[i][0]
            j = i
            while j + 1 < len(window) and window[j + 1][0] == page:
                j += 1
            parts.append(pages[page][window[i][2]:max(window[j][3], window[i][2])])
            i = j + 1
        chunks.append({"page_start": window[0][0] + 1, "page_end": window[-1][0] + 1,
                       "text": "\n".join(parts), "ids": [t[1] for t in window]})
        if end == len(toks):
            break
        begin += step
    return chunks


# ---------------------------------------------------------------- embed

def batches(seqs: list[list[int]]) -> tuple[list[list[int]], list[int], list[list[int]]]:
    """Deduplicated full sequences, slot of each input, and the batches
    (lists of indexes into the unique sequences), as the worker builds them."""
    _tokenizer()
    cls, sep = _state["cls"], _state["sep"]
    unique, slot_of, slots = [], {}, []
    for s in seqs:
        full = (cls, *s[:MAX_TOKENS - 2], sep)
        if full not in slot_of:
            slot_of[full] = len(unique)
            unique.append(list(full))
        slots.append(slot_of[full])
    order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
    out, start = [], 0
    while start < len(order):
        end = start
        while end < len(order) and end - start < MAX_BATCH:
            width = len(unique[order[end]])
            if end > start and (end - start + 1) * width > MAX_BATCH_TOKENS:
                break
            end += 1
        out.append(order[start:end])
        start = end
    return unique, slots, out


def _inputs(rows: list[list[int]]):
    b, s = len(rows), max(len(r) for r in rows)
    ids = np.zeros((b, s), dtype=np.int64)
    mask = np.zeros((b, s), dtype=np.int64)
    for r, seq in enumerate(rows):
        ids[r, :len(seq)] = seq
        mask[r, :len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}, mask


def embed(seqs: list[list[int]]) -> tuple[np.ndarray, dict]:
    sess = _session()
    unique, slots, plan = batches(seqs)
    vectors = np.zeros((len(unique), DIM), dtype=np.float32)
    stats = {"sequences": len(seqs), "unique": len(unique), "batches": len(plan),
             "padded_tokens": 0, "tokens": 0}
    for idx in plan:
        rows = [unique[i] for i in idx]
        feed, mask = _inputs(rows)
        hidden = sess.run(["last_hidden_state"], feed)[0]
        m = mask[:, :, None].astype(np.float32)
        mean = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
        vectors[idx] = mean
        stats["padded_tokens"] += len(rows) * mask.shape[1]
        stats["tokens"] += int(mask.sum())
    return vectors[slots], stats


# ---------------------------------------------------------------- summarize

def _stop_words() -> frozenset:
    if "stop" not in _state:
        src = (HERE.parent / "tasks" / "src" / "ingest" / "summarize.rs").read_text()
        block = src[src.index("const STOP_WORDS"):]
        block = block[:block.index("];")]
        _state["stop"] = frozenset(re.findall(r'"([^"]+)"', block))
    return _state["stop"]


def phrase_tokens(text: str) -> list:
    """Lower-cased content words, None at phrase boundaries (as summarize.rs)."""
    stop = _stop_words()
    out, word = [], []

    def flush():
        if not word:
            return
        w = "".join(word).lower()
        content = any(c.isalpha() for c in w) and len(w) >= 2 and w not in stop
        out.append(w if content else None)
        word.clear()

    for ch in text:
        if ch.isalnum() or (ch == "-" and word):
            word.append(ch)
        else:
            flush()
            if not ch.isspace():
                out.append(None)
    flush()
    return out


def candidates(text: str) -> list:
    counts: dict = {}
    run: list = []
    content_words = 0

    def flush():
        for n in (1, 2, 3):
            for i in range(len(run) - n + 1):
                g = " ".join(run[i:i + n])
                counts[g] = counts.get(g, 0) + 1
        run.clear()

    for tok in phrase_tokens(text):
        if tok is None:
            flush()
        else:
            content_words += 1
            run.append(tok)
    flush()
    min_count = 1 if content_words < 50 else 2
    out = [(p, c) for p, c in counts.items()
           if c >= min_count and sum(ch.isalpha() for ch in p) >= 3]
    out.sort(key=lambda pc: (-pc[1], pc[0]))
    return out


def fold_contained(ranked: list, k: int) -> list:
    kept: list = []
    for c in ranked:
        if any(c["phrase"] != q["phrase"] and f" {c['phrase']} " in f" {q['phrase']} " for q in kept):
            continue
        kept.append(c)
        if len(kept) == k:
            break
    return kept


def concepts_by_embedding(text: str, vectors: np.ndarray, k: int = 10) -> list:
    if len(vectors) == 0:
        return []
    centroid = vectors.sum(axis=0)
    cands = candidates(text)[:CANDIDATES]
    if not cands:
        return []
    tok = _tokenizer()
    seqs = [tok.encode(p, add_special_tokens=False).ids[:MAX_TOKENS - 2] for p, _ in cands]
    vecs, _ = embed(seqs)
    cn = float(np.linalg.norm(centroid))
    ranked = []
    for (phrase, count), v in zip(cands, vecs):
        vn = float(np.linalg.norm(v))
        cos = float(np.dot(centroid, v)) / (cn * vn) if cn and vn else 0.0
        ranked.append({"phrase": phrase, "score": round(max(cos, 0.0), 3), "count": count})
    ranked.sort(key=lambda c: (-c["score"], c["phrase"]))
    return fold_contained(ranked, k)


def sentences(text: str) -> list:
    out, cur = [], []

    def push():
        s = " ".join("".join(cur).split())
        cur.clear()
        letters = sum(c.isalpha() for c in s)
        if 40 <= len(s) <= 400 and letters * 2 > len(s):
            out.append(s)

    n = len(text)
    for i, ch in enumerate(text):
        nxt = text[i + 1] if i + 1 < n else ""
        if ch == "\n" and nxt == "\n":
            push()
            continue
        cur.append(" " if ch == "\n" else ch)
        if ch in ".!?" and nxt.isspace():
            push()
    push()
    return out


def _pick_sentences(chunks: list, cands: list, concepts: list, n: int) -> list:
    key_words = {w for c in concepts for w in c["phrase"].split(" ")}
    seen, scored = set(), []
    for ci in cands:
        for si, s in enumerate(sentences(chunks[ci])):
            if s in seen:
                continue
            seen.add(s)
            words = phrase_tokens(s)
            hits = sum(1 for w in words if w is not None and w in key_words)
            scored.append((ci, si, hits / max(len(words) ** 0.5, 1.0), s))
    scored.sort(key=lambda x: -x[2])
    scored = sorted(scored[:n], key=lambda x: (x[0], x[1]))
    return [s for _, _, _, s in scored]


def summary(chunks: list, vectors: np.ndarray, concepts: list, n: int = 3) -> list:
    if not chunks:
        return []
    cands = list(range(len(chunks)))
    if len(vectors) == len(chunks):
        centroid = vectors.sum(axis=0)
        cn = float(np.linalg.norm(centroid)) or 1.0
        sims = vectors @ centroid / (np.maximum(np.linalg.norm(vectors, axis=1), 1e-12) * cn)
        cands.sort(key=lambda i: -sims[i])
        cands = cands[:max(3, len(chunks) // 5)]
    picked = _pick_sentences(chunks, cands, concepts, n)
    if not picked and len(cands) < len(chunks):
        return _pick_sentences(chunks, list(range(len(chunks))), concepts, n)
    return picked


# ---------------------------------------------------------------- task

def ingest_bytes(file_ref: str, data: bytes, read_ms: float = 0.0) -> dict:
    t0 = time.perf_counter()
    ms = lambda t: round((time.perf_counter() - t) * 1000, 2)  # noqa: E731
    t = time.perf_counter()
    raw = extract(data)
    extract_ms = ms(t)
    t = time.perf_counter()
    pages = clean(raw)
    needs_ocr = [i + 1 for i, p in enumerate(pages) if sum(not c.isspace() for c in p) < MIN_TEXT_CHARS]
    chars = sum(len(p) for p in pages)
    clean_ms = ms(t)
    t = time.perf_counter()
    chunks = chunk(pages)
    chunk_ms = ms(t)
    t = time.perf_counter()
    stats = None
    vectors = np.zeros((0, DIM), dtype=np.float32)
    if chunks:
        vectors, stats = embed([c["ids"] for c in chunks])
    embed_ms = ms(t)
    t = time.perf_counter()
    concepts = concepts_by_embedding("\n\n".join(pages), vectors, 10)
    summ = summary([c["text"] for c in chunks], vectors, concepts, 3)
    summarize_ms = ms(t)
    return {
        "sha256": hashlib.sha256(data).hexdigest(), "file_ref": file_ref, "bytes": len(data),
        "backend": "pypdfium2", "pages": len(pages), "chars": chars,
        "needs_ocr": bool(needs_ocr), "needs_ocr_pages": needs_ocr, "chunks": len(chunks),
        "embedding_model": "all-MiniLM-L6-v2", "embedding_dim": DIM, "embed_stats": stats,
        "concepts": concepts, "summary": summ,
        "timings": {"read_ms": read_ms, "extract_ms": extract_ms, "clean_ms": clean_ms,
                    "chunk_ms": chunk_ms, "embed_ms": embed_ms, "summarize_ms": summarize_ms,
                    "total_ms": round(read_ms + (time.perf_counter() - t0) * 1000, 2)},
    }


def ingest_file(file_ref: str) -> dict:
    root = Path(os.environ.get("TORI_STORAGE_ROOT", "/nonexistent")).resolve()
    t = time.perf_counter()
    path = (root / file_ref).resolve()
    if root not in path.parents:
        raise PermissionError(f"[outside_storage_root] {file_ref}")
    data = path.read_bytes()
    return ingest_bytes(file_ref, data, round((time.perf_counter() - t) * 1000, 2))


def raw_ort(files: list[str]) -> dict:
    """Model-only throughput on the batches this pipeline builds."""
    sess = _session()
    plans = []
    for f in files:
        chunks = chunk(clean(extract(Path(f).read_bytes())))
        if chunks:
            unique, _, plan = batches([c["ids"] for c in chunks])
            plans.append([_inputs([unique[i] for i in idx])[0] for idx in plan])
    # one warm-up run
    if plans:
        sess.run(["last_hidden_state"], plans[0][0])
    n_batches = seqs = padded = 0
    t = time.perf_counter()
    for plan in plans:
        for feed in plan:
            sess.run(["last_hidden_state"], feed)
            n_batches += 1
            seqs += feed["input_ids"].shape[0]
            padded += feed["input_ids"].size
    secs = time.perf_counter() - t
    return {"batches": n_batches, "sequences": seqs, "padded_tokens": padded, "seconds": secs,
            "padded_tokens_per_s": padded / secs if secs else 0.0}


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "raw-ort":
        print(json.dumps(raw_ort(sys.argv[2:])))
    elif len(sys.argv) >= 2 and sys.argv[1] == "ingest":
        for f in sys.argv[2:]:
            print(json.dumps(ingest_bytes(f, Path(f).read_bytes())))
    else:
        print(__doc__)
