"""Tiny synthetic GGUF files (llama, qwen2, Mixtral-style MoE llama, grok) for forward-pass tests.

`write_model_gguf` (and `write_llama_gguf`, its llama form) writes a complete model (hyperparameters, a small byte-level BPE vocabulary and
random weights) with the `gguf` package's own writer, and returns the weights exactly as the file
holds them: for quantised types, the result of quantising and dequantising with `gguf.quants`.
The numpy reference (`numpy_forward.py`) then runs on the very numbers the engine reads.

Layout facts the file follows (checked in ggml-org/llama.cpp, `src/llama-model.cpp`,
`llama_model_rope_type` and `convert_hf_to_gguf.py` `LlamaModel.permute`):

- Tensors are given to the writer as row-major numpy arrays `[rows, cols]`; GGUF records the dims
  reversed (`ne0 = cols` is the contiguous one), so `blk.0.attn_q.weight` of shape
  `[n_embd_q, n_embd]` appears in GGUF as `[n_embd, n_embd_q]`.
- A matrix `W` of shape `[out, in]` is applied as `y = W @ x`.
- The `llama` architecture rotates *adjacent* pairs `(2i, 2i+1)` of each head
  (`LLAMA_ROPE_TYPE_NORM`). Hugging Face checkpoints rotate halves `(i, i + d/2)` instead;
  llama.cpp's converter permutes the rows of `attn_q`/`attn_k` so that adjacent-pair RoPE on the
  GGUF weights equals half-split RoPE on the original ones. Random weights have no "original", so
  they are written as they are and read with adjacent-pair RoPE, as the engine must.
  qwen2 and grok rotate halves (`LLAMA_ROPE_TYPE_NEOX`) on the weights as they are.
- Expert tensors (`blk.N.ffn_{gate,up,down}_exps.weight`) are 3-D: numpy `[n_expert, rows, cols]`,
  GGUF dims `[cols, rows, n_expert]`, each expert's matrix contiguous. The router
  `ffn_gate_inp.weight` (`[n_expert, n_embd]`) stays F32 in quantised files, as llama.cpp's
  quantiser leaves it.
- grok has post-norms `attn_output_norm` and `layer_output_norm` (llama.cpp also accepts
  `post_ffw_norm` for the second), no dense FFN, and ties its output to the token embedding.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import gguf
import numpy as np

# GGUF file types (general.file_type) for the weight types this writer can quantise.
_FILE_TYPE = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}

WEIGHT_TYPES = tuple(_FILE_TYPE)

# The vocabulary: one control token, single-character pieces, then the results of MERGES in order.
END_OF_TEXT = "<|endoftext|>"
_BASE_BYTES = b" \n" + bytes(range(ord("a"), ord("z") + 1)) + b".,!?" + b"0123456789"
MERGES = (
    "Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "a n", "r e", "Ġ s", "e n",
    "a t", "o r", "Ġ w", "i s", "Ġ o", "e s", "in g", "Ġ c", "n d", "Ġa nd",
)  # fmt: skip


def gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the others
    move to code points from U+0100 up, so every byte is one visible character (space is 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    next_code_point = 256
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(next_code_point)
            next_code_point += 1
    return mapping


def gpt2_vocabulary(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Token pieces, token types and merges of a tiny byte-level BPE vocabulary with n_vocab ids.

    Id 0 is `<|endoftext|>` (BOS and EOS). Ids beyond the natural vocabulary are reserved control
    tokens; a smaller n_vocab keeps only the first merges (each merge's parts come before it)."""
    byte_char = gpt2_byte_to_unicode()
    pieces = [END_OF_TEXT] + [byte_char[b] for b in _BASE_BYTES]
    if n_vocab < len(pieces):
        raise ValueError(
            f"n_vocab must be at least {len(pieces)} (the base alphabet), got {n_vocab}"
        )
    merges = list(MERGES[: n_vocab - len(pieces)])
    pieces += [left + right for left, right in (m.split(" ") for m in merges)]
    types = [gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(pieces) - 1)
    reserved = n_vocab - len(pieces)
    pieces += [f"<|reserved_{i}|>" for i in range(reserved)]
    types += [gguf.TokenType.CONTROL] * reserved
    return pieces, [int(t) for t in types], merges


def _stored(values: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(array to hand to the writer, float32 values the file then holds)."""
    qtype = gguf.GGMLQuantizationType[type_name]
    stored = gguf.quants.quantize(values, qtype)
    held = gguf.quants.dequantize(stored, qtype).astype(np.float32).reshape(values.shape)
    return stored, held


ARCHITECTURES = ("llama", "qwen2", "grok")

# The grok multipliers a file may store (keys `grok.<name>`); absent ones take llama.cpp's
# Grok-1 defaults when read.
GROK_MULTIPLIERS = (
    "attn_logit_softcapping",
    "attention.output_scale",
    "embedding_scale",
    "logit_scale",
)
GROK_DEFAULT_EMBEDDING_SCALE = 78.38367176906169


def write_llama_gguf(
    path: str | os.PathLike[str],
    *,
    weight_type: str = "F32",
    n_vocab: int = 64,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 96,
    rope_base: float = 10000.0,
    rms_eps: float = 1e-5,
    context_length: int = 128,
    tied_output: bool = False,
    add_bos: bool = False,
    seed: int = 0,
    type_overrides: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """`write_model_gguf` for a dense llama model (see there)."""
    return write_model_gguf(
        path, arch="llama", weight_type=weight_type, n_vocab=n_vocab, n_embd=n_embd,
        n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff, rope_base=rope_base,
        rms_eps=rms_eps, context_length=context_length, tied_output=tied_output, add_bos=add_bos,
        seed=seed, type_overrides=type_overrides,
    )  # fmt: skip


def write_model_gguf(
    path: str | os.PathLike[str],
    *,
    arch: str = "llama",
    weight_type: str = "F32",
    n_vocab: int = 64,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 96,
    rope_base: float = 10000.0,
    rms_eps: float = 1e-5,
    context_length: int = 128,
    tied_output: bool | None = None,
    add_bos: bool = False,
    seed: int = 0,
    type_overrides: Mapping[str, str] | None = None,
    n_expert: int = 0,
    n_expert_used: int = 0,
    expert_weights_norm: bool | None = None,
    router_scale: float = 2.0,
    grok_multipliers: Mapping[str, float] | None = None,
    grok_ffn_post_norm: str = "layer_output_norm",
) -> dict[str, np.ndarray]:
    """Write a GGUF of architecture `arch` with random weights; return its weights as float32
    arrays.

    arch is "llama" (a mixture of experts when n_expert > 0, like Mixtral), "qwen2" (Q/K/V
    biases) or "grok" (needs n_expert > 0). n_expert_used experts run per token;
    expert_weights_norm, when not None, writes `<arch>.expert_weights_norm`. router_scale spreads
    the router logits (standard deviation about router_scale). grok_multipliers maps names of
    GROK_MULTIPLIERS to the values to store; the others are left out of the file.
    grok_ffn_post_norm names the grok FFN post-norm ("layer_output_norm" or "post_ffw_norm").
    tied_output defaults to True for grok and False otherwise.

    weight_type applies to every matrix (token_embd, attention, FFN, output); norm vectors stay F32
    as in llama.cpp's quantiser. type_overrides maps a tensor name to another type, to build mixes
    like real files (e.g. {"output.weight": "Q8_0"}). Matrix row lengths must be multiples of the
    type's block size (32 for the Q types). The returned dict is keyed by GGUF tensor name, each
    array row-major [rows, cols] (the reverse of the GGUF dims); "output.weight" is absent when
    tied_output is set, in which case the model reuses token_embd.weight.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if arch == "grok" and n_expert == 0:
        raise ValueError("grok models route through experts: give n_expert > 0")
    if n_expert > 0 and not 0 < n_expert_used <= n_expert:
        raise ValueError(f"n_expert_used must be in 1..={n_expert}, got {n_expert_used}")
    if arch == "qwen2" and n_expert > 0:
        raise ValueError("qwen2 here is dense (qwen2moe is a different architecture)")
    if grok_multipliers and arch != "grok":
        raise ValueError("grok_multipliers only apply to arch='grok'")
    unknown_multipliers = set(grok_multipliers or {}) - set(GROK_MULTIPLIERS)
    if unknown_multipliers:
        raise ValueError(f"unknown grok multipliers {sorted(unknown_multipliers)}")
    if grok_ffn_post_norm not in ("layer_output_norm", "post_ffw_norm"):
        raise ValueError(
            f"grok_ffn_post_norm must name a grok FFN post-norm, got {grok_ffn_post_norm!r}"
        )
    if tied_output is None:
        tied_output = arch == "grok"
    for name, value in (("n_embd", n_embd), ("n_head", n_head), ("n_head_kv", n_head_kv)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if n_embd % n_head != 0:
        raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    if n_head % n_head_kv != 0:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({n_head_kv})")
    head_dim = n_embd // n_head
    if head_dim % 2 != 0:
        raise ValueError(f"head dimension must be even for RoPE, got {head_dim}")
    overrides = dict(type_overrides or {})
    for type_name in (weight_type, *overrides.values()):
        if type_name not in _FILE_TYPE:
            raise ValueError(f"weight type must be one of {WEIGHT_TYPES}, got {type_name!r}")

    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
        # Variance 1/cols keeps each product's outputs of order one, as in a trained model.
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def norm_weight() -> np.ndarray:
        # Not all ones, so a forward pass that forgets to multiply by the weight is caught.
        return rng.uniform(0.5, 1.5, size=n_embd).astype(np.float32)

    def experts(rows: int, cols: int) -> np.ndarray:
        return np.stack([matrix(rows, cols) for _ in range(n_expert)])

    def bias(length: int) -> np.ndarray:
        return (rng.standard_normal(length) * 0.5).astype(np.float32)

    n_embd_kv = head_dim * n_head_kv
    # Grok multiplies its embeddings by embedding_scale (sqrt(6144) for Grok-1), so they are
    # stored that much smaller; unit-size embeddings would drown every layer's contribution.
    embedding_std = 1.0
    if arch == "grok":
        embedding_std = 1.0 / float(
            (grok_multipliers or {}).get("embedding_scale", GROK_DEFAULT_EMBEDDING_SCALE)
        )
    values: dict[str, np.ndarray] = {
        "token_embd.weight": (rng.standard_normal((n_vocab, n_embd)) * embedding_std).astype(
            np.float32
        ),
    }
    for layer in range(n_layer):
        prefix = f"blk.{layer}."
        values[prefix + "attn_norm.weight"] = norm_weight()
        values[prefix + "attn_q.weight"] = matrix(n_embd, n_embd)
        values[prefix + "attn_k.weight"] = matrix(n_embd_kv, n_embd)
        values[prefix + "attn_v.weight"] = matrix(n_embd_kv, n_embd)
        values[prefix + "attn_output.weight"] = matrix(n_embd, n_embd)
        if arch == "qwen2":
            values[prefix + "attn_q.bias"] = bias(n_embd)
            values[prefix + "attn_k.bias"] = bias(n_embd_kv)
            values[prefix + "attn_v.bias"] = bias(n_embd_kv)
        if arch == "grok":
            values[prefix + "attn_output_norm.weight"] = norm_weight()
        values[prefix + "ffn_norm.weight"] = norm_weight()
        if n_expert > 0:
            values[prefix + "ffn_gate_inp.weight"] = matrix(n_expert, n_embd, scale=router_scale)
            values[prefix + "ffn_gate_exps.weight"] = experts(n_ff, n_embd)
            values[prefix + "ffn_up_exps.weight"] = experts(n_ff, n_embd)
            values[prefix + "ffn_down_exps.weight"] = experts(n_embd, n_ff)
        else:
            values[prefix + "ffn_gate.weight"] = matrix(n_ff, n_embd)
            values[prefix + "ffn_up.weight"] = matrix(n_ff, n_embd)
            values[prefix + "ffn_down.weight"] = matrix(n_embd, n_ff)
        if arch == "grok":
            values[prefix + f"{grok_ffn_post_norm}.weight"] = norm_weight()
    values["output_norm.weight"] = norm_weight()
    if not tied_output:
        # Scaled so logits spread over a few units and the softmax is not flat.
        values["output.weight"] = matrix(n_vocab, n_embd, scale=3.0)
    unknown = set(overrides) - set(values)
    if unknown:
        raise ValueError(f"type_overrides names tensors the model does not have: {sorted(unknown)}")

    writer = gguf.GGUFWriter(os.fspath(path), arch)
    writer.add_name(f"synthetic-{arch}")
    writer.add_file_type(int(_FILE_TYPE[weight_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_base)
    writer.add_layer_norm_rms_eps(rms_eps)
    writer.add_vocab_size(n_vocab)
    if n_expert > 0:
        writer.add_expert_count(n_expert)
        writer.add_expert_used_count(n_expert_used)
    if expert_weights_norm is not None:
        writer.add_expert_weights_norm(expert_weights_norm)
    for name, value in (grok_multipliers or {}).items():
        writer.add_float32(f"grok.{name}", value)

    pieces, token_types, merges = gpt2_vocabulary(n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(add_bos)

    held: dict[str, np.ndarray] = {}
    for name, value in values.items():
        # Vectors (norms, biases) and the router stay F32, as llama.cpp's quantiser leaves them.
        default_type = "F32" if value.ndim == 1 or "ffn_gate_inp" in name else weight_type
        type_name = overrides.get(name, default_type)
        stored, held[name] = _stored(value, type_name)
        if type_name in ("F32", "F16"):
            writer.add_tensor(name, stored)
        else:
            writer.add_tensor(name, stored, raw_dtype=gguf.GGMLQuantizationType[type_name])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def tensor_types(path: str | os.PathLike[str]) -> dict[str, str]:
    """GGML type name of every tensor in a GGUF file, as recorded in the file."""
    reader = gguf.GGUFReader(os.fspath(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}


def gguf_dims(path: str | os.PathLike[str]) -> dict[str, Sequence[int]]:
    """GGUF dims (ne0 first, the reverse of numpy's row-major shape) of every tensor in a file."""
    reader = gguf.GGUFReader(os.fspath(path))
    return {t.name: [int(d) for d in t.shape] for t in reader.tensors}
