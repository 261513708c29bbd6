#!/usr/bin/env python3
"""Writes the small broken GGUF files in this directory, each named for what it breaks.

Only the standard library (`struct`) is used, so the bytes are exactly what is written
here and not what some GGUF library would allow. Re-run after editing:

    python3 tests/malformed/make_malformed.py

Outputs, beside this script: one `<name>.gguf` per case, `expected.tsv` (file, engine
error kind, a substring the error message must contain) and the case list in README.md.
The Rust test `gguf::tests::malformed_files` and the Python binding tests read them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

# GGUF value type ids (gguf.h).
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)

# ggml tensor types used here: id -> (block size, bytes per block).
F32_T, Q8_0_T, Q4_K_T = 0, 8, 12
GEOMETRY = {F32_T: (1, 4), Q8_0_T: (32, 34), Q4_K_T: (256, 144)}


def gguf_str(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def value(type_id: int, payload: bytes) -> tuple[int, bytes]:
    return type_id, payload


def u32(v: int) -> tuple[int, bytes]:
    return U32, struct.pack("<I", v)


def u64(v: int) -> tuple[int, bytes]:
    return U64, struct.pack("<Q", v)


def string(s: str | bytes) -> tuple[int, bytes]:
    return STRING, gguf_str(s)


def array(element_type: int, count: int, body: bytes) -> tuple[int, bytes]:
    return ARRAY, struct.pack("<IQ", element_type, count) + body


def str_array(items: list[str | bytes]) -> tuple[int, bytes]:
    return array(STRING, len(items), b"".join(gguf_str(s) for s in items))


def f32_array(items: list[float]) -> tuple[int, bytes]:
    return array(F32, len(items), struct.pack(f"<{len(items)}f", *items))


@dataclass
class Tensor:
    name: str | bytes
    dims: list[int]
    type_id: int
    offset: int | None = None  # relative to the data section; None = running padded sum
    data_len: int | None = None  # None = what type and dims imply
    n_dims: int | None = None  # None = len(dims)


@dataclass
class Gguf:
    magic: bytes = b"GGUF"
    version: int = 3
    version_big_endian: bool = False
    kvs: list[tuple[str | bytes, tuple[int, bytes]]] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    n_tensors: int | None = None
    n_kv: int | None = None
    align: int = 32

    def build(self) -> bytes:
        out = bytearray(self.magic)
        out += struct.pack(">I" if self.version_big_endian else "<I", self.version)
        n_tensors = len(self.tensors) if self.n_tensors is None else self.n_tensors
        n_kv = len(self.kvs) if self.n_kv is None else self.n_kv
        out += struct.pack("<QQ", n_tensors, n_kv)
        for key, (type_id, payload) in self.kvs:
            out += gguf_str(key) + struct.pack("<I", type_id) + payload

        def pad(n: int) -> int:
            return -(-n // self.align) * self.align

        running, extents = 0, []
        for t in self.tensors:
            out += gguf_str(t.name)
            out += struct.pack("<I", len(t.dims) if t.n_dims is None else t.n_dims)
            out += b"".join(struct.pack("<Q", d) for d in t.dims)
            offset = running if t.offset is None else t.offset
            out += struct.pack("<IQ", t.type_id, offset)
            if t.data_len is None:
                block, size = GEOMETRY[t.type_id]
                n = 1
                for d in t.dims:
                    n *= d
                length = n // block * size
            else:
                length = t.data_len
            extents.append(offset + length)
            running = pad(offset + length)
        if self.tensors:
            out += bytes(pad(len(out)) - len(out))
            end = min(max(extents), 1 << 16)
            out += bytes(i % 251 for i in range(end))
        return bytes(out)


def valid() -> Gguf:
    """A small well-formed file; every case below breaks one thing in it."""
    return Gguf(
        kvs=[
            ("general.architecture", string("llama")),
            ("llama.block_count", u32(1)),
            ("tokenizer.ggml.tokens", str_array(["<s>", "</s>", "a", "b"])),
            ("tokenizer.ggml.scores", f32_array([0.0, 0.0, -1.0, -2.0])),
        ],
        tensors=[
            Tensor("token_embd.weight", [64, 4], Q8_0_T),
            Tensor("output_norm.weight", [64], F32_T),
            Tensor("blk.0.ffn_down.weight", [256, 2], Q4_K_T),
        ],
    )


def with_kv(key, val) -> Gguf:
    g = valid()
    g.kvs.append((key, val))
    return g


def with_tensor(t: Tensor) -> Gguf:
    g = valid()
    g.tensors.append(t)
    return g


def edit_last(**changes) -> Gguf:
    g = valid()
    for k, v in changes.items():
        setattr(g.tensors[-1], k, v)
    return g


def cases() -> list[tuple[str, str, str, str, bytes]]:
    """(file stem, what it breaks, error kind, message substring, bytes)."""
    M, U = "MalformedFile", "Unsupported"
    ok = valid().build()
    out = []

    def add(name, why, kind, needle, data):
        out.append((name, why, kind, needle, data))

    g = valid()
    g.magic = b"GGML"
    add("bad_magic", "magic is GGML, not GGUF", M, "bad magic", g.build())
    add("empty_file", "zero bytes", M, "magic", b"")
    add("truncated_header", "ends after the version field", M, "truncated", ok[:8])
    add("truncated_in_metadata", "cut inside the token array", M, "tokenizer.ggml.tokens", ok[:165])
    add("truncated_tensor_data", "last tensor's final byte missing", M, "past the end", ok[:-1])

    for version, name, kind, needle in [
        (0, "version_0", M, "version 0"),
        (1, "version_1", U, "version 1"),
        (4, "version_4_future", U, "version 4"),
    ]:
        g = valid()
        g.version = version
        add(name, f"header version {version}", kind, needle, g.build())
    g = valid()
    g.version_big_endian = True
    add("big_endian_v3", "version written big-endian (a big-endian GGUF)", U, "big-endian", g.build())

    g = valid()
    g.n_tensors = 2**64 - 1
    add("tensor_count_too_large", "tensor count 2^64-1", M, "tensor count", g.build())
    g = valid()
    g.n_kv = 2**40
    add("kv_count_too_large", "metadata count 2^40", M, "metadata count", g.build())

    g = Gguf(n_kv=1)
    add("huge_key_length", "key length 2^40", M, "exceeds the limit",
        g.build() + struct.pack("<Q", 2**40) + bytes(32))
    add("huge_string_value_length", "string value length 2^31 (over the 1 GiB cap)", M,
        "exceeds the limit", with_kv("general.name", value(STRING, struct.pack("<Q", 2**31) + b"x")).build())
    add("string_longer_than_file", "string value length 10^6 in a small file", M, "truncated",
        with_kv("general.name", value(STRING, struct.pack("<Q", 10**6) + b"x")).build())
    add("huge_array_length", "array of 2^31 f32 (over the 2^30 cap)", M, "limit",
        with_kv("tokenizer.ggml.extra", array(F32, 2**31, bytes(16))).build())
    add("array_longer_than_file", "array of 2^20 strings in a small file", M, "remain",
        with_kv("tokenizer.ggml.extra", array(STRING, 2**20, bytes(16))).build())

    nested = array(I32, 1, struct.pack("<i", 1))
    for _ in range(10):
        nested = array(ARRAY, 1, nested[1])
    add("nested_arrays_too_deep", "arrays nested 11 deep", M, "nested", with_kv("deep", nested).build())
    add("unknown_value_type", "value type id 13", M, "unknown value type id 13",
        with_kv("weird", value(13, bytes(8))).build())
    add("unknown_array_element_type", "array element type id 99", M, "unknown value type id 99",
        with_kv("weird", array(99, 1, bytes(8))).build())
    add("invalid_utf8_key", "key bytes are not UTF-8", M, "UTF-8",
        with_kv(b"bad\xff\xfekey", u32(1)).build())
    add("invalid_utf8_token", "a token string that is not UTF-8", M, "UTF-8",
        with_kv("tokenizer.ggml.extra", str_array(["ok", b"\xc3\x28"])).build())
    add("bool_not_0_or_1", "bool stored as byte 7", M, "byte value 7",
        with_kv("flag", value(BOOL, b"\x07")).build())
    add("duplicate_key", "llama.block_count appears twice", M, "duplicate",
        with_kv("llama.block_count", u32(2)).build())
    add("empty_key", "a key of zero bytes", M, "empty key", with_kv("", u32(2)).build())
    add("alignment_wrong_type", "general.alignment stored as u64", M, "general.alignment",
        with_kv("general.alignment", u64(32)).build())
    add("alignment_zero", "general.alignment = 0", M, "alignment 0",
        with_kv("general.alignment", u32(0)).build())
    add("alignment_not_power_of_two", "general.alignment = 48", M, "alignment 48",
        with_kv("general.alignment", u32(48)).build())

    add("tensor_name_too_long", "a 64-byte tensor name (ggml allows 63)", M, "64 bytes long",
        with_tensor(Tensor("x" * 64, [32], F32_T)).build())
    add("tensor_name_empty", "a tensor with an empty name", M, "empty tensor name",
        with_tensor(Tensor("", [32], F32_T)).build())
    add("duplicate_tensor_name", "token_embd.weight twice", M, "duplicate tensor",
        with_tensor(Tensor("token_embd.weight", [32], F32_T)).build())
    add("n_dims_5", "a five-dimensional tensor", M, "n_dims is 5",
        with_tensor(Tensor("five_d", [1, 1, 1, 1, 32], F32_T)).build())
    add("n_dims_0", "a zero-dimensional tensor", M, "n_dims is 0",
        with_tensor(Tensor("no_dims", [], F32_T, data_len=0)).build())
    add("zero_dim", "a dimension of 0", M, "dimension 1 is 0",
        with_tensor(Tensor("zero", [32, 0], F32_T, data_len=0)).build())
    add("negative_dim", "a dimension of 2^64-1 (-1 as ggml's int64)", M, "dimension 0 is",
        with_tensor(Tensor("negative", [2**64 - 1], F32_T, data_len=0)).build())
    add("dims_overflow", "dims 2^32 x 2^32: element count overflows", M, "overflows",
        with_tensor(Tensor("overflow", [2**32, 2**32], F32_T, data_len=0)).build())
    add("byte_size_overflow", "dims 2^31 x 2^31 f32: byte size overflows", M, "not representable",
        with_tensor(Tensor("too_many_bytes", [2**31, 2**31], F32_T, data_len=0)).build())
    add("unknown_tensor_type", "ggml type id 99", M, "unknown ggml type id 99",
        with_tensor(Tensor("mystery", [32], 99, data_len=32)).build())
    add("unsupported_tensor_type_iq2", "ggml type id 16 (IQ2_XXS), not implemented", U, "16",
        with_tensor(Tensor("iq_tensor", [256], 16, data_len=66)).build())
    add("row_not_multiple_of_block", "a Q8_0 row of 33 elements", M, "row length 33",
        with_tensor(Tensor("ragged", [33, 2], Q8_0_T, data_len=68)).build())
    add("misaligned_tensor_offset", "relative offset 1004 with alignment 32", M, "alignment 32",
        edit_last(offset=1004).build())
    g = edit_last(offset=2**64 - 32)
    add("tensor_offset_overflow", "relative offset 2^64-32: offset + size overflows", M, "past the end",
        g.build()[:4096])
    add("overlapping_tensors", "the last tensor's data overlaps the first's", M, "overlaps",
        edit_last(offset=0).build())
    add("tensor_data_past_end", "a tensor placed 1 MiB past the end of the file", M, "past the end",
        edit_last(offset=2**20, data_len=288).build()[: len(ok)])
    return out


def main() -> None:
    for old in HERE.glob("*.gguf"):
        old.unlink()
    rows = ["file\tkind\tmessage_contains"]
    readme = [
        "# Malformed GGUF files",
        "",
        "Generated by `make_malformed.py` (stdlib `struct` only); do not edit by hand.",
        "Each file breaks one thing in an otherwise valid small file; opening any of them must",
        "fail with the error kind and message substring listed in `expected.tsv`, never crash.",
        "`control/valid_small.gguf` is that valid file unbroken: it must open.",
        "",
    ]
    for name, why, kind, needle, data in cases():
        file_name = f"{name}.gguf"
        (HERE / file_name).write_bytes(data)
        rows.append(f"{file_name}\t{kind}\t{needle}")
        readme.append(f"- `{file_name}`: {why} ({kind}).")
    (HERE / "expected.tsv").write_text("\n".join(rows) + "\n")
    # The unbroken original, in a subfolder so `*.gguf` here matches only broken files: it
    # must open, which shows each failure above comes from its one change.
    (HERE / "control").mkdir(exist_ok=True)
    (HERE / "control" / "valid_small.gguf").write_bytes(valid().build())
    (HERE / "README.md").write_text("\n".join(readme) + "\n")
    print(f"wrote {len(rows) - 1} files to {HERE}")


if __name__ == "__main__":
    main()
