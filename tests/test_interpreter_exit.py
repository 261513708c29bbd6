"""A process that generated with a model exits cleanly, whatever state the model's batcher
thread is in when the interpreter finalizes: idle with the model alive, its loop ended by a
model dropped before exit or during finalization, or in the middle of a generation.

The batcher thread keeps a Python thread state for its whole life (so that each token's
delivery only takes the GIL); these runs check that ending it never hangs or crashes."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = r"""
import gc, sys, threading, time
import sampler_sdk

model = sampler_sdk.Model(sys.argv[1])
ids = model.tokenize("Hello there, how are you")
done = threading.Event()
tokens = []

def on_event(kind, payload):
    if kind == "token":
        tokens.append(payload[0])
    else:
        done.set()

model.generate(ids, on_event, max_len=4, temperature=0.0, seed=0)
assert done.wait(120), "the first generation did not finish"
mode = sys.argv[2]
if mode == "dropped":
    del model
    gc.collect()
    time.sleep(0.2)
elif mode == "dropped_at_exit":
    del model
elif mode == "generating":
    done.clear()
    model.generate(ids, on_event, max_len=400, temperature=0.0, seed=0)
    while len(tokens) < 8:
        time.sleep(0.01)
print("exiting", mode, len(tokens), flush=True)
"""


@pytest.mark.parametrize("mode", ["alive", "dropped", "dropped_at_exit", "generating"])
def test_process_exits_cleanly_with_a_batcher_thread(smollm_path, mode):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(smollm_path), mode],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"exiting {mode} "), done.stdout
