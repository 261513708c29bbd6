"""The ``sampler-sdk`` command line."""

from __future__ import annotations

import argparse
import sys
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


def _cmd_sample(args: argparse.Namespace) -> int:
    from . import load_model

    model = load_model(args.model)
    prompt = model.tokenize(args.prompt, add_special=True, parse_special=True)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    ids = model.generate_greedy(prompt, args.max_len)
    eog = set(model.end_of_generation_ids)
    text = model.detokenize([i for i in ids if i not in eog])
    out.write(text + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sampler-sdk", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="continue a prompt with the model")
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help="registered name, GGUF path or hf://owner/repo/file.gguf")
    p.add_argument("--max-len", type=int, default=32, help="most tokens to sample")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("tokenize", help="show the token ids of a text")
    p.add_argument("text")
    p.add_argument("--model", default=None)
    p.add_argument("--no-special", action="store_true", help="do not add BOS/EOS")
    p.add_argument("--parse-special", action="store_true", help="turn special-token text into ids")
    p.set_defaults(func=_cmd_tokenize)

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
