#!/usr/bin/env python3
"""Find the first operation of the forward pass where sampler-sdk's values part from llama.cpp's.

Our engine reproduces llama.cpp's CPU arithmetic to the bit (see rust/kernels/ggml_f32.rs), so a
regression shows up as a first tensor that differs. This script evaluates one prompt and N greedy
decode steps in both engines with the settings of tests/golden (F32 KV cache, no flash attention,
2 threads; --kv-cache-type f16 for llama.cpp's default cache instead) and prints, per step, the first traced tensor (layer by layer, in graph order) that is
not bit-identical, then whether the final logits are.

    python tests/scripts/compare_with_llama_cpp.py --model smollm2-135m-instruct \\
        --prompt "The capital of France is" --steps 2

How: a child process in the llama-cpp-python venv of make_golden.py (created by running that
script once; --venv or $SAMPLER_SDK_GOLDEN_VENV to choose it) runs llama.cpp with an eval callback
that copies every f32 tensor it computes into an .npz; this process then runs sampler-sdk with
SAMPLER_SDK_TRACE_DIR set (rust/model/trace.rs) and compares the tensors it writes. llama.cpp's
graph names a tensor several times as it is reshaped; `name#k` is the k-th tensor of that name.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT_PATH = Path(__file__).resolve()
sys.path.insert(0, str(SCRIPT_PATH.parent))

# Our trace name -> llama.cpp's tensor name (per layer unless noted), by architecture.
# `None`: llama.cpp gives the value no name of its own, so it is not compared.
LLAMA_NAMES = {
    "attn_norm": "attn_norm",
    "Qcur": "Qcur",
    "Kcur": "Kcur",
    "Vcur": "Vcur",
    "Qrope": "Qcur#2",
    "Krope": "Kcur#2",
    "kqv_out": "kqv_out",
    "attn_out": "attn_out",
    "ffn_inp": "ffn_inp",
    "ffn_norm": "ffn_norm",
    "ffn_out": "ffn_out",
    "l_out": "l_out",
}
ARCH_NAMES = {
    "llama": LLAMA_NAMES,
    "qwen2": LLAMA_NAMES,
    "gemma3": {**LLAMA_NAMES, "attn_out": None, "ffn_inp": "sa_out"},
}
# In graph order within a layer.
TRACE_ORDER = list(LLAMA_NAMES)
MODEL_WIDE = ["result_norm", "result_output"]


def dump_llama_cpp(model: Path, prompt: str, steps: int, out: Path, kv_cache_type: str) -> None:
    """Child process: run llama.cpp and save every f32 tensor of every evaluation."""
    import make_golden as mg
    import numpy as np

    llama_cpp = mg.llama_cpp

    class GgmlTensor(ctypes.Structure):  # ggml.h, struct ggml_tensor (ggml 0.25)
        _fields_ = [
            ("type", ctypes.c_int),
            ("buffer", ctypes.c_void_p),
            ("ne", ctypes.c_int64 * 4),
            ("nb", ctypes.c_size_t * 4),
            ("op", ctypes.c_int),
            ("op_params", ctypes.c_int32 * 16),
            ("flags", ctypes.c_int32),
            ("src", ctypes.c_void_p * 10),
            ("view_src", ctypes.c_void_p),
            ("view_offs", ctypes.c_size_t),
            ("data", ctypes.c_void_p),
            ("name", ctypes.c_char * 64),
            ("extra", ctypes.c_void_p),
            ("padding", ctypes.c_char * 8),
        ]

    captured: dict[str, object] = {}
    step = [0]

    def on_tensor(pointer, ask, _user):
        if ask:
            return True
        t = ctypes.cast(pointer, ctypes.POINTER(GgmlTensor)).contents
        if t.type != 0 or not t.data:  # GGML_TYPE_F32 only
            return True
        ne, nb = list(t.ne), list(t.nb)
        span = 1 + sum((ne[d] - 1) * nb[d] // 4 for d in range(4) if ne[d] > 0)
        flat = np.ctypeslib.as_array(ctypes.cast(t.data, ctypes.POINTER(ctypes.c_float)), shape=(span,))
        value = np.lib.stride_tricks.as_strided(flat, shape=ne[::-1], strides=nb[::-1]).copy()
        key = f"{step[0]}:{t.name.decode()}"
        k = 0
        while (key if k == 0 else f"{key}#{k}") in captured:
            k += 1
        captured[key if k == 0 else f"{key}#{k}"] = value
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(on_tensor)
    create_context = llama_cpp.llama_init_from_model

    def with_callback(model_handle, params):
        params.cb_eval = callback
        params.cb_eval_user_data = None
        return create_context(model_handle, params)

    llama_cpp.llama_init_from_model = with_callback
    run = mg.LlamaRun(model, verbose=False, kv_cache_type=kv_cache_type)
    ids = run.tokenize(prompt, True, True)
    logits = run.decode(ids, 0)
    generated = []
    for s in range(steps):
        token = int(np.argmax(logits))
        generated.append(token)
        step[0] = s + 1
        logits = run.decode([token], len(ids) + s)
    generated.append(int(np.argmax(logits)))
    np.savez(out, **{k.replace(":", "__", 1): v for k, v in captured.items()})
    out.with_suffix(".json").write_text(json.dumps({"prompt_ids": ids, "generated": generated}))


def compare(model: Path, prompt: str, steps: int, venv: Path, kv_cache_type: str) -> int:
    import make_golden as mg
    import numpy as np

    python = mg._venv_python(venv)
    if not mg._venv_is_ready(python):
        sys.exit(f"no llama-cpp-python {mg.LLAMA_CPP_PYTHON_VERSION} in {venv}: run make_golden.py once")
    work = Path(tempfile.mkdtemp(prefix="sampler-sdk-compare-"))
    dump = work / "llama.npz"
    subprocess.check_call(
        [str(python), str(SCRIPT_PATH), "--dump-to", str(dump), "--model-path", str(model),
         "--prompt", prompt, "--steps", str(steps), "--kv-cache-type", kv_cache_type]
    )
    ref = np.load(dump)
    meta = json.loads(dump.with_suffix(".json").read_text())
    trace_dir = work / "trace"
    trace_dir.mkdir()
    os.environ["SAMPLER_SDK_TRACE_DIR"] = str(trace_dir)
    os.environ.setdefault("SAMPLER_SDK_THREADS", "2")
    from sampler_sdk import Model

    ours_model = Model(str(model), kv_cache_type=kv_cache_type)
    names = ARCH_NAMES.get(ours_model.architecture, LLAMA_NAMES)
    n_layer = 1 + max(int(k.rsplit("-", 1)[1]) for k in ref.files if k.startswith("0__l_out-"))
    failures = 0
    for step in range(steps + 1):
        for f in trace_dir.iterdir():
            f.unlink()
        generated = ours_model.generate_greedy(meta["prompt_ids"], step + 1)
        print(f"step {step}: ours {generated}, llama.cpp {meta['generated'][: step + 1]}")
        first = None
        for layer in range(n_layer):
            for name in TRACE_ORDER:
                theirs = names.get(name)
                key = f"{step}__{theirs}-{layer}" if theirs else None
                path = trace_dir / f"{name}-{layer}.f32"
                if key is None or key not in ref.files or not path.exists():
                    continue
                ours, expected = np.fromfile(path, dtype=np.float32), ref[key].reshape(-1)
                if ours.size != expected.size:  # llama.cpp keeps only the last row late in the graph
                    continue
                if not np.array_equal(ours, expected):
                    first = (layer, name, float(np.mean(ours == expected)), float(np.abs(ours - expected).max()))
                    break
            if first:
                break
        if first:
            failures += 1
            print(f"  first difference: layer {first[0]} {first[1]} "
                  f"({first[2]:.1%} of values equal, largest difference {first[3]:.3g})")
        for name in MODEL_WIDE:
            ours = np.fromfile(trace_dir / f"{name}.f32", dtype=np.float32)
            expected = ref[f"{step}__{name}"].reshape(-1)
            same = np.array_equal(ours, expected)
            failures += not same
            print(f"  {name}: {'bit-identical' if same else f'differs by up to {np.abs(ours - expected).max():.3g}'}")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registry name")
    parser.add_argument("--model-path", type=Path, help="a GGUF file instead of a registry name")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--steps", type=int, default=2, help="greedy decode steps after the prompt")
    parser.add_argument("--venv", type=Path, default=os.environ.get("SAMPLER_SDK_GOLDEN_VENV", ".golden-venv"))
    parser.add_argument("--kv-cache-type", choices=["f32", "f16"], default="f32")
    parser.add_argument("--dump-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dump_to:
        dump_llama_cpp(args.model_path, args.prompt, args.steps, args.dump_to, args.kv_cache_type)
        return
    model = args.model_path
    if model is None:
        import make_golden as mg

        model = mg.default_model_path(args.model)
    sys.exit(compare(model, args.prompt, args.steps, args.venv, args.kv_cache_type))


if __name__ == "__main__":
    main()
