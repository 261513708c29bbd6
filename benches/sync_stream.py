#!/usr/bin/env python3
"""Client streaming next to engine decode, alternating in one process (paired medians).

    python benches/sync_stream.py MODEL.gguf --threads 1 --reps 9

Modes, run in turn each repetition on one engine: `decode` (engine-side greedy rate, as in
compare.py), `stream` (raw `Model.generate`, callback on the engine thread), `raw_q`
(callback -> SimpleQueue -> this thread), `sync_old` (the event-loop round trip per token
that `SyncSampleStream` made before it streamed straight from the engine), `sync`
(`client.sync_sampler`) and `async` (`client.sampler`). Rates are first to last token;
`paired` is the median over repetitions of mode/decode measured side by side, `best` the
best rate over the best decode.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import statistics
import sys
import threading
from time import perf_counter


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=255)
    p.add_argument("--modes", default="decode,stream,sync_old,sync,async")
    a = p.parse_args()
    os.environ["SAMPLER_SDK_THREADS"] = str(a.threads)
    import sampler_sdk

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from compare import PROMPT_TEXT

    client = sampler_sdk.Client(a.model, threads=a.threads)
    # One engine for every mode: a second Model of the same file could differ in memory layout.
    engine = next(iter(client._stub._models.values())).engine
    text = PROMPT_TEXT
    ids = engine.tokenize(text)
    while len(ids) < a.prompt_tokens:
        text += PROMPT_TEXT
        ids = engine.tokenize(text)
    ids = list(ids[: a.prompt_tokens])
    engine.generate_greedy(ids[:16], 4)
    intervals: dict = {}

    def rate(mode, stamps):
        iv = sorted(b - a for a, b in zip(stamps, stamps[1:]))
        intervals.setdefault(mode, []).append(iv[len(iv) // 2] * 1e3)
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    def decode():
        t0 = perf_counter()
        engine.generate_greedy(ids, 1)
        one = perf_counter() - t0
        t0 = perf_counter()
        out = engine.generate_greedy(ids, a.gen)
        all_ = perf_counter() - t0
        return (len(out) - 1) / (all_ - one), out

    def stream():
        stamps, toks = [], []
        done = threading.Event()

        def on_event(kind, payload):
            if kind == "token":
                stamps.append(perf_counter())
                toks.append(payload[0])
            else:
                done.set()

        handle = engine.generate(ids, on_event, max_len=a.gen, temperature=0.0, seed=0)
        done.wait(600)
        handle.wait()
        return rate("stream", stamps), toks

    def raw_q():
        stamps, toks = [], []
        q: queue.SimpleQueue = queue.SimpleQueue()
        handle = engine.generate(ids, lambda k, p: q.put((k, p)), max_len=a.gen, temperature=0.0, seed=0)
        while True:
            kind, payload = q.get()
            if kind != "token":
                break
            stamps.append(perf_counter())
            toks.append(payload[0])
        handle.wait()
        return rate("raw_q", stamps), toks

    sync_sampler = client.sync_sampler

    def old_sync_tokens(stream):
        # SyncSampleStream.__next__ before it streamed straight from the engine.
        async def step():
            try:
                return await stream.__anext__()
            except StopAsyncIteration:
                return None

        while True:
            token = sync_sampler._run(step())
            if token is None:
                return
            yield token

    def timed(mode, tokens):
        stamps, toks = [], []
        for t in tokens:
            stamps.append(perf_counter())
            toks.append(t.token_id)
        return rate(mode, stamps), toks

    kwargs = dict(inputs=(ids,), max_len=a.gen, temperature=0.0, rng_seed=0)

    def sync_old():
        return timed("sync_old", old_sync_tokens(client.sampler.sample(**kwargs)))

    def sync():
        return timed("sync", sync_sampler.sample(**kwargs))

    loop = asyncio.new_event_loop()

    def async_():
        async def go():
            stamps, toks = [], []
            async for t in client.sampler.sample(**kwargs):
                stamps.append(perf_counter())
                toks.append(t.token_id)
            return rate("async", stamps), toks

        return loop.run_until_complete(go())

    every = {"decode": decode, "stream": stream, "raw_q": raw_q, "sync_old": sync_old, "sync": sync, "async": async_}
    modes = {m: every[m] for m in a.modes.split(",")}
    results: dict = {m: [] for m in modes}
    for r in range(a.reps):
        parts = []
        ref = None
        for m, fn in modes.items():
            v, toks = fn()
            if m == "decode":
                ref = toks
            elif ref is not None and toks != ref[: len(toks)]:
                print(f"  token mismatch in {m}!", toks[:8], ref[:8])
            results[m].append(v)
            parts.append(f"{m} {v:.1f}")
        print(f"rep {r}: " + "  ".join(parts), flush=True)
    line = f"{os.path.basename(a.model)} {a.threads}t reps={a.reps} gen={a.gen}"
    if "decode" in results:
        dec = results["decode"]
        line += f": decode med {statistics.median(dec):.1f} tok/s"
        for m in modes:
            if m != "decode":
                paired = statistics.median(v / d for v, d in zip(results[m], dec))
                line += (f" | {m} med {statistics.median(results[m]):.1f} paired {paired:.3f}"
                         f" best {max(results[m]) / max(dec):.3f}")
    print(line)
    if "sync_old" in results and "sync" in results:
        ratio = statistics.median(n / o for n, o in zip(results["sync"], results["sync_old"]))
        print(f"  sync/sync_old paired median {ratio:.3f}")
    print("  median inter-token interval ms (median over reps): "
          + " | ".join(f"{k} {statistics.median(v):.3f}" for k, v in intervals.items()))


if __name__ == "__main__":
    main()
