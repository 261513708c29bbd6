"""A float64 numpy forward pass of the llama architecture, written to be read, not to be fast.

It shares no code with the engine: weights come from the `gguf` package (its reader and its
dequantisers), the maths is spelled out below, and every step runs in float64 so the result is
the exact value of the model up to float64 rounding. Tests compare the engine's logits with it.

The llama architecture as llama.cpp runs GGUF files (ggml-org/llama.cpp, `src/llama-model.cpp`):

    x = token_embd[token]                                   (one row per token)
    for each layer:
        h = rmsnorm(x) * attn_norm
        q, k, v = attn_q @ h, attn_k @ h, attn_v @ h        (per token)
        q, k = rope(q), rope(k)                             adjacent pairs (2i, 2i+1) of each head
        a = softmax(q k^T / sqrt(head_dim) + causal mask) v per head; query head h reads
                                                            kv head h // (n_head / n_head_kv)
        x = x + attn_output @ a
        h = rmsnorm(x) * ffn_norm
        x = x + ffn_down @ (silu(ffn_gate @ h) * (ffn_up @ h))
    logits = output @ (rmsnorm(x) * output_norm)            output = token_embd when tied

RoPE is llama.cpp's LLAMA_ROPE_TYPE_NORM ("a normal RoPE, operating on pairs of consecutive head
values", `llama_model_rope_type`): pair (x[2i], x[2i+1]) of each head turns by the angle
pos * base^(-2i/n_rot). llama.cpp's converter permutes Hugging Face q/k rows so that this equals
HF's rotate-half RoPE on the original weights (`LlamaModel.permute` in `convert_hf_to_gguf.py`);
`rope_neox` below is that half-split form, kept for the test that checks the equivalence.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Callable

import gguf
import numpy as np

Weights = Mapping[str, np.ndarray]
# matmul(x, w) -> x @ w.T for activations x [n_tokens, in] and a weight w [out, in].
MatMul = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    n_rot: int | None = None  # dimensions of each head that RoPE turns; None means all of them
    context_length: int = 2048

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rope_dims(self) -> int:
        return self.head_dim if self.n_rot is None else self.n_rot


# ----------------------------------------------------------------------------
# Reading a llama GGUF with the gguf package (independent of the engine's reader)


def llama_config_from_gguf(reader: gguf.GGUFReader) -> LlamaConfig:
    """Hyperparameters from the `llama.*` keys, with llama.cpp's defaults for optional keys."""

    def value(key: str, default: object = None) -> object:
        field = reader.get_field(key)
        if field is None:
            if default is None:
                raise KeyError(f"GGUF key {key} missing")
            return default
        return field.contents()

    arch = value("general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}, this reference implements 'llama'")
    n_head = int(value("llama.attention.head_count"))  # type: ignore[arg-type]
    n_embd = int(value("llama.embedding_length"))  # type: ignore[arg-type]
    tokens = reader.get_field("tokenizer.ggml.tokens")
    n_vocab_default = len(tokens.data) if tokens is not None else None
    return LlamaConfig(
        n_vocab=int(value("llama.vocab_size", n_vocab_default)),  # type: ignore[arg-type]
        n_embd=n_embd,
        n_layer=int(value("llama.block_count")),  # type: ignore[arg-type]
        n_head=n_head,
        n_head_kv=int(value("llama.attention.head_count_kv", n_head)),  # type: ignore[arg-type]
        n_ff=int(value("llama.feed_forward_length")),  # type: ignore[arg-type]
        rope_base=float(value("llama.rope.freq_base", 10000.0)),  # type: ignore[arg-type]
        rms_eps=float(value("llama.attention.layer_norm_rms_epsilon")),  # type: ignore[arg-type]
        n_rot=int(value("llama.rope.dimension_count", n_embd // n_head)),  # type: ignore[arg-type]
        context_length=int(value("llama.context_length")),  # type: ignore[arg-type]
    )


def read_llama_gguf(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], LlamaConfig]:
    """Weights (dequantised to float32, row-major [rows, cols]) and hyperparameters of a file."""
    reader = gguf.GGUFReader(os.fspath(path))
    weights: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        # GGUF dims list the contiguous dimension first; numpy's shape is the reverse.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weights[tensor.name] = np.asarray(values, dtype=np.float32).reshape(shape)
    return weights, llama_config_from_gguf(reader)


# ----------------------------------------------------------------------------
# The layers


def exact_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T in float64: every weight product of the reference, unless told otherwise."""
    return np.asarray(x, dtype=np.float64) @ np.asarray(w, dtype=np.float64).T


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, over the last axis."""
    mean_square = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(mean_square + eps) * np.asarray(weight, dtype=np.float64)


def rope_angles(positions: np.ndarray, n_rot: int, base: float) -> np.ndarray:
    """[n_tokens, n_rot/2] angles: pair i at position p turns by p * base^(-2i/n_rot)."""
    inverse_frequency = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    return np.outer(np.asarray(positions, dtype=np.float64), inverse_frequency)


def rope_adjacent_pairs(
    x: np.ndarray, positions: np.ndarray, n_rot: int, base: float
) -> np.ndarray:
    """llama.cpp's normal RoPE on x [n_tokens, n_heads, head_dim]: pairs (2i, 2i+1) of the first
    n_rot dims of every head turn; the other dims pass through."""
    angle = rope_angles(positions, n_rot, base)[:, None, :]  # broadcast over heads
    cos, sin = np.cos(angle), np.sin(angle)
    out = np.array(x, dtype=np.float64, copy=True)
    even, odd = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    out[..., 0:n_rot:2] = even * cos - odd * sin
    out[..., 1:n_rot:2] = even * sin + odd * cos
    return out


def rope_neox(x: np.ndarray, positions: np.ndarray, n_rot: int, base: float) -> np.ndarray:
    """Half-split RoPE (LLAMA_ROPE_TYPE_NEOX, Hugging Face's rotate_half): dim i pairs with
    dim i + n_rot/2. Not used by `llama`; here to check the converter's permutation argument."""
    angle = rope_angles(positions, n_rot, base)[:, None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    half = n_rot // 2
    out = np.array(x, dtype=np.float64, copy=True)
    first, second = x[..., 0:half], x[..., half:n_rot]
    out[..., 0:half] = first * cos - second * sin
    out[..., half:n_rot] = first * sin + second * cos
    return out


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - np.max(scores, axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=-1, keepdims=True)


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Grouped-query attention. q [n_tokens, n_head, head_dim]; k, v [n_tokens, n_head_kv,
    head_dim]. Token t attends to tokens 0..=t. Returns [n_tokens, n_head * head_dim]."""
    n_tokens, n_head, head_dim = q.shape
    n_head_kv = k.shape[1]
    group = n_head // n_head_kv  # query heads sharing one kv head
    future = np.triu(np.ones((n_tokens, n_tokens), dtype=bool), k=1)
    out = np.empty((n_tokens, n_head, head_dim), dtype=np.float64)
    for h in range(n_head):
        kv_head = h // group
        scores = q[:, h, :] @ k[:, kv_head, :].T / np.sqrt(head_dim)  # [query, key]
        scores[future] = -np.inf
        out[:, h, :] = softmax(scores) @ v[:, kv_head, :]
    return out.reshape(n_tokens, n_head * head_dim)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), with sigmoid(x) = (1 + tanh(x/2)) / 2 so no exp can overflow."""
    return x * (0.5 * (1.0 + np.tanh(0.5 * x)))


# ----------------------------------------------------------------------------
# The forward pass


def llama_forward(
    weights: Weights,
    config: LlamaConfig,
    token_ids: Sequence[int],
    *,
    matmul: MatMul = exact_matmul,
) -> np.ndarray:
    """Logits [n_tokens, n_vocab] (float64) for token_ids at positions 0, 1, ...

    matmul replaces every weight product x @ w.T; tests use it to model an engine that rounds its
    activations (e.g. to Q8_0 blocks, as llama.cpp does before quantised dot products)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError("token_ids must be a non-empty 1-D sequence")
    if np.any(ids < 0) or np.any(ids >= config.n_vocab):
        raise ValueError(f"token ids must be in [0, {config.n_vocab}), got {ids.tolist()}")
    n_tokens = ids.size
    positions = np.arange(n_tokens)
    head_dim, eps = config.head_dim, config.rms_eps

    x = np.asarray(weights["token_embd.weight"], dtype=np.float64)[ids]  # [n_tokens, n_embd]
    for layer in range(config.n_layer):
        p = f"blk.{layer}."

        # attention block
        h = rmsnorm(x, weights[p + "attn_norm.weight"], eps)
        q = matmul(h, weights[p + "attn_q.weight"]).reshape(n_tokens, config.n_head, head_dim)
        k = matmul(h, weights[p + "attn_k.weight"]).reshape(n_tokens, config.n_head_kv, head_dim)
        v = matmul(h, weights[p + "attn_v.weight"]).reshape(n_tokens, config.n_head_kv, head_dim)
        q = rope_adjacent_pairs(q, positions, config.rope_dims, config.rope_base)
        k = rope_adjacent_pairs(k, positions, config.rope_dims, config.rope_base)
        x = x + matmul(causal_attention(q, k, v), weights[p + "attn_output.weight"])

        # feed-forward block (SwiGLU)
        h = rmsnorm(x, weights[p + "ffn_norm.weight"], eps)
        gate = matmul(h, weights[p + "ffn_gate.weight"])
        up = matmul(h, weights[p + "ffn_up.weight"])
        x = x + matmul(silu(gate) * up, weights[p + "ffn_down.weight"])

    x = rmsnorm(x, weights["output_norm.weight"], eps)
    output = weights.get("output.weight", weights["token_embd.weight"])  # tied when absent
    return matmul(x, output)


# ----------------------------------------------------------------------------
# Comparing results


@dataclasses.dataclass(frozen=True)
class Difference:
    """The worst element of actual - expected, and that error relative to max |expected|."""

    max_abs: float
    relative: float
    index: tuple[int, ...]
    actual: float
    expected: float

    def __str__(self) -> str:
        return (
            f"max |actual - expected| = {self.max_abs:.3e} at {self.index} "
            f"(actual {self.actual:.6g}, expected {self.expected:.6g}); "
            f"relative to max |expected|: {self.relative:.3e}"
        )


def worst_difference(actual: np.ndarray, expected: np.ndarray) -> Difference:
    """Where actual and expected differ most, as llm.c's test prints the max diff per tensor.
    NaN or inf anywhere in actual counts as an infinite difference."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {actual.shape}, expected {expected.shape}")
    delta = np.abs(actual - expected)
    delta[~np.isfinite(delta)] = np.inf
    flat = int(np.argmax(delta))
    index = tuple(int(i) for i in np.unravel_index(flat, delta.shape))
    scale = float(np.max(np.abs(expected)))
    max_abs = float(delta[index])
    return Difference(
        max_abs=max_abs,
        relative=max_abs / scale if scale > 0 else max_abs,
        index=index,
        actual=float(actual[index]),
        expected=float(expected[index]),
    )
