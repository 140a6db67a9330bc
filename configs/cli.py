"""Command lines of the entry scripts: flags and `key=value` config overrides in any order.

    args = parse_cli(parser, argv)

`parser` is an argparse parser whose command (or subcommand) takes a positional
`overrides` (nargs="*"); flags may come before, between or after the overrides, as in
`python train.py tiny train.steps=10 --dry-run model.d_model=128`. argparse's own
parse_intermixed_args does this too but refuses parsers with subcommands, so parse_cli uses
parse_known_args and routes what is left over: key=value strings join `args.overrides` (in
command-line order), anything else is a one-line error on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import re
import sys

# A dotted config key (model.d_model, serve.prefill_buckets), then '=' and any value.
OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=.*", re.DOTALL)


def is_override(arg: str) -> bool:
    """Whether `arg` has the form key=value with a dotted config key."""
    return OVERRIDE.fullmatch(arg) is not None


def fail(message: str) -> None:
    """Bad command line: one line on stderr, exit code 2 (as argparse's own usage errors)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_cli(parser: argparse.ArgumentParser, argv: list[str] | None = None,
              dest: str = "overrides") -> argparse.Namespace:
    """Parse `argv` (default sys.argv[1:]) with `parser`, flags and key=value in any order.

    The overrides end up in `args.<dest>` (a list, in command-line order) whenever the chosen
    (sub)command has a positional of that name; each must look like key=value. Unknown flags,
    stray words and overrides given to a command without `dest` exit with code 2 and a one-line
    message naming the argument. Typical use:

        p = argparse.ArgumentParser()
        p.add_argument("checkpoint")
        p.add_argument("overrides", nargs="*", help="config overrides, key=value")
        p.add_argument("--int8", action="store_true")
        args = parse_cli(p, argv)  # `ckpt --int8 serve.max_batch=16` -> args.overrides == ["serve.max_batch=16"]

    With subcommands, give each subparser that takes overrides its own `overrides` positional.
    """
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    takes_overrides = hasattr(args, dest)
    overrides = list(getattr(args, dest, None) or [])
    for arg in extra:
        if arg.startswith("-"):
            fail(f"unrecognized argument {arg!r} (see --help)")
        if is_override(arg) and not takes_overrides:
            fail(f"unexpected argument {arg!r}: this command takes no key=value overrides")
        overrides.append(arg)
    # Strays land in `extra` or, when argparse took them positionally, in `overrides` (which of
    # the two depends on the Python version), so both are checked here with one message.
    for arg in overrides:
        if not is_override(arg):
            fail(f"unexpected argument {arg!r}: config overrides look like key=value (e.g. train.steps=100)")
    if takes_overrides:
        setattr(args, dest, overrides)
    return args
