"""Every file in tests/malformed/ breaks one thing in an otherwise valid GGUF file.
Opening one through Python must raise a clear exception naming the problem (the kind and
message listed in expected.tsv), never crash the interpreter."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import sampler_sdk
from sampler_sdk import ModelFormatError, inspect_gguf

MALFORMED = Path(__file__).parent / "malformed"


def _cases():
    with open(MALFORMED / "expected.tsv", newline="") as f:
        return [(row["file"], row["kind"], row["message_contains"]) for row in csv.DictReader(f, delimiter="\t")]


CASES = _cases()


def test_every_malformed_file_is_listed():
    listed = {name for name, _, _ in CASES}
    present = {p.name for p in MALFORMED.glob("*.gguf")}
    assert listed == present


@pytest.mark.parametrize("name,kind,message", CASES, ids=[c[0] for c in CASES])
def test_malformed_file_raises_model_format_error(name, kind, message):
    path = MALFORMED / name
    with pytest.raises(ModelFormatError) as inspect_error:
        inspect_gguf(str(path))
    assert message.lower() in str(inspect_error.value).lower()
    assert isinstance(inspect_error.value, ValueError)
    # Loading as a model goes through the same reader first.
    with pytest.raises(ModelFormatError) as load_error:
        sampler_sdk.Model(str(path))
    assert message.lower() in str(load_error.value).lower()


def test_control_file_opens():
    info = inspect_gguf(str(MALFORMED / "control" / "valid_small.gguf"))
    assert info["version"] == 3
    assert info["tensors"]


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        sampler_sdk.Model(str(tmp_path / "missing.gguf"))


def test_a_directory_is_not_a_model(tmp_path):
    with pytest.raises(OSError):
        sampler_sdk.Model(str(tmp_path))


def test_valid_gguf_without_model_tensors_names_what_is_missing():
    """The control file is a well-formed GGUF but not a runnable model."""
    with pytest.raises(ModelFormatError) as err:
        sampler_sdk.Model(str(MALFORMED / "control" / "valid_small.gguf"))
    text = str(err.value)
    assert "missing key" in text and "llama." in text
