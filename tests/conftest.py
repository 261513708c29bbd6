"""Shared fixtures: the real models (pulled once into the registry cache and reused by
later runs on the same machine) and paths to the committed golden files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
GOLDEN_DIR = TESTS_DIR / "golden"
SHARED_DIR = TESTS_DIR.parent.parent / "shared"


def _pull(name: str) -> Path:
    from sampler_sdk import registry

    return registry.pull(name, show_progress=False)


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return _pull("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return _pull("gemma3-270m")


@pytest.fixture(scope="session")
def smollm(smollm_path):
    from sampler_sdk import Model

    return Model(str(smollm_path))


@pytest.fixture(scope="session")
def gemma_tokenizer_model(gemma_path):
    """The Gemma model file loaded for its tokenizer (the gemma3 forward pass is separate)."""
    from sampler_sdk import Model

    return Model(str(gemma_path))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN_DIR


def pytest_report_header(config):
    from sampler_sdk import registry

    return f"sampler-sdk model cache: {registry.cache_dir()} (threads: {os.cpu_count()})"
