"""Load test of `sampler-sdk serve` over loopback (a benchmark, not a test).

Starts a server on 127.0.0.1 with the default model (or uses `--address` of one already
running, which must be a loopback address), then:

1. reference: each of a few (prompt, seed) pairs once, alone; the token ids are the
   expected answer for every later request with the same pair;
2. throughput: aggregate sampled tokens/s with 1 and with 8 concurrent streams;
3. soak: 32 concurrent streams x N requests each, every result compared with its
   reference, counting errors and lost, duplicated or reordered tokens;

and samples the server's resident memory (VmRSS) between phases. Everything is bounded
by request counts and by `--max-seconds`; it stops by itself.

    python benches/load_test.py                      # small default run
    python benches/load_test.py --requests 200       # the full 32 x 200 soak
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from sampler_sdk import AsyncSampler, registry
from sampler_sdk.grpc_stub import GrpcStub

PROMPTS = (
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "The three primary colours are",
)


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0
    mismatched: int = 0
    tokens: int = 0
    error_samples: List[str] = field(default_factory=list)


def rss_kib(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def require_loopback(address: str) -> None:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(
        f"--address: {address!r} is not a loopback address; this load test only targets this machine"
    )


def start_server(model: str, max_concurrent: int) -> Tuple[subprocess.Popen, str]:
    command = [
        sys.executable, "-m", "sampler_sdk.cli", "serve",
        "--host", "127.0.0.1", "--port", "0",
        "--model", model, "--max-concurrent", str(max_concurrent), "--max-queue", "1024",
    ]  # fmt: skip
    log = open(os.devnull, "w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    found: List[int] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if "listening on" in line:
                found.append(int(line.rsplit(":", 1)[1]))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(180)
    if not found:
        process.kill()
        raise SystemExit("the server did not start within 180 s")
    return process, f"127.0.0.1:{found[0]}"


async def one_request(stub: GrpcStub, case: int, max_len: int) -> List[int]:
    sampler = AsyncSampler(stub, initial_rng_seed=0)
    stream = sampler.sample(
        inputs=(PROMPTS[case % len(PROMPTS)],),
        max_len=max_len,
        temperature=0.8,
        rng_seed=1000 + case,
    )
    ids = [t.token_id async for t in stream]
    if stream.usage is None or stream.usage.sampled_tokens != len(ids):
        raise RuntimeError(f"usage says {stream.usage} but {len(ids)} tokens arrived")
    return ids


async def run_streams(
    stub: GrpcStub,
    streams: int,
    requests_each: int,
    max_len: int,
    references: Dict[int, List[int]],
    deadline: float,
) -> Tuple[Tally, float]:
    tally = Tally()

    async def worker(w: int) -> None:
        for r in range(requests_each):
            if time.monotonic() >= deadline:
                return
            case = (w + r) % len(references)
            tally.requests += 1
            try:
                ids = await one_request(stub, case, max_len)
            except Exception as exc:  # counted, not fatal: that is what a load test measures
                tally.errors += 1
                if len(tally.error_samples) < 5:
                    tally.error_samples.append(f"{type(exc).__name__}: {exc}")
                continue
            tally.tokens += len(ids)
            if ids != references[case]:
                tally.mismatched += 1

    start = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(streams)))
    return tally, time.monotonic() - start


async def main_async(args: argparse.Namespace, address: str, server_pid: Optional[int]) -> dict:
    stub = GrpcStub(address, api_key=args.api_key)
    deadline = time.monotonic() + args.max_seconds
    report: dict = {"address": address, "max_len": args.max_len, "rss_kib": {}}

    def mark(phase: str) -> None:
        if server_pid is not None:
            report["rss_kib"][phase] = rss_kib(server_pid)

    mark("start")
    references: Dict[int, List[int]] = {}
    for case in range(len(PROMPTS)):
        references[case] = await one_request(stub, case, args.max_len)
    mark("after_reference")

    for streams in (1, 8):
        tally, seconds = await run_streams(
            stub, streams, args.throughput_requests, args.max_len, references, deadline
        )
        report[f"streams_{streams}"] = {
            "requests": tally.requests,
            "tokens": tally.tokens,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(tally.tokens / seconds, 2) if seconds else None,
            "errors": tally.errors,
            "mismatched": tally.mismatched,
        }
        mark(f"after_streams_{streams}")
    one = report["streams_1"]["tokens_per_s"] or 0
    eight = report["streams_8"]["tokens_per_s"] or 0
    report["speedup_8_vs_1"] = round(eight / one, 2) if one else None

    samples: List[int] = []

    async def sample_rss() -> None:
        while server_pid is not None:
            value = rss_kib(server_pid)
            if value is not None:
                samples.append(value)
            await asyncio.sleep(2.0)

    sampler_task = asyncio.ensure_future(sample_rss())
    tally, seconds = await run_streams(stub, 32, args.requests, args.max_len, references, deadline)
    sampler_task.cancel()
    report["soak_32_streams"] = {
        "requests_per_stream": args.requests,
        "requests": tally.requests,
        "tokens": tally.tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tally.tokens / seconds, 2) if seconds else None,
        "errors": tally.errors,
        "lost_duplicated_or_reordered": tally.mismatched,
        "error_samples": tally.error_samples,
        "stopped_by_time_limit": time.monotonic() >= deadline,
    }
    if len(samples) >= 8:
        # Memory is flat when the last quarter of the soak peaks no higher than the
        # second quarter did (the first quarter is the warm-up of 32 KV caches).
        quarter = len(samples) // 4
        report["soak_32_streams"]["rss_kib_peak_by_quarter"] = [
            max(samples[i * quarter : (i + 1) * quarter]) for i in range(4)
        ]
    mark("after_soak")
    await stub.aclose()
    return report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", help="a running loopback server (default: start one)")
    parser.add_argument("--api-key", default="load-test")
    parser.add_argument("--model", default=registry.DEFAULT_MODEL)
    parser.add_argument("--max-len", type=int, default=16, help="tokens per request")
    parser.add_argument(
        "--requests", type=int, default=2, help="requests per stream in the 32-stream soak"
    )
    parser.add_argument(
        "--throughput-requests", type=int, default=2, help="requests per stream at 1 and 8 streams"
    )
    parser.add_argument(
        "--max-concurrent", type=int, default=32, help="for the server this script starts"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=900, help="stop issuing requests after this"
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON report")
    args = parser.parse_args(argv)

    process = None
    if args.address:
        require_loopback(args.address)
        address, pid = args.address, None
    else:
        process, address = start_server(args.model, args.max_concurrent)
        pid = process.pid
    try:
        report = asyncio.run(main_async(args, address, pid))
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(json.dumps(report, indent=2))
    soak = report["soak_32_streams"]
    print(
        f"\n1 stream: {report['streams_1']['tokens_per_s']} tok/s; 8 streams: {report['streams_8']['tokens_per_s']} tok/s "
        f"(x{report['speedup_8_vs_1']}); soak: {soak['requests']} requests, {soak['errors']} errors, "
        f"{soak['lost_duplicated_or_reordered']} with lost/duplicated tokens; server RSS (KiB): {report['rss_kib']}"
    )
    return 0 if soak["errors"] == 0 and soak["lost_duplicated_or_reordered"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
