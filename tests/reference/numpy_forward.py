"""A float64 numpy forward pass of the llama, qwen2, Mixtral-style MoE llama and grok
architectures, written to be read, not to be fast.

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

The other architectures change that graph in a few places (`forward` below; facts from
llama.cpp's `src/models/{qwen2,grok}.cpp`, `build_moe_ffn` in `src/llama-graph.cpp`, and for
grok from xAI's own `model.py` in xai-org/grok-1):

    qwen2:  q, k, v = attn_q @ h + attn_q.bias, ...     learned Q/K/V biases
            RoPE on split halves (LLAMA_ROPE_TYPE_NEOX: dim i pairs with dim i + n_rot/2)
    MoE (llama.expert_count > 0, i.e. Mixtral), in place of the dense FFN:
            p = softmax(ffn_gate_inp @ h)                  over all experts
            chosen = the expert_used_count largest p      (ties: lower expert index first)
            g = p[chosen] / sum(p[chosen])                renormalised
            ffn = sum_j g_j * expert_{chosen_j}(h)        expert_e(h) = down_e @ (silu(gate_e @ h) * (up_e @ h))
    grok (Grok-1):
            x = token_embd[token] * embedding_scale
            h = rmsnorm(x) * attn_norm; q, k, v without biases; RoPE on split halves
            scores = cap * tanh((q k^T) * attention.output_scale / cap)   no 1/sqrt(head_dim)
            x = x + rmsnorm(attn_output @ a) * attn_output_norm
            h = rmsnorm(x) * ffn_norm
            MoE as above but g = p[chosen] (no renormalisation) and gelu_tanh for silu
            x = x + rmsnorm(moe(h)) * layer_output_norm
            logits = (output @ (rmsnorm(x) * output_norm)) * logit_scale   output = token_embd
    The grok multipliers come from the file, with llama.cpp's Grok-1 values when absent.

RoPE is llama.cpp's LLAMA_ROPE_TYPE_NORM ("a normal RoPE, operating on pairs of consecutive head
values", `llama_model_rope_type`): pair (x[2i], x[2i+1]) of each head turns by the angle
pos * base^(-2i/n_rot). llama.cpp's converter permutes Hugging Face q/k rows so that this equals
HF's rotate-half RoPE on the original weights (`LlamaModel.permute` in `convert_hf_to_gguf.py`);
`rope_neox` below is that half-split form, which qwen2 and grok use directly.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Callable

import gguf
import numpy as np

Weights = Mapping[str, np.ndarray]
# matmul(x, w) -> x @ w.T for activations x [n_tokens, in] and a weight w [out, in].
MatMul = Callable[[np.ndarray, np.ndarray], np.ndarray]


# llama.cpp's Grok-1 multipliers for grok files that do not store them
# (`llama_model_grok::load_arch_hparams`, "defaults for old GGUFs").
GROK_DEFAULTS = {
    "attn_logit_softcapping": 30.0,
    "attention.output_scale": 0.08838834764831845,
    "embedding_scale": 78.38367176906169,
    "logit_scale": 0.5773502691896257,
}

ARCHITECTURES = ("llama", "qwen2", "grok")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
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
    arch: str = "llama"
    # Mixture of experts: 0 experts means a dense feed-forward block.
    n_expert: int = 0
    n_expert_used: int = 0
    renormalize_gates: bool = True
    # grok multipliers; None where the architecture has no such step.
    embedding_scale: float | None = None
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim)
    attn_logit_softcap: float | None = None
    logit_scale: float | None = None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rope_dims(self) -> int:
        return self.head_dim if self.n_rot is None else self.n_rot


# The llama-only name the first tests used; the same class.
LlamaConfig = ModelConfig


# ----------------------------------------------------------------------------
# Reading a GGUF with the gguf package (independent of the engine's reader)


def config_from_gguf(reader: gguf.GGUFReader) -> ModelConfig:
    """Hyperparameters from the `<arch>.*` keys, with llama.cpp's defaults for optional keys."""

    def value(key: str, default: object = None) -> object:
        field = reader.get_field(key)
        if field is None:
            if default is None:
                raise KeyError(f"GGUF key {key} missing")
            return default
        return field.contents()

    arch = value("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"general.architecture is {arch!r}, this reference implements {ARCHITECTURES}"
        )
    n_head = int(value(f"{arch}.attention.head_count"))  # type: ignore[arg-type]
    n_embd = int(value(f"{arch}.embedding_length"))  # type: ignore[arg-type]
    tokens = reader.get_field("tokenizer.ggml.tokens")
    n_vocab_default = len(tokens.data) if tokens is not None else None
    n_expert = int(value(f"{arch}.expert_count", 0))  # type: ignore[arg-type]
    if arch == "grok" and n_expert == 0:
        raise ValueError("grok models need grok.expert_count > 0")
    extra: dict[str, object] = {}
    if arch == "grok":
        multiplier = lambda name: float(value(f"grok.{name}", GROK_DEFAULTS[name]))  # type: ignore[arg-type]
        extra = {
            "embedding_scale": multiplier("embedding_scale"),
            "attn_scale": multiplier("attention.output_scale"),
            "attn_logit_softcap": multiplier("attn_logit_softcapping"),
            "logit_scale": multiplier("logit_scale"),
        }
    return ModelConfig(
        n_vocab=int(value(f"{arch}.vocab_size", n_vocab_default)),  # type: ignore[arg-type]
        n_embd=n_embd,
        n_layer=int(value(f"{arch}.block_count")),  # type: ignore[arg-type]
        n_head=n_head,
        n_head_kv=int(value(f"{arch}.attention.head_count_kv", n_head)),  # type: ignore[arg-type]
        n_ff=int(value(f"{arch}.feed_forward_length")),  # type: ignore[arg-type]
        rope_base=float(value(f"{arch}.rope.freq_base", 10000.0)),  # type: ignore[arg-type]
        rms_eps=float(value(f"{arch}.attention.layer_norm_rms_epsilon")),  # type: ignore[arg-type]
        n_rot=int(value(f"{arch}.rope.dimension_count", n_embd // n_head)),  # type: ignore[arg-type]
        context_length=int(value(f"{arch}.context_length")),  # type: ignore[arg-type]
        arch=str(arch),
        n_expert=n_expert,
        n_expert_used=int(value(f"{arch}.expert_used_count", 0)),  # type: ignore[arg-type]
        # Mixtral renormalises the chosen gates, Grok-1 does not; a file may say otherwise.
        renormalize_gates=bool(value(f"{arch}.expert_weights_norm", arch != "grok")),
        **extra,  # type: ignore[arg-type]
    )


def llama_config_from_gguf(reader: gguf.GGUFReader) -> ModelConfig:
    """`config_from_gguf` for a file that must be of the llama architecture."""
    arch = reader.get_field("general.architecture")
    if arch is None or arch.contents() != "llama":
        found = None if arch is None else arch.contents()
        raise ValueError(f"general.architecture is {found!r}, this reference implements 'llama'")
    return config_from_gguf(reader)


def read_gguf(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """Weights (dequantised to float32, row-major: [rows, cols], or [expert, rows, cols] for
    expert tensors) and hyperparameters of a file."""
    reader = gguf.GGUFReader(os.fspath(path))
    weights: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        # GGUF dims list the contiguous dimension first; numpy's shape is the reverse.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weights[tensor.name] = np.asarray(values, dtype=np.float32).reshape(shape)
    return weights, config_from_gguf(reader)


def read_llama_gguf(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """`read_gguf` for a llama-architecture file."""
    weights, config = read_gguf(path)
    if config.arch != "llama":
        raise ValueError(
            f"general.architecture is {config.arch!r}, this reference implements 'llama'"
        )
    return weights, config


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


def causal_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> np.ndarray:
    """Grouped-query attention. q [n_tokens, n_head, head_dim]; k, v [n_tokens, n_head_kv,
    head_dim]. Token t attends to tokens 0..=t. Returns [n_tokens, n_head * head_dim].

    Scores are q.k * scale (1/sqrt(head_dim) unless given), then softcap * tanh(s / softcap)
    when a soft-cap is given (grok), before the causal softmax."""
    n_tokens, n_head, head_dim = q.shape
    n_head_kv = k.shape[1]
    group = n_head // n_head_kv  # query heads sharing one kv head
    if scale is None:
        scale = 1.0 / np.sqrt(head_dim)
    future = np.triu(np.ones((n_tokens, n_tokens), dtype=bool), k=1)
    out = np.empty((n_tokens, n_head, head_dim), dtype=np.float64)
    for h in range(n_head):
        kv_head = h // group
        scores = q[:, h, :] @ k[:, kv_head, :].T * scale  # [query, key]
        if softcap is not None:
            scores = softcap * np.tanh(scores / softcap)
        scores[future] = -np.inf
        out[:, h, :] = softmax(scores) @ v[:, kv_head, :]
    return out.reshape(n_tokens, n_head * head_dim)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), with sigmoid(x) = (1 + tanh(x/2)) / 2 so no exp can overflow."""
    return x * (0.5 * (1.0 + np.tanh(0.5 * x)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU with the tanh approximation (`jax.nn.gelu`'s default, which Grok-1 calls)."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def top_k_experts(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest probabilities, largest first; equal values in increasing index
    order, as `jax.lax.top_k` returns them."""
    return np.argsort(-probs, kind="stable")[:k]


@dataclasses.dataclass
class RoutingTrace:
    """Per MoE layer, the router probabilities [n_tokens, n_expert] a forward pass computed."""

    probs: list[np.ndarray] = dataclasses.field(default_factory=list)

    def min_selection_margin(self, k: int) -> float:
        """Smallest gap between the k-th and (k+1)-th probability over all tokens and layers:
        how far the activations must move before some token picks a different expert."""
        margins = [
            float(np.min(np.sort(p, axis=-1)[:, -k] - np.sort(p, axis=-1)[:, -k - 1]))
            for p in self.probs
        ]
        return min(margins) if margins else math.inf


def moe_ffn(
    weights: Weights,
    config: ModelConfig,
    prefix: str,
    h: np.ndarray,
    activation: Callable[[np.ndarray], np.ndarray],
    matmul: MatMul,
    trace: RoutingTrace | None = None,
) -> np.ndarray:
    """Routed experts for h [n_tokens, n_embd]: softmax over all experts, the top
    n_expert_used, gates renormalised or not, gated expert FFNs summed by gate."""
    probs = softmax(matmul(h, weights[prefix + "ffn_gate_inp.weight"]))  # [n_tokens, n_expert]
    if trace is not None:
        trace.probs.append(probs)
    gate_exps = weights[prefix + "ffn_gate_exps.weight"]  # [n_expert, n_ff, n_embd]
    up_exps = weights[prefix + "ffn_up_exps.weight"]
    down_exps = weights[prefix + "ffn_down_exps.weight"]  # [n_expert, n_embd, n_ff]
    out = np.zeros_like(h, dtype=np.float64)
    for t in range(h.shape[0]):
        chosen = top_k_experts(probs[t], config.n_expert_used)
        gates = probs[t, chosen]
        if config.renormalize_gates:
            gates = gates / np.sum(gates)
        x = h[t : t + 1]
        for e, g in zip(chosen, gates):
            hidden = activation(matmul(x, gate_exps[e])) * matmul(x, up_exps[e])
            out[t] += g * matmul(hidden, down_exps[e])[0]
    return out


# ----------------------------------------------------------------------------
# The forward pass


def forward(
    weights: Weights,
    config: ModelConfig,
    token_ids: Sequence[int],
    *,
    matmul: MatMul = exact_matmul,
    trace: RoutingTrace | None = None,
) -> np.ndarray:
    """Logits [n_tokens, n_vocab] (float64) for token_ids at positions 0, 1, ...

    matmul replaces every weight product x @ w.T; tests use it to model an engine that rounds its
    activations (e.g. to Q8_0 blocks, as llama.cpp does before quantised dot products). trace,
    when given, receives the router probabilities of every MoE layer."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError("token_ids must be a non-empty 1-D sequence")
    if np.any(ids < 0) or np.any(ids >= config.n_vocab):
        raise ValueError(f"token ids must be in [0, {config.n_vocab}), got {ids.tolist()}")
    if config.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {config.arch!r}")
    n_tokens = ids.size
    positions = np.arange(n_tokens)
    head_dim, eps = config.head_dim, config.rms_eps
    grok = config.arch == "grok"
    # llama's converter permuted Q/K rows for adjacent pairs; qwen2 and grok rotate halves.
    rope = rope_adjacent_pairs if config.arch == "llama" else rope_neox
    activation = gelu_tanh if grok else silu

    def project(h: np.ndarray, name: str, n_heads: int) -> np.ndarray:
        y = matmul(h, weights[name + ".weight"])
        if config.arch == "qwen2":
            y = y + np.asarray(weights[name + ".bias"], dtype=np.float64)
        return y.reshape(n_tokens, n_heads, head_dim)

    x = np.asarray(weights["token_embd.weight"], dtype=np.float64)[ids]  # [n_tokens, n_embd]
    if config.embedding_scale is not None:
        x = x * config.embedding_scale
    for layer in range(config.n_layer):
        p = f"blk.{layer}."

        # attention block
        h = rmsnorm(x, weights[p + "attn_norm.weight"], eps)
        q = project(h, p + "attn_q", config.n_head)
        k = project(h, p + "attn_k", config.n_head_kv)
        v = project(h, p + "attn_v", config.n_head_kv)
        q = rope(q, positions, config.rope_dims, config.rope_base)
        k = rope(k, positions, config.rope_dims, config.rope_base)
        a = causal_attention(q, k, v, scale=config.attn_scale, softcap=config.attn_logit_softcap)
        attn_out = matmul(a, weights[p + "attn_output.weight"])
        if grok:
            attn_out = rmsnorm(attn_out, weights[p + "attn_output_norm.weight"], eps)
        x = x + attn_out

        # feed-forward block: SwiGLU, or routed experts
        h = rmsnorm(x, weights[p + "ffn_norm.weight"], eps)
        if config.n_expert > 0:
            ffn_out = moe_ffn(weights, config, p, h, activation, matmul, trace)
        else:
            gate = matmul(h, weights[p + "ffn_gate.weight"])
            up = matmul(h, weights[p + "ffn_up.weight"])
            ffn_out = matmul(activation(gate) * up, weights[p + "ffn_down.weight"])
        if grok:
            post = p + "layer_output_norm.weight"
            if post not in weights:
                post = p + "post_ffw_norm.weight"
            ffn_out = rmsnorm(ffn_out, weights[post], eps)
        x = x + ffn_out

    x = rmsnorm(x, weights["output_norm.weight"], eps)
    output = weights.get("output.weight", weights["token_embd.weight"])  # tied when absent
    logits = matmul(x, output)
    if config.logit_scale is not None:
        logits = logits * config.logit_scale
    return logits


def llama_forward(
    weights: Weights,
    config: ModelConfig,
    token_ids: Sequence[int],
    *,
    matmul: MatMul = exact_matmul,
) -> np.ndarray:
    """`forward` for the llama architecture (the name the first tests used)."""
    return forward(weights, config, token_ids, matmul=matmul)


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
