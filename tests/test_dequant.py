"""Dequantisation through the engine, bit for bit against the `gguf` package's numpy
implementation (independent of ours): synthetic tensors of every supported type, and one
tensor of every type present in the real models."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from sampler_sdk import read_tensor  # noqa: E402

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def _random_blocks(qtype, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random block bytes with the f16 scale fields set to finite values, so every
    possible nibble/bit pattern is exercised but no NaN/Inf scale makes the comparison moot."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if qtype == Q.F32:
        return rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8)
    if qtype == Q.F16:
        return rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        f = rng.standard_normal(n_blocks).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)

    def f16(n):
        return (rng.uniform(-1, 1, size=(n_blocks, n)) * 0.05).astype(np.float16).view(np.uint8)

    # Positions of the f16 fields inside each block, from ggml's block layouts.
    if qtype in (Q.Q4_0, Q.Q5_0, Q.Q8_0):
        raw[:, 0:2] = f16(1)
    elif qtype in (Q.Q4_1, Q.Q5_1):
        raw[:, 0:4] = f16(2)
    elif qtype == Q.Q2_K:
        raw[:, type_size - 4 : type_size] = f16(2)
    elif qtype in (Q.Q3_K, Q.Q6_K):
        raw[:, type_size - 2 : type_size] = f16(1)
    elif qtype in (Q.Q4_K, Q.Q5_K):
        raw[:, 0:4] = f16(2)
    return raw.reshape(-1)


@pytest.fixture(scope="module")
def synthetic_file(tmp_path_factory):
    rng = np.random.default_rng(1234)
    path = tmp_path_factory.mktemp("dequant") / "all_types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    expected = {}
    for qtype in ALL_TYPES:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        rows, cols = 3, 2 * 256
        n_blocks = rows * cols // block_size
        raw = _random_blocks(qtype, n_blocks, rng)
        if qtype in (Q.F32, Q.F16, Q.BF16):
            raw = _random_blocks(qtype, rows * cols, rng)
        data = raw.reshape(rows, cols // block_size * type_size)
        name = f"t_{qtype.name}"
        if qtype == Q.F32:
            writer.add_tensor(name, data.view(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(name, data.view(np.float16))
        else:
            writer.add_tensor(name, data, raw_dtype=qtype)
        expected[name] = gguf.quants.dequantize(data, qtype).reshape(rows, cols)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, expected


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_synthetic_tensor_matches_gguf_package_bit_for_bit(synthetic_file, qtype):
    path, expected = synthetic_file
    name = f"t_{qtype.name}"
    ours = read_tensor(str(path), name)
    ref = expected[name].astype(np.float32)
    assert ours.shape == ref.shape
    mismatch = np.flatnonzero(ours.view(np.uint32) != ref.view(np.uint32))
    assert mismatch.size == 0, f"{qtype.name}: {mismatch.size} elements differ, first at {mismatch[0]}: {ours.flat[mismatch[0]]} vs {ref.flat[mismatch[0]]}"


def _one_tensor_per_type(path):
    reader = gguf.GGUFReader(str(path))
    chosen = {}
    for t in reader.tensors:
        if t.tensor_type not in chosen and t.n_elements <= 2_000_000:
            chosen[t.tensor_type] = t
    return chosen


@pytest.mark.parametrize("model_fixture", ["smollm_path", "gemma_path"])
def test_real_model_tensors_match_gguf_package(request, model_fixture):
    path = request.getfixturevalue(model_fixture)
    for qtype, t in _one_tensor_per_type(path).items():
        ref = gguf.quants.dequantize(t.data, qtype).astype(np.float32).reshape(ours_shape := tuple(int(d) for d in reversed(t.shape)))
        ours = read_tensor(str(path), t.name)
        assert ours.shape == ours_shape, t.name
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), f"{t.name} ({qtype.name}) differs"
