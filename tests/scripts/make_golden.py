#!/usr/bin/env python3
"""Write the golden reference files that pin our tokenizers and forward pass to llama.cpp.

What it produces (in tests/golden/, one pair per model, committed to the repository):

  tokenizer_<model>.json
      For every string in tests/scripts/tokenizer_corpus.py `CORPUS`: the ids llama.cpp's
      tokenizer returns for each of add_special in {false, true} x parse_special in {false, true},
      and the llama_detokenize output of each id list (special tokens rendered and not).
      A `pieces` table gives, for every id that occurs (plus the first ids of the vocabulary and a
      seeded sample of others), the bytes of llama_token_to_piece with special rendering on and off
      (hex, lstrip = 0) and the token's llama_token_attr bit set.

  generation_<model>.json
      For 8 fixed prompts: the prompt ids (add_special=true, parse_special=true); 32 greedy tokens
      (argmax of the raw logits, ties to the lowest id, no sampler of any kind; generation stops
      early only at an end-of-generation token, and `stop_reason` says which happened); at the final
      prompt position the top-40 (id, logit) pairs, the logits of 40 seeded pseudo-random ids and
      the logsumexp of the whole logit vector; and for each generated token the distribution it was
      chosen from (`steps[i]`, so steps[0] is the final prompt position): top-5 (id, logit) and
      logsumexp. A probability is exp(logit - logsumexp). `self_consistency` gives llama.cpp's own
      noise floor: the last step recomputed from one batched llama_decode of the whole sequence
      differs from the token-by-token value by up to ~0.6 logits here, so a test comparing another
      engine with these files must allow at least that much (and compare greedy ids with the
      golden prefix fed in, since a near-tie can flip the argmax).

Both files record llama-cpp-python's version, llama.cpp/ggml build info, the model file's sha256,
and every setting used. Floats are rounded to 6 significant digits; compare logits with a
tolerance (the reference itself is computed in float32 with quantized weights).

How to run (by hand; CI never runs this and nothing in the package depends on llama-cpp-python):

    python tests/scripts/make_golden.py                      # both models, default locations
    python tests/scripts/make_golden.py --venv /tmp/golden-venv \\
        --smollm /path/SmolLM2-135M-Instruct.Q4_1.gguf --gemma /path/gemma-3-270m-q4_k_m.gguf
    python tests/scripts/make_golden.py --models gemma3-270m
    python tests/scripts/make_golden.py --kv-cache-type f16  # llama.cpp's default cache

The default run uses an F32 KV cache and writes tokenizer_<model>.json and generation_<model>.json;
`--kv-cache-type f16` writes generation_<model>.kv-f16.json, the same prompts under llama.cpp's own
default cache type, which sampler-sdk's default cache reproduces.

This script alone installs llama-cpp-python: when the running interpreter lacks llama_cpp at the
pinned version, it creates a virtual environment (--venv, else $SAMPLER_SDK_GOLDEN_VENV, else
./.golden-venv), pip-installs llama-cpp-python==PINNED (compiled from source, several minutes) and
numpy into it, and re-executes itself there. An existing environment is reused.

Model paths default to the sampler-sdk registry cache:
($SAMPLER_SDK_CACHE or ~/.cache/sampler-sdk)/models/<name>/<file>.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# Imported when present; without them only the bootstrap below runs, which installs them into a
# venv and re-executes this script there.
try:
    import llama_cpp
    import numpy as np
except ImportError:
    llama_cpp = None
    np = None

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
FORMAT_VERSION = 1
SIGNIFICANT_DIGITS = 6

REEXEC_MARKER = "SAMPLER_SDK_GOLDEN_REEXEC"
VENV_ENV_VAR = "SAMPLER_SDK_GOLDEN_VENV"

SCRIPT_PATH = Path(__file__).resolve()
DEFAULT_OUT_DIR = SCRIPT_PATH.parent.parent / "golden"

# name -> file name inside the registry cache.
MODEL_FILES = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3-270m": "gemma-3-270m-q4_k_m.gguf",
}

# Settings of the reference run. An F32 KV cache and no flash attention keep llama.cpp's attention
# in float32; its quantized matrix products still round activations to 8-bit blocks.
N_CTX = 512
N_BATCH = 512
N_UBATCH = 512
N_THREADS = 2
SEED = 20240917
MAX_NEW_TOKENS = 32
TOP_K_PROMPT = 40
N_RANDOM_IDS = 40
TOP_K_STEP = 5
N_LEADING_PIECES = 512
N_SAMPLED_PIECES = 512

# Chat-formatted prompts follow each model's own template. BOS is not written out: the tokenizer
# adds it with add_special=true where the model asks for it (Gemma does, SmolLM2 does not).
CHAT_PROMPTS = {
    "smollm2-135m-instruct": (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "gemma3-270m": (
        "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    ),
}


def generation_prompts(model_name: str) -> list[tuple[str, str]]:
    return [
        ("prose", "The capital of France is"),
        ("question", "Question: Why is the sky blue?\nAnswer:"),
        ("code", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
        ("list", "Things to pack for a beach trip:\n1. Sunscreen\n2. Towel\n3."),
        ("chat_template", CHAT_PROMPTS[model_name]),
        ("non_english", "Él está muy cansado después del largo día; mañana será"),
        ("numbers", "1, 1, 2, 3, 5, 8, 13, 21, 34,"),
        ("very_short", "Hi"),
    ]


# ---------------------------------------------------------------------------------------------
# Environment bootstrap (standard library only: it runs where llama_cpp and numpy are missing)
# ---------------------------------------------------------------------------------------------


def _installed_llama_cpp_version() -> str | None:
    if llama_cpp is None or np is None:
        return None
    return str(getattr(llama_cpp, "__version__", "unknown"))


def _venv_python(venv: Path) -> Path:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def _venv_is_ready(python: Path) -> bool:
    check = (
        "import sys, numpy, llama_cpp; "
        f"sys.exit(0 if llama_cpp.__version__ == {LLAMA_CPP_PYTHON_VERSION!r} else 1)"
    )
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", check], capture_output=True, check=False)
    return probe.returncode == 0


def ensure_environment(args: argparse.Namespace, argv: list[str]) -> None:
    """Return if this interpreter can run the script; otherwise re-exec inside the golden venv."""
    requested = args.venv or os.environ.get(VENV_ENV_VAR)
    running_in_requested = (
        requested is not None and Path(sys.prefix).resolve() == Path(requested).resolve()
    )
    installed = _installed_llama_cpp_version()
    if installed == LLAMA_CPP_PYTHON_VERSION and (requested is None or running_in_requested):
        return
    if os.environ.get(REEXEC_MARKER):
        sys.exit(
            f"make_golden: re-executed in {sys.prefix} but llama_cpp is "
            f"{installed or 'missing'}, expected {LLAMA_CPP_PYTHON_VERSION}"
        )
    if installed is not None and installed != LLAMA_CPP_PYTHON_VERSION and requested is None:
        print(
            f"make_golden: this interpreter has llama-cpp-python {installed}, the golden files are "
            f"pinned to {LLAMA_CPP_PYTHON_VERSION}; using a dedicated venv",
            file=sys.stderr,
        )
    venv = Path(requested) if requested else Path.cwd() / ".golden-venv"
    python = _venv_python(venv)
    if not python.exists():
        print(f"make_golden: creating venv {venv}", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
    if not _venv_is_ready(python):
        print(
            f"make_golden: installing llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} into {venv} "
            "(builds llama.cpp from source; this takes several minutes)",
            file=sys.stderr,
        )
        subprocess.check_call(
            [
                str(python),
                "-m",
                "pip",
                "install",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                "numpy",
            ]
        )
    env = dict(os.environ, **{REEXEC_MARKER: "1", VENV_ENV_VAR: str(venv)})
    os.execve(str(python), [str(python), str(SCRIPT_PATH), *argv], env)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def round_sig(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"non-finite value {value} in llama.cpp output")
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_model_path(name: str) -> Path:
    cache_root = os.environ.get("SAMPLER_SDK_CACHE")
    root = Path(cache_root) if cache_root else Path.home() / ".cache" / "sampler-sdk"
    return root / "models" / name / MODEL_FILES[name]


def load_corpus() -> list[str]:
    sys.path.insert(0, str(SCRIPT_PATH.parent))
    try:
        from tokenizer_corpus import CORPUS
    finally:
        sys.path.pop(0)
    return list(CORPUS)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, ensure_ascii=True, indent=1, sort_keys=False)
    path.write_text(text + "\n", encoding="ascii")
    print(f"make_golden: wrote {path} ({len(text) // 1024} KiB)", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# llama.cpp access (low-level API only, so no sampler or cache of llama-cpp-python intervenes)
# ---------------------------------------------------------------------------------------------


class LlamaRun:
    """One model and one context, driven through llama_cpp's ctypes bindings."""

    def __init__(self, model_path: Path, verbose: bool, kv_cache_type: str = "f32") -> None:
        self.llama = llama_cpp
        if not verbose:
            # Keep a reference: ctypes callbacks must outlive the C side's use of them.
            self._silence = llama_cpp.llama_log_callback(lambda level, text, user: None)
            llama_cpp.llama_log_set(self._silence, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()

        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model_settings = {
            "n_gpu_layers": 0,
            "load_mode": int(model_params.load_mode),
            "lazy_mode": int(model_params.lazy_mode),
        }
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = N_CTX
        context_params.n_batch = N_BATCH
        context_params.n_ubatch = N_UBATCH
        context_params.n_threads = N_THREADS
        context_params.n_threads_batch = N_THREADS
        context_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cache_type = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv_cache_type]
        context_params.type_k = cache_type
        context_params.type_v = cache_type
        self.context_settings = {
            "n_ctx": N_CTX,
            "n_batch": N_BATCH,
            "n_ubatch": N_UBATCH,
            "n_threads": N_THREADS,
            "n_threads_batch": N_THREADS,
            "flash_attn": "disabled",
            "kv_cache_type": kv_cache_type,
            "n_seq_max": int(context_params.n_seq_max),
            "swa_full": bool(context_params.swa_full),
        }
        self.ctx = llama_cpp.llama_init_from_model(self.model, context_params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {model_path}")
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)

    def close(self) -> None:
        self.llama.llama_batch_free(self.batch)
        self.llama.llama_free(self.ctx)
        self.llama.llama_model_free(self.model)

    # --- vocabulary ----------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            buffer = (self.llama.llama_token * capacity)()
            count = self.llama.llama_tokenize(
                self.vocab, data, len(data), buffer, capacity, add_special, parse_special
            )
            if count >= 0:
                return [int(buffer[i]) for i in range(count)]
            capacity = -count

    def piece(self, token: int, special: bool) -> bytes:
        capacity = 64
        while True:
            buffer = ctypes.create_string_buffer(capacity)
            count = self.llama.llama_token_to_piece(self.vocab, token, buffer, capacity, 0, special)
            if count >= 0:
                return buffer.raw[:count]
            capacity = -count

    def detokenize(self, ids: list[int], unparse_special: bool) -> bytes:
        tokens = (self.llama.llama_token * max(len(ids), 1))(*ids)
        capacity = 64 + 16 * len(ids)
        while True:
            buffer = ctypes.create_string_buffer(capacity)
            count = self.llama.llama_detokenize(
                self.vocab, tokens, len(ids), buffer, capacity, False, unparse_special
            )
            if count >= 0:
                return buffer.raw[:count]
            capacity = -count

    def special_ids(self) -> dict[str, Any]:
        vocab = self.vocab
        llama = self.llama
        return {
            "bos": int(llama.llama_vocab_bos(vocab)),
            "eos": int(llama.llama_vocab_eos(vocab)),
            "eot": int(llama.llama_vocab_eot(vocab)),
            "nl": int(llama.llama_vocab_nl(vocab)),
            "pad": int(llama.llama_vocab_pad(vocab)),
            "add_bos": bool(llama.llama_vocab_get_add_bos(vocab)),
            "add_eos": bool(llama.llama_vocab_get_add_eos(vocab)),
            "eog_ids": [t for t in range(self.n_vocab) if llama.llama_vocab_is_eog(vocab, t)],
        }

    def vocab_type(self) -> str:
        names = {0: "none", 1: "spm", 2: "bpe", 3: "wpm", 4: "ugm", 5: "rwkv", 6: "plamo2"}
        code = int(self.llama.llama_vocab_type(self.vocab))
        return names.get(code, f"unknown({code})")

    def is_eog(self, token: int) -> bool:
        return bool(self.llama.llama_vocab_is_eog(self.vocab, token))

    # --- forward pass --------------------------------------------------------------------

    def reset(self) -> None:
        self.llama.llama_memory_clear(self.llama.llama_get_memory(self.ctx), True)

    def decode(self, tokens: list[int], start_pos: int) -> Any:
        """Evaluate tokens at positions start_pos.. and return the last position's logits."""
        if not 0 < len(tokens) <= N_BATCH:
            raise ValueError(f"batch of {len(tokens)} tokens does not fit n_batch={N_BATCH}")
        if start_pos + len(tokens) > N_CTX:
            raise ValueError(f"sequence of {start_pos + len(tokens)} tokens exceeds n_ctx={N_CTX}")
        batch = self.batch
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start_pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if i == len(tokens) - 1 else 0
        batch.n_tokens = len(tokens)
        status = self.llama.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        pointer = self.llama.llama_get_logits_ith(self.ctx, len(tokens) - 1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).astype(np.float32, copy=True)


def build_info() -> dict[str, Any]:

    def c_string(library: Any, symbol: str) -> str | None:
        function = getattr(library, symbol, None)
        if function is None:
            return None
        function.restype = ctypes.c_char_p
        function.argtypes = []
        value = function()
        return value.decode() if value else None

    info: dict[str, Any] = {
        "llama_cpp_python_version": llama_cpp.__version__,
        "llama_version": c_string(llama_cpp.llama_cpp._lib, "llama_version"),
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
    }
    ggml_base = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if ggml_base.exists():
        library = ctypes.CDLL(str(ggml_base))
        info["ggml_version"] = c_string(library, "ggml_version")
        # libllama exports no build number or commit, but ggml is built from the same vendored
        # llama.cpp tree, so its commit names the llama.cpp source ("-dirty": the tree as built
        # differed from that commit in git's view).
        info["ggml_commit"] = c_string(library, "ggml_commit")
    return info


# ---------------------------------------------------------------------------------------------
# Golden files
# ---------------------------------------------------------------------------------------------


def model_header(name: str, path: Path, run: LlamaRun) -> dict[str, Any]:
    return {
        "name": name,
        "file": path.name,
        "sha256": sha256_of(path),
        "size_bytes": path.stat().st_size,
        "vocab_type": run.vocab_type(),
        "n_vocab": run.n_vocab,
        "special": run.special_ids(),
    }


def tokenizer_golden(
    name: str, path: Path, run: LlamaRun, corpus: list[str], generator: dict
) -> dict:
    cases = []
    seen: set[int] = set()
    for text in corpus:
        encodings = []
        for add_special in (False, True):
            for parse_special in (False, True):
                ids = run.tokenize(text, add_special, parse_special)
                seen.update(ids)
                encodings.append(
                    {
                        "add_special": add_special,
                        "parse_special": parse_special,
                        "ids": ids,
                        "detokenized_hex": run.detokenize(ids, unparse_special=False).hex(),
                        "detokenized_special_hex": run.detokenize(ids, unparse_special=True).hex(),
                    }
                )
        cases.append({"text": text, "encodings": encodings})

    rng = np.random.default_rng(SEED)
    sampled = rng.choice(run.n_vocab, size=min(N_SAMPLED_PIECES, run.n_vocab), replace=False)
    piece_ids = sorted(
        seen | set(range(min(N_LEADING_PIECES, run.n_vocab))) | {int(t) for t in sampled}
    )
    pieces = {
        str(token): {
            "plain_hex": run.piece(token, special=False).hex(),
            "special_hex": run.piece(token, special=True).hex(),
            "attr": int(run.llama.llama_vocab_get_attr(run.vocab, token)),
        }
        for token in piece_ids
    }
    return {
        "format": f"sampler-sdk golden tokenizer v{FORMAT_VERSION}",
        "generator": generator,
        "model": model_header(name, path, run),
        "notes": (
            "encodings: llama_tokenize(text, add_special, parse_special). detokenized_*: "
            "llama_detokenize(ids, remove_special=false, unparse_special=false|true), hex of the "
            "bytes. pieces: llama_token_to_piece(id, lstrip=0, special=false|true), hex; covers "
            f"every id in encodings, ids 0..{N_LEADING_PIECES - 1} and {N_SAMPLED_PIECES} ids "
            f"drawn with numpy default_rng({SEED}).choice(n_vocab, replace=False). "
            "attr: llama_token_attr "
            "bits (1 unknown, 2 unused, 4 normal, 8 control, 16 user_defined, 32 byte, "
            "64 normalized, 128 lstrip, 256 rstrip, 512 single_word)."
        ),
        "cases": cases,
        "pieces": pieces,
    }


def top_pairs(logits: Any, k: int) -> list[list[float]]:
    # Sort by logit descending, then id ascending, so ties have one documented order.
    order = np.lexsort((np.arange(logits.shape[0]), -logits))[:k]
    return [[int(i), round_sig(float(logits[i]))] for i in order]


def logsumexp(logits: Any) -> float:
    wide = logits.astype(np.float64)
    peak = float(wide.max())
    return round_sig(peak + math.log(float(np.exp(wide - peak).sum())))


def self_consistency(
    run: LlamaRun, sequence: list[int], last_top: list[list[float]], last_id: int
) -> dict:
    """llama.cpp's own noise floor: the last step again, from one llama_decode of the sequence.

    A batch takes other kernels than one-token decodes (and activations are rounded to 8-bit
    blocks either way), so the two disagree by far more than float32 rounding; a test comparing
    another engine with these files needs a tolerance at least this wide."""
    run.reset()
    logits = run.decode(sequence, start_pos=0)
    return {
        "sequence_length": len(sequence),
        "last_step_top_max_abs_diff": round_sig(
            max(abs(float(logits[int(i)]) - value) for i, value in last_top)
        ),
        "argmax_agrees": int(logits.argmax()) == last_id,
    }


def generation_golden(name: str, path: Path, run: LlamaRun, generator: dict) -> dict:
    random_ids = sorted(
        int(t) for t in np.random.default_rng(SEED).choice(run.n_vocab, N_RANDOM_IDS, replace=False)
    )
    results = []
    for prompt_name, text in generation_prompts(name):
        run.reset()
        prompt_ids = run.tokenize(text, add_special=True, parse_special=True)
        logits = run.decode(prompt_ids, start_pos=0)
        final_prompt_position = {
            "top": top_pairs(logits, TOP_K_PROMPT),
            "random": [[t, round_sig(float(logits[t]))] for t in random_ids],
            "logsumexp": logsumexp(logits),
        }
        generated: list[int] = []
        steps = []
        stop_reason = "length"
        position = len(prompt_ids)
        while True:
            token = int(np.argmax(logits))  # first maximum, i.e. lowest id on ties
            steps.append({"top": top_pairs(logits, TOP_K_STEP), "logsumexp": logsumexp(logits)})
            generated.append(token)
            if run.is_eog(token):
                stop_reason = "eog"
                break
            if len(generated) == MAX_NEW_TOKENS:
                break
            logits = run.decode([token], start_pos=position)
            position += 1
        text_bytes = b"".join(run.piece(t, special=False) for t in generated)
        consistency = self_consistency(run, prompt_ids + generated[:-1], steps[-1]["top"], token)
        results.append(
            {
                "name": prompt_name,
                "prompt": text,
                "prompt_ids": prompt_ids,
                "final_prompt_position": final_prompt_position,
                "generated_ids": generated,
                "stop_reason": stop_reason,
                "generated_text": text_bytes.decode("utf-8", errors="replace"),
                "generated_hex": text_bytes.hex(),
                "steps": steps,
                "self_consistency": consistency,
            }
        )
        print(f"  {prompt_name}: {text_bytes.decode('utf-8', errors='replace')!r}", file=sys.stderr)
    return {
        "format": f"sampler-sdk golden generation v{FORMAT_VERSION}",
        "generator": generator,
        "model": model_header(name, path, run),
        "settings": {
            "model": run.model_settings,
            "context": run.context_settings,
            "prompt_tokenization": {"add_special": True, "parse_special": True},
            "prompt_evaluation": (
                "one llama_decode of the whole prompt, logits of the last position only"
            ),
            "decoding": (
                "greedy: argmax of the raw logits (ties to the lowest id), no sampler, no penalty; "
                "each token is fed back with its own llama_decode call"
            ),
            "max_new_tokens": MAX_NEW_TOKENS,
            "stop": (
                "an end-of-generation id (llama_vocab_is_eog) ends the sequence; "
                "it is kept in generated_ids"
            ),
            "top_k_final_prompt_position": TOP_K_PROMPT,
            "top_k_per_step": TOP_K_STEP,
            "random_ids": (
                f"numpy default_rng({SEED}).choice(n_vocab, {N_RANDOM_IDS}, replace=False), sorted"
            ),
            "seed": SEED,
            "floats": (
                f"rounded to {SIGNIFICANT_DIGITS} significant digits; logsumexp computed in float64"
            ),
            "top_order": "logit descending, then id ascending",
            "self_consistency": (
                "prompt + generated_ids[:-1] evaluated again in a single llama_decode; max |logit "
                "difference| against steps[-1].top and whether the argmax is still "
                "generated_ids[-1]"
            ),
            "steps": (
                "steps[i] describes the logits generated_ids[i] was chosen from; "
                "steps[0] is the final prompt position"
            ),
            "generated_text": (
                "concatenated llama_token_to_piece(special=false) bytes, UTF-8 with replacement"
            ),
        },
        "random_ids": random_ids,
        "prompts": results,
    }


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def generation_file_name(model: str, kv_cache_type: str) -> str:
    """The generation golden of `model` under llama.cpp's `kv_cache_type` cache."""
    return f"generation_{model}.json" if kv_cache_type == "f32" else f"generation_{model}.kv-{kv_cache_type}.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--venv",
        help=f"virtual environment to use or create (default ${VENV_ENV_VAR} or ./.golden-venv)",
    )
    parser.add_argument("--smollm", type=Path, help="path of SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--gemma", type=Path, help="path of gemma-3-270m-q4_k_m.gguf")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted(MODEL_FILES),
        default=sorted(MODEL_FILES, reverse=True),
    )
    parser.add_argument(
        "--kv-cache-type",
        choices=["f32", "f16"],
        default="f32",
        help="llama.cpp's KV cache type; f16 (its default) writes generation_<model>.kv-f16.json "
        "only, the tokenizer goldens not depending on it",
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--verbose", action="store_true", help="show llama.cpp's own log")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    ensure_environment(args, argv)

    paths = {
        "smollm2-135m-instruct": args.smollm or default_model_path("smollm2-135m-instruct"),
        "gemma3-270m": args.gemma or default_model_path("gemma3-270m"),
    }
    missing = [f"{name}: {paths[name]}" for name in args.models if not paths[name].is_file()]
    if missing:
        sys.exit("make_golden: model file not found\n  " + "\n  ".join(missing))

    corpus = load_corpus()
    generator = {"script": "tests/scripts/make_golden.py", **build_info()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        print(f"make_golden: {name} ({paths[name]})", file=sys.stderr)
        run = LlamaRun(paths[name], verbose=args.verbose, kv_cache_type=args.kv_cache_type)
        try:
            if args.kv_cache_type == "f32":
                write_json(
                    args.out_dir / f"tokenizer_{name}.json",
                    tokenizer_golden(name, paths[name], run, corpus, generator),
                )
            write_json(
                args.out_dir / generation_file_name(name, args.kv_cache_type),
                generation_golden(name, paths[name], run, generator),
            )
        finally:
            run.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
