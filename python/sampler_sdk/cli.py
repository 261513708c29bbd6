"""The ``sampler-sdk`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import registry


def _cmd_models(args: argparse.Namespace) -> int:
    if args.action == "pull":
        for name in args.names or [registry.DEFAULT_MODEL]:
            path = registry.pull(name)
            print(f"{name}: {path}")
        return 0
    for spec in registry.KNOWN_MODELS.values():
        path = registry.cached_path(spec.name)
        state = "cached" if path.exists() else "not pulled"
        default = " (default)" if spec.name == registry.DEFAULT_MODEL else ""
        print(f"{spec.name}{default}\n    {spec.description}\n    {spec.size / 1e6:.0f} MB, {state}: {path}")
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from . import load_model

    model = load_model(args.model)
    ids = model.tokenize(args.text, add_special=not args.no_special, parse_special=args.parse_special)
    for i in ids:
        piece = model.token_bytes(i, render_special=True)
        print(f"{i:>8}  {piece!r}")
    return 0


def _token_args(values):
    """CLI token arguments: digits are token ids, anything else is token text."""
    if not values:
        return None
    return [int(v) if v.isdigit() else v for v in values]


def _cmd_sample(args: argparse.Namespace) -> int:
    from .client import Client

    client = Client(args.model, initial_rng_seed=args.seed, threads=args.threads)
    sampler = client.sync_sampler
    stream = sampler.sample(
        prompt="",
        inputs=(args.prompt,),
        max_len=args.max_len,
        temperature=args.temperature,
        nucleus_p=args.nucleus_p,
        stop_tokens=args.stop_token or None,
        stop_strings=args.stop_string or None,
        rng_seed=None,
        allowed_tokens=_token_args(args.allowed_token),
        disallowed_tokens=_token_args(args.disallowed_token),
        augment_tokens=not args.no_augment,
    )
    out = sys.stdout
    if not args.show_probs:
        out.write(args.prompt)
    with stream:
        for token in stream:
            if args.show_probs:
                alts = "  ".join(f"{t.token_str!r}:{t.prob:.3f}" for t in token.top_k[:5])
                out.write(f"{token.token_id:>7} {token.token_str!r:<16} p={token.prob:.4f}  | {alts}\n")
            else:
                out.write(token.token_str)
            out.flush()
    if not args.show_probs:
        out.write("\n")
    usage = stream.usage
    if args.verbose and usage is not None:
        print(
            f"[stop: {stream.stop_reason}; prompt {usage.prompt_tokens} tokens, "
            f"sampled {usage.sampled_tokens}]",
            file=sys.stderr,
        )
    client.close()
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from .server import app
    from .server.auth import ApiKey, load_api_keys

    keys = [ApiKey(key=k, name=f"key{i + 1}") for i, k in enumerate(args.api_key)]
    if args.api_keys:
        keys += load_api_keys(args.api_keys)
    budget_db = args.budget_db or app.default_budget_db(args.api_keys, keys)
    config = app.ServerConfig(
        models=app.parse_model_args(args.model or [registry.DEFAULT_MODEL]),
        port=args.port,
        host=args.host,
        api_keys=keys,
        budget_db=budget_db,
        max_concurrent=args.max_concurrent,
        max_queue=args.max_queue,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        shutdown_grace=args.shutdown_grace,
    )
    app.configure_logging()
    return asyncio.run(app.serve(config))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sampler-sdk", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="continue a prompt with the model")
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help="registered name, GGUF path or hf://owner/repo/file.gguf")
    p.add_argument("--max-len", type=int, default=64, help="most tokens to sample")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--nucleus-p", type=float, default=0.95, help="top-p threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="initial RNG seed (default: random)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: physical cores)")
    p.add_argument("--stop-token", action="append", default=[], help="stop when this token is sampled")
    p.add_argument("--stop-string", action="append", default=[], help="stop once the output contains this")
    p.add_argument("--allowed-token", action="append", default=[], help="only sample these tokens")
    p.add_argument("--disallowed-token", action="append", default=[], help="never sample these tokens")
    p.add_argument("--no-augment", action="store_true", help="do not add leading-space variants of tokens")
    p.add_argument("--show-probs", action="store_true", help="print each token with its probability and alternatives")
    p.add_argument("-v", "--verbose", action="store_true", help="print the stop reason and usage")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("tokenize", help="show the token ids of a text")
    p.add_argument("text")
    p.add_argument("--model", default=None)
    p.add_argument("--no-special", action="store_true", help="do not add BOS/EOS")
    p.add_argument("--parse-special", action="store_true", help="turn special-token text into ids")
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser("serve", help="serve models over gRPC (own protocol and the xAI API)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME|PATH|NAME=PATH",
        help="a model to serve (repeatable; the first is the default; default: the default model)",
    )
    p.add_argument("--port", type=int, default=50051, help="port to listen on (0 = any free port)")
    p.add_argument("--host", default="[::]", help="address to bind (default: all, IPv6 and IPv4)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY", help="accept this key (repeatable; no budget)")
    p.add_argument("--api-keys", type=Path, default=None, metavar="FILE", help="keys file: one 'KEY NAME [TOKEN_BUDGET]' per line")
    p.add_argument("--budget-db", type=Path, default=None, metavar="FILE", help="SQLite file for token budgets (default: FILE.usage.sqlite beside --api-keys)")
    p.add_argument("--max-concurrent", type=int, default=4, metavar="N", help="generations running at once (others wait)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N", help="generations waiting at most (beyond: RESOURCE_EXHAUSTED)")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key")
    p.add_argument("--shutdown-grace", type=float, default=10.0, metavar="SECONDS", help="on SIGTERM, how long in-flight calls may finish")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("models", help="list or pull known models")
    p.add_argument("action", nargs="?", choices=["list", "pull"], default="list")
    p.add_argument("names", nargs="*")
    p.set_defaults(func=_cmd_models)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"sampler-sdk: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
