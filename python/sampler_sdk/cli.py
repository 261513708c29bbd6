"""The ``sampler-sdk`` command line."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

from . import registry


def _info_path(model: str) -> Path:
    """The file `models info` reads: a registered model only if already pulled (inspecting
    should not start a download), otherwise whatever `registry.resolve` makes of it."""
    if model in registry.KNOWN_MODELS:
        path = registry.cached_path(model)
        if not path.exists():
            raise FileNotFoundError(
                f"model {model!r} is not pulled yet; run `sampler-sdk models pull {model}`"
            )
        return path
    return registry.resolve(model)


def _array_length(value: Any) -> int | None:
    """Length of a metadata array as `inspect_gguf` reports it (a list, or a summary string
    such as "<array of 49152 values>" for long arrays)."""
    if isinstance(value, list):
        return len(value)
    match = re.fullmatch(r"<array of (\d+) \w+>", value) if isinstance(value, str) else None
    return int(match.group(1)) if match else None


def model_info(path: Path) -> dict[str, Any]:
    """What `models info` prints: architecture, size, context, vocabulary and quantization mix
    of a GGUF file, read from its header alone (no weights are loaded)."""
    from . import inspect_gguf

    gguf = inspect_gguf(str(path))
    metadata, tensors = gguf["metadata"], gguf["tensors"]
    arch = metadata.get("general.architecture")

    def arch_key(suffix: str) -> Any:
        return metadata.get(f"{arch}.{suffix}")

    n_params = 0
    for tensor in tensors:
        elements = 1
        for dim in tensor["dims"]:
            elements *= dim
        n_params += elements
    counts: Counter[str] = Counter(t["type"] for t in tensors)
    sizes: Counter[str] = Counter()
    for tensor in tensors:
        sizes[tensor["type"]] += tensor["size_bytes"]
    # The engine sizes the vocabulary by the token embedding, the tensor it indexes.
    embedding = next((t for t in tensors if t["name"] == "token_embd.weight"), None)
    n_vocab = embedding["dims"][1] if embedding and len(embedding["dims"]) > 1 else None
    experts = arch_key("expert_count") or 0
    return {
        "path": str(path),
        "name": metadata.get("general.name"),
        "architecture": arch,
        "experts": experts,
        "experts_used": arch_key("expert_used_count") if experts else None,
        "parameters": n_params,
        "context_length": arch_key("context_length"),
        "vocabulary_size": n_vocab,
        "tokenizer_tokens": _array_length(metadata.get("tokenizer.ggml.tokens")),
        "tokenizer_model": metadata.get("tokenizer.ggml.model"),
        "layers": arch_key("block_count"),
        "embedding_length": arch_key("embedding_length"),
        "heads": arch_key("attention.head_count"),
        "kv_heads": arch_key("attention.head_count_kv"),
        "tensors": len(tensors),
        "file_bytes": sum(sizes.values()),
        # Largest share of the bytes first.
        "quantization": [
            {"type": ty, "tensors": counts[ty], "bytes": sizes[ty]}
            for ty in sorted(counts, key=lambda ty: (-sizes[ty], ty))
        ],
    }


def _human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _print_info(info: dict[str, Any]) -> None:
    arch = info["architecture"]
    if info["experts"]:
        arch += f" (mixture of experts: {info['experts_used']} of {info['experts']} per token)"
    vocabulary = f"{info['vocabulary_size']}"
    if info["tokenizer_tokens"] is not None and info["tokenizer_tokens"] != info["vocabulary_size"]:
        vocabulary += f" (tokenizer lists {info['tokenizer_tokens']})"
    if info["tokenizer_model"]:
        vocabulary += f", tokenizer {info['tokenizer_model']}"
    shape = f"{info['layers']} layers, width {info['embedding_length']}, {info['heads']} heads"
    if info["kv_heads"] not in (None, info["heads"]):
        shape += f" ({info['kv_heads']} key/value)"
    lines = [
        info["path"],
        f"  name:           {info['name'] or '(none)'}",
        f"  architecture:   {arch}",
        f"  shape:          {shape}",
        f"  parameters:     {_human_count(info['parameters'])} ({info['parameters']:,})",
        f"  context length: {info['context_length']}",
        f"  vocabulary:     {vocabulary}",
        f"  tensors:        {info['tensors']}, {info['file_bytes'] / 1e6:.1f} MB of weights",
        "  quantization:",
    ]
    for q in info["quantization"]:
        share = 100 * q["bytes"] / info["file_bytes"] if info["file_bytes"] else 0.0
        noun = "tensor " if q["tensors"] == 1 else "tensors"
        megabytes = q["bytes"] / 1e6
        lines.append(
            f"    {q['type']:<6} {q['tensors']:>5} {noun} {megabytes:>10.2f} MB  {share:5.1f}%"
        )
    print("\n".join(lines))


def _cmd_models(args: argparse.Namespace) -> int:
    if args.action == "info":
        infos = [model_info(_info_path(name)) for name in args.names]
        if args.json:
            print(json.dumps(infos if len(infos) > 1 else infos[0], indent=2))
        else:
            for info in infos:
                _print_info(info)
        return 0
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

    client = Client(
        args.model,
        initial_rng_seed=args.seed,
        threads=args.threads,
        tokenizer=args.tokenizer,
        kv_cache_type=args.kv_cache_type,
    )
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
        threads=args.threads,
        tokenizer=args.tokenizer,
        kv_cache_type=args.kv_cache_type,
    )
    app.configure_logging()
    return asyncio.run(app.serve(config))


def _add_kv_cache_type(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv-cache-type",
        choices=["f16", "f32"],
        default=None,
        help="how keys and values are cached (default f16, as llama.cpp's)",
    )


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
    _add_kv_cache_type(p)
    p.add_argument("--tokenizer", type=Path, default=None, metavar="FILE", help="a SentencePiece .model file to use instead of the GGUF's vocabulary")
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
    p.add_argument("--max-concurrent", type=int, default=32, metavar="N", help="generations running at once, decoded together in one batch per step (others wait)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N", help="generations waiting at most (beyond: RESOURCE_EXHAUSTED)")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key")
    p.add_argument("--shutdown-grace", type=float, default=10.0, metavar="SECONDS", help="on SIGTERM, how long in-flight calls may finish")
    p.add_argument("--threads", type=int, default=None, help="compute threads per model (default: physical cores)")
    _add_kv_cache_type(p)
    p.add_argument("--tokenizer", type=Path, default=None, metavar="FILE", help="a SentencePiece .model file for the (single) model")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("models", help="list, pull or describe models")
    p.set_defaults(func=_cmd_models, action="list")
    actions = p.add_subparsers(dest="action")
    actions.add_parser("list", help="known models and whether they are pulled (the default)")
    q = actions.add_parser("pull", help="download registered models into the cache")
    q.add_argument("names", nargs="*", help=f"registered names (default: {registry.DEFAULT_MODEL})")
    q = actions.add_parser(
        "info", help="architecture, size, context, vocabulary and quantization mix of a model"
    )
    q.add_argument("names", nargs="+", metavar="PATH|NAME", help="GGUF path or registered name")
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
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
