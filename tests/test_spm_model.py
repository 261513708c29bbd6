"""SentencePiece `.model` files: the engine's tokenizer against the `sentencepiece` package.

`sampler_sdk._engine.load_sentencepiece(path)` must give the ids of
`SentencePieceProcessor(model_file=path).encode(text)` and the text of `.decode(ids)`:

- on the Grok-1 tokenizer (`../shared/data/grok-1-tokenizer.model`, skipped when absent) over
  the shared tokenizer corpus plus whitespace runs, CJK, emoji, byte-fallback and code cases,
  random text (hypothesis) and random id sequences for decoding;
- on models trained here with `sentencepiece` itself, one per feature Grok-1 does not use:
  unigram Viterbi, the nmt_nfkc precompiled character map, extra-whitespace removal, no dummy
  prefix, whitespace as suffix, unknown pieces without byte fallback, user-defined and control
  symbols, unused pieces, the word and character models, and a denormalizer;
- and `Model(path, tokenizer=PATH)` for a GGUF without a vocabulary (or to replace one).
"""

from __future__ import annotations

import importlib.util
import io
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

spm = pytest.importorskip("sentencepiece")
engine = pytest.importorskip("sampler_sdk._engine")

TESTS_DIR = Path(__file__).resolve().parent
GROK_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "grok-1-tokenizer.model"


def _load_corpus() -> list[str]:
    spec = importlib.util.spec_from_file_location(
        "tokenizer_corpus", TESTS_DIR / "scripts" / "tokenizer_corpus.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.CORPUS)


# Beyond the shared corpus: what SentencePiece's normalizer and Grok-1's user-defined pieces
# (newline, tab and space runs, digits) make interesting.
EXTRA_TEXTS: list[str] = [
    " " * 17,
    " " * 40 + "x",
    "x" + " " * 33,
    "\t" * 9 + "tabs",
    "\n" * 11 + "newlines" + "\n" * 12,
    " \n \n\t \t",
    "a \n b \t c",
    "   leading",
    "trailing   ",
    "2024-06-01 12:34:56.789 +00:00",
    "０１２３ full-width digits ＡＢＣ",
    "9876543210" * 5,
    "def f(x):\n\tif x:\n\t\treturn [i ** 2 for i in range(x)]\n\treturn None\n",
    'int main(void) {\n    printf("%d\\n", 42);\n}\n',
    "\u0000nul\u0001soh\u007fdel",
    "\u00ad soft hyphen, \u2028 line separator, \u3000 ideographic space",
    "ｶﾀｶﾅ half-width, ㍿ squared, ① circled, ﬃ ligature",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕏 math letters",
    "🏳️‍🌈🧑🏿‍🚀🫠🫶",
    "中文，標點符號；日本語：「かぎかっこ」、한국어！",
    "[BOS] [EOS] [PAD] [UNK] <|separator|> <|mask|> <|control1|>",
    "Ж" * 50,
    "🙂" * 20,
    "\U0010ffff\U000e0001 planes 15-16 and tags",
    "ab\u0300\u0301\u0302\u0303 stacked combining",
]


def _corpus() -> list[str]:
    return _load_corpus() + EXTRA_TEXTS


def _assert_parity(tokenizer, processor, text: str) -> None:
    expected = processor.encode(text)
    actual = tokenizer.encode(text)
    assert actual == expected, (text, [processor.id_to_piece(i) for i in expected])
    assert tokenizer.decode(actual) == processor.decode(expected), text


# --- Grok-1 -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grok():
    if not GROK_TOKENIZER.exists():
        pytest.skip(f"{GROK_TOKENIZER} is absent")
    return (
        engine.load_sentencepiece(str(GROK_TOKENIZER)),
        spm.SentencePieceProcessor(model_file=str(GROK_TOKENIZER)),
    )


def _fields(data: bytes):
    """(field number, value) of one protobuf message: enough to check the spec facts below."""
    pos = 0

    def varint():
        nonlocal pos
        value, shift = 0, 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(data):
        tag = varint()
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            yield number, varint()
        elif wire == 2:
            length = varint()
            yield number, data[pos : pos + length]
            pos += length
        elif wire == 5:
            yield number, struct.unpack("<f", data[pos : pos + 4])[0]
            pos += 4
        else:
            raise AssertionError(f"unexpected wire type {wire}")


def test_grok_model_is_bpe_with_byte_fallback_and_identity_normalization(grok) -> None:
    """The facts the implementation relies on for Grok-1 (a change here needs new code paths)."""
    data = GROK_TOKENIZER.read_bytes()
    top = list(_fields(data))
    trainer = dict(_fields(next(v for n, v in top if n == 2)))
    normalizer = dict(_fields(next(v for n, v in top if n == 3)))
    assert trainer[3] == 2  # model_type = BPE: score-ordered merges, no Viterbi
    assert trainer[35] == 1  # byte_fallback
    assert (trainer[40], trainer[41], trainer[42], trainer[43]) == (3, 1, 2, 0)
    assert trainer[44] == b"[UNK]"  # unk_surface
    assert normalizer[1] == b"identity" and normalizer[2] == b""  # no character map
    assert normalizer[3] == 1 and normalizer[4] == 0  # dummy prefix, spaces kept
    assert sum(1 for n, _ in top if n == 1) == 131_072
    tokenizer, processor = grok
    assert tokenizer.n_vocab == processor.vocab_size() == 131_072


def test_grok_ids_and_text_equal_sentencepiece_on_the_corpus(grok) -> None:
    tokenizer, processor = grok
    for text in _corpus():
        _assert_parity(tokenizer, processor, text)


def test_grok_parity_on_long_mixed_text(grok) -> None:
    tokenizer, processor = grok
    _assert_parity(tokenizer, processor, "\n".join(_corpus()) * 3)


_TEXT = st.lists(
    st.one_of(
        st.characters(blacklist_categories=("Cs",)),
        st.sampled_from(list(" \t\n\r▁0123456789abcXYZ.,'\"-_<|>[]#")),
        st.sampled_from(
            ["  ", "\n\n", "\t\t", "[BOS]", "<|separator|>", "你好", "🦀", "é", "e\u0301"]
        ),
    ),
    max_size=40,
).map("".join)


# Parity, not generation speed, is under test: the machine may be busy.
_RELAXED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(max_examples=400, deadline=None, suppress_health_check=_RELAXED)
@given(text=_TEXT)
def test_grok_parity_on_random_text(grok, text: str) -> None:
    tokenizer, processor = grok
    _assert_parity(tokenizer, processor, text)


@settings(max_examples=300, deadline=None, suppress_health_check=_RELAXED)
@given(
    ids=st.lists(
        st.one_of(
            st.integers(0, 131_071),
            st.integers(0, 400),  # specials, user-defined runs, byte pieces
            st.sampled_from([130089, 325, 1990, 0, 1, 2, 3]),  # "▁", "▁▁", "▁▁▁", specials
        ),
        max_size=24,
    )
)
def test_grok_decode_equals_sentencepiece_for_any_ids(grok, ids: list[int]) -> None:
    tokenizer, processor = grok
    assert tokenizer.decode(ids) == processor.decode(ids)


def test_grok_token_bytes_and_errors(grok) -> None:
    tokenizer, processor = grok
    assert tokenizer.token_bytes(processor.piece_to_id("▁the")) == b" the"
    assert tokenizer.token_bytes(processor.piece_to_id("<0xE4>")) == b"\xe4"
    assert tokenizer.token_bytes(1) == b""
    assert tokenizer.token_bytes(1, render_special=True) == b"[BOS]"
    with pytest.raises(ValueError, match="131072"):
        tokenizer.decode([131_072])
    with pytest.raises(ValueError):
        tokenizer.token_bytes(10**6)
    # No BOS even with add_special (sentencepiece's default, and Grok-1's reference code).
    assert tokenizer.encode("hi", add_special=True) == processor.encode("hi")
    # parse_special cuts control text out; each remaining run gets its own dummy prefix.
    assert tokenizer.encode("[BOS]hi", parse_special=True) == [1] + processor.encode("hi")


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        engine.load_sentencepiece(str(tmp_path / "missing.model"))
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)))
    with pytest.raises(engine.ModelFormatError, match="garbage.model"):
        engine.load_sentencepiece(str(garbage))
    if GROK_TOKENIZER.exists():
        truncated = tmp_path / "truncated.model"
        truncated.write_bytes(GROK_TOKENIZER.read_bytes()[:1_000_000])
        with pytest.raises(engine.ModelFormatError, match="at byte"):
            engine.load_sentencepiece(str(truncated))


# --- models trained here ------------------------------------------------------------------------


def _training_text() -> list[str]:
    rng = random.Random(1234)
    syllables = ["ka", "to", "ri", "ne", "su", "mo", "la", "pe", "qu", "th", "ing", "er", "an"]
    lines = []
    for _ in range(1500):
        words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(8)]
        lines.append(" ".join(words) + rng.choice([".", ",", "!", " 42", " 3.14", "", "  x"]))
    return lines + _corpus()


# name -> SentencePieceTrainer options (beyond the input and the vocabulary size).
TRAINED: dict[str, dict] = {
    "unigram-nfkc": {"model_type": "unigram"},
    "unigram-bytes-identity": {
        "model_type": "unigram",
        "byte_fallback": True,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "split_digits": True,
        "user_defined_symbols": ["<sep>", "\n\n", "  "],
        "control_symbols": ["<ctl>"],
    },
    "unigram-suffix": {"model_type": "unigram", "treat_whitespace_as_suffix": True},
    "unigram-no-prefix": {
        "model_type": "unigram",
        "add_dummy_prefix": False,
        "normalization_rule_name": "nmt_nfkc_cf",
    },
    "bpe-nfkc-unk": {"model_type": "bpe", "user_defined_symbols": ["<sep>"]},
    "bpe-bytes-identity": {
        "model_type": "bpe",
        "byte_fallback": True,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "user_defined_symbols": ["\n", "\t", "  ", "0", "1", "2"],
        "allow_whitespace_only_pieces": True,
    },
    "word": {"model_type": "word"},
    "char": {"model_type": "char", "user_defined_symbols": ["<sep>"]},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("spm")
    lines = _training_text()
    paths = {}
    for name, options in TRAINED.items():
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=out,
            vocab_size=600,
            hard_vocab_limit=False,
            # Rare characters stay out of the vocabulary: unknown pieces and byte fallback.
            character_coverage=0.99,
            minloglevel=2,
            num_threads=1,
            **options,
        )
        paths[name] = directory / f"{name}.model"
        paths[name].write_bytes(out.getvalue())
    return paths


def _pair(path: Path):
    return engine.load_sentencepiece(str(path)), spm.SentencePieceProcessor(model_file=str(path))


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_trained_model_parity_on_the_corpus(trained, name: str) -> None:
    tokenizer, processor = _pair(trained[name])
    assert tokenizer.n_vocab == processor.vocab_size()
    for text in _corpus() + _training_text()[:50]:
        _assert_parity(tokenizer, processor, text)


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_trained_model_parity_on_random_text(trained, name: str) -> None:
    tokenizer, processor = _pair(trained[name])

    @settings(max_examples=150, deadline=None, suppress_health_check=_RELAXED)
    @given(text=_TEXT)
    def check(text: str) -> None:
        _assert_parity(tokenizer, processor, text)

    check()


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_trained_model_decode_equals_sentencepiece_for_any_ids(trained, name: str) -> None:
    tokenizer, processor = _pair(trained[name])
    n = processor.vocab_size()

    @settings(max_examples=150, deadline=None, suppress_health_check=_RELAXED)
    @given(ids=st.lists(st.integers(0, n - 1), max_size=20))
    def check(ids: list[int]) -> None:
        assert tokenizer.decode(ids) == processor.decode(ids)

    check()


def test_trained_unigram_parity_on_long_text(trained) -> None:
    """Long enough (about 100k score units) for the Viterbi's running-score rebasing."""
    for name in ("unigram-nfkc", "unigram-bytes-identity"):
        tokenizer, processor = _pair(trained[name])
        text = "\n".join(_corpus()) * 40
        _assert_parity(tokenizer, processor, text)


def test_unused_pieces_are_split_back(trained, tmp_path: Path) -> None:
    """Mark some merged pieces UNUSED (type 5) in a trained BPE model, as `spm` users do to
    retire pieces: BPE must re-split them into the pieces they were merged from."""
    data = trained["bpe-nfkc-unk"].read_bytes()
    processor = spm.SentencePieceProcessor(model_file=str(trained["bpe-nfkc-unk"]))
    retire = {processor.encode("katori")[-1], processor.encode("nesu")[-1]}
    out = bytearray()
    index = 0
    for number, value in _fields(data):
        if number == 1:
            piece = bytearray()
            for n, v in _fields(value):
                if n != 3 or index not in retire:
                    piece += _encode_field(n, v)
            if index in retire:
                piece += _encode_field(3, 5)
            out += _encode_field(1, bytes(piece))
            index += 1
        else:
            out += _encode_field(number, value)
    path = tmp_path / "unused.model"
    path.write_bytes(bytes(out))
    tokenizer, processor = _pair(path)
    assert all(processor.is_unused(i) for i in retire)
    for text in ["katori nesu", "katorinesu katori", *_corpus()]:
        _assert_parity(tokenizer, processor, text)


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_field(number: int, value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return _varint(number << 3 | 2) + _varint(len(value)) + bytes(value)
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(value)


def test_denormalizer_rules_apply_when_decoding(tmp_path: Path) -> None:
    """A model trained with a denormalization rule (here: "X" decodes as "Y")."""
    rules = tmp_path / "denorm.tsv"
    rules.write_text("58\t59\n")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text() + ["XXX X"] * 20),
        model_writer=out,
        vocab_size=300,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
        denormalization_rule_tsv=str(rules),
    )
    path = tmp_path / "denorm.model"
    path.write_bytes(out.getvalue())
    tokenizer, processor = _pair(path)
    assert processor.decode(processor.encode("aXb")) == "aYb"
    for text in ["aXb XX", *_corpus()]:
        _assert_parity(tokenizer, processor, text)


# --- Model(path, tokenizer=PATH) ----------------------------------------------------------------


def _without_vocabulary(source: Path, target: Path) -> None:
    """Copies a GGUF, leaving out every tokenizer.* key (as Grok-1 GGUFs may come)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    reader = gguf.GGUFReader(str(source))
    arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(str(target), arch)
    for field in reader.fields.values():
        if field.name.startswith(("tokenizer.", "GGUF.")) or field.name == "general.architecture":
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_models(trained, tmp_path_factory) -> dict[str, Path]:
    from reference.synthetic import write_llama_gguf

    directory = tmp_path_factory.mktemp("gguf")
    n_vocab = spm.SentencePieceProcessor(model_file=str(trained["unigram-nfkc"])).vocab_size()
    with_vocab = directory / "with_vocab.gguf"
    write_llama_gguf(with_vocab, n_vocab=n_vocab, n_layer=1)
    without = directory / "no_vocab.gguf"
    _without_vocabulary(with_vocab, without)
    small = directory / "small.gguf"
    write_llama_gguf(small, n_vocab=64, n_layer=1)
    return {"with": with_vocab, "without": without, "small": small}


def test_gguf_without_vocabulary_says_to_pass_a_tokenizer(tiny_models) -> None:
    with pytest.raises(engine.ModelFormatError, match="no vocabulary.*tokenizer"):
        engine.Model(str(tiny_models["without"]))


def test_gguf_without_vocabulary_loads_with_a_tokenizer_file(trained, tiny_models) -> None:
    path = trained["unigram-nfkc"]
    processor = spm.SentencePieceProcessor(model_file=str(path))
    model = engine.Model(str(tiny_models["without"]), tokenizer=str(path))
    for text in ["Hello world", " leading space", "你好，世界！", ""]:
        ids = model.tokenize(text, add_special=True)
        assert ids == processor.encode(text)
        assert model.detokenize(ids) == processor.decode(ids)
    assert model.logits(processor.encode("Hello")).shape == (processor.vocab_size(),)


def test_tokenizer_file_replaces_the_gguf_vocabulary(trained, tiny_models) -> None:
    path = trained["bpe-nfkc-unk"]
    processor = spm.SentencePieceProcessor(model_file=str(path))
    own = engine.Model(str(tiny_models["with"]))
    replaced = engine.Model(str(tiny_models["with"]), tokenizer=str(path))
    text = "katori nesu 42"
    assert replaced.tokenize(text, add_special=False) == processor.encode(text)
    assert own.tokenize(text, add_special=False) != processor.encode(text)


def test_tokenizer_file_errors(trained, tiny_models, tmp_path: Path) -> None:
    with pytest.raises(engine.ModelFormatError, match="tokenizer file.*64 rows"):
        engine.Model(str(tiny_models["small"]), tokenizer=str(trained["unigram-nfkc"]))
    with pytest.raises(FileNotFoundError):
        engine.Model(str(tiny_models["without"]), tokenizer=str(tmp_path / "missing.model"))


def test_client_and_cli_take_a_tokenizer_file(trained, tiny_models, capsys) -> None:
    import asyncio

    from sampler_sdk import Client
    from sampler_sdk.cli import main

    path = trained["unigram-nfkc"]
    processor = spm.SentencePieceProcessor(model_file=str(path))
    with Client(str(tiny_models["without"]), tokenizer=path) as client:
        ids = [t.token_id for t in asyncio.run(client.sampler.tokenize("Hello world"))]
        assert ids == processor.encode("Hello world")
        tokens = list(client.sync_sampler.sample(inputs=("Hello",), max_len=3, temperature=0))
        assert len(tokens) == 3 and all(0 <= t.token_id < processor.vocab_size() for t in tokens)
    with pytest.raises(ValueError, match="tokenizer"):
        Client(api_host="localhost:1", tokenizer=path)
    with pytest.raises(ValueError, match="exactly one model"):
        Client(models={"a": str(tiny_models["with"]), "b": str(tiny_models["with"])}, tokenizer=path)

    assert main(["sample", "Hello", "--model", str(tiny_models["without"]), "--tokenizer", str(path),
                 "--max-len", "2", "--temperature", "0", "--seed", "1"]) == 0
    assert capsys.readouterr().out
