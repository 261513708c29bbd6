"""Continuous batching: generations running at the same time on one model are decoded
together, one forward call per step, and each still gets exactly the tokens, probabilities
and attention it gets alone. Checked at the engine level, where timing can be controlled:
sequences join while others are mid-stream, leave early (max_len, stop string, cancel),
and prefill long prompts (several chunks) beside others' decode steps."""

from __future__ import annotations

import threading

import pytest
import sampler_sdk

PROMPTS = [
    "The answer to life and the universe is",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    # Several prefill chunks of 64 tokens, so its prefill overlaps other sequences' decode.
    " ".join(f"word{i}" for i in range(90)) + " and finally",
    "Bonjour, je m'appelle",
]


class Recorder:
    """Collects one generation's events; `tokens_seen` lets a test wait for progress."""

    def __init__(self):
        self.tokens = []
        self.outcome = None
        self.error = None
        self.done = threading.Event()
        self.progress = threading.Condition()

    def __call__(self, kind, payload):
        if kind == "token":
            with self.progress:
                self.tokens.append(payload)
                self.progress.notify_all()
        elif kind == "done":
            self.outcome = payload
            self.done.set()
        else:
            self.error = payload
            self.done.set()

    def wait_for_tokens(self, n, timeout=60):
        with self.progress:
            assert self.progress.wait_for(lambda: len(self.tokens) >= n or self.done.is_set(), timeout)


def request(engine, i, **overrides):
    args = dict(
        max_len=12 + 3 * i,
        temperature=[0.0, 0.8, 1.0, 1.3, 0.5][i % 5],
        nucleus_p=[1.0, 0.9, 0.95, 1.0, 0.7][i % 5],
        seed=1000 + i,
        return_attention=(i == 1),
    )
    args.update(overrides)
    return engine.tokenize(PROMPTS[i % len(PROMPTS)]), args


def comparable(recorder):
    """Everything a token carries, attention as exact float lists."""
    return [
        (tid, raw, text, prob, logprob, tuple(top), None if att is None else att.tolist())
        for tid, raw, text, prob, logprob, top, att in recorder.tokens
    ]


def run_alone(engine, prompt, args):
    rec = Recorder()
    engine.generate(prompt, rec, **args).wait(120)
    assert rec.done.wait(120) and rec.error is None, rec.error
    return rec


def check_batched_equals_alone(model_path, n_sequences, stagger):
    engine = sampler_sdk.Model(str(model_path), threads=2)
    requests = [request(engine, i) for i in range(n_sequences)]
    alone = [run_alone(engine, p, a) for p, a in requests]

    recorders, handles = [], []
    for i, (prompt, args) in enumerate(requests):
        rec = Recorder()
        handles.append(engine.generate(prompt, rec, **args))
        recorders.append(rec)
        if stagger and i % 2 == 0:
            # Join while the earlier ones are mid-stream.
            rec.wait_for_tokens(2)
    for h in handles:
        assert h.wait(180)
    for i, (rec, ref) in enumerate(zip(recorders, alone)):
        assert rec.error is None, rec.error
        assert comparable(rec) == comparable(ref), f"sequence {i} differs when batched"
        assert rec.outcome == ref.outcome
    stats = engine.batching_stats()
    assert stats["peak_batch"] >= 2, stats
    return stats


def test_batched_generations_equal_solo_ones_smollm(smollm_path):
    stats = check_batched_equals_alone(smollm_path, 5, stagger=True)
    # Steps were shared: fewer forward calls than sequence-steps.
    assert stats["steps"] < stats["sequence_steps"]


def test_batched_generations_equal_solo_ones_gemma(gemma_path):
    check_batched_equals_alone(gemma_path, 4, stagger=False)


def test_sequences_leave_by_cancel_and_stop_string_without_disturbing_others(smollm_path):
    engine = sampler_sdk.Model(str(smollm_path), threads=2)
    steady_prompt, steady_args = request(engine, 2, max_len=40, temperature=1.0)
    reference = run_alone(engine, steady_prompt, steady_args)

    steady = Recorder()
    steady_handle = engine.generate(steady_prompt, steady, **steady_args)
    cancelled = Recorder()
    cancel_prompt, cancel_args = request(engine, 0, max_len=400)
    cancel_handle = engine.generate(cancel_prompt, cancelled, **cancel_args)
    stopper = Recorder()
    stop_prompt, stop_args = request(engine, 1, max_len=400, stop_strings=[" "])
    stop_handle = engine.generate(stop_prompt, stopper, **stop_args)

    cancelled.wait_for_tokens(3)
    cancel_handle.cancel()
    for h in (steady_handle, cancel_handle, stop_handle):
        assert h.wait(120)
    assert cancelled.outcome["stop_reason"] == "cancelled"
    assert len(cancelled.tokens) < 400
    assert stopper.outcome["stop_reason"] in ("stop_string", "end_of_sequence")
    assert comparable(steady) == comparable(reference)
    assert steady.outcome == reference.outcome


def test_more_generations_than_max_batch_wait_their_turn(smollm_path):
    engine = sampler_sdk.Model(str(smollm_path), threads=2, max_batch=2)
    requests = [request(engine, i, max_len=6) for i in range(5)]
    alone = [run_alone(engine, p, a) for p, a in requests]
    recorders = [Recorder() for _ in requests]
    handles = [engine.generate(p, rec, **a) for (p, a), rec in zip(requests, recorders)]
    for h in handles:
        assert h.wait(120)
    assert [comparable(r) for r in recorders] == [comparable(r) for r in alone]
    assert engine.batching_stats()["peak_batch"] == 2


def test_bad_request_is_rejected_before_joining_the_batch(smollm_path):
    engine = sampler_sdk.Model(str(smollm_path), threads=1)
    with pytest.raises(ValueError, match="max_len"):
        engine.generate([1, 2, 3], Recorder(), max_len=0)
    with pytest.raises(ValueError, match="max_batch"):
        sampler_sdk.Model(str(smollm_path), max_batch=0)
