"""The ``fastdiff`` command line: ``generate | export | bench | info``.

Each subcommand lives in ``fastdiff/commands/<name>.py`` and exposes ``register(subparsers)``, which
adds its parser and sets ``func``. Errors fastdiff raises on purpose (bad arguments, unreadable
models, unavailable backends) exit with status 2 and one clear line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

COMMANDS = ("generate", "export", "bench", "info")


class _OneLineErrors(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a bad choice) as one line too, not the usage block first; its
    subcommands' parsers are of this class as well (add_subparsers makes them of the parent's)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# generate()'s keywords whose flag's name is not the keyword's own with dashes (its parser's dest)
KEYWORD_DESTS = {"cfg_scale": "cfg", "mask_image": "mask", "controlnet_conditioning_scale": "controlnet_scale",
                 "control_guidance_start": "control_start", "control_guidance_end": "control_end",
                 "ip_adapter_image_embeds": "ip_adapter_embeds", "ip_adapter_masks": "ip_adapter_mask"}
# a keyword is named as a word of the message: after its start, a space or an opening bracket, before a space, a
# colon, a comma, a closing bracket or the end; never inside a quoted value, a path or a call (``name=``)
_WORD = r"(?:(?<=^)|(?<=[\s(\[])){}(?=[\s:,;)\]]|$)"
# a quoted value: from a quote that follows no letter (not a possessive, "diffusers' form") to the next closing one
_QUOTED = r"(?<!\w)'[^']*'(?!\w)|(?<!\w)\"[^\"]*\"(?!\w)"


def generate_keywords() -> set:
    """The keywords of ``Pipeline.generate``, which ``generate`` and ``bench`` call (its errors name them)."""
    import inspect

    from .pipeline import Pipeline

    return set(inspect.signature(Pipeline.generate).parameters) - {"self"}


def name_flags(message: str, subparser: argparse.ArgumentParser, keywords: set) -> str:
    """An API error as the command line's: the first mention of each of ``keywords`` (the API's parameters) that a
    flag of this subcommand sets gets the flag after it (``cfg_scale != 1`` -> ``cfg_scale (--cfg) != 1``), so a
    CLI user sees what to change. Only keywords with an underscore are matched (or those in KEYWORD_DESTS): plain
    words like ``height`` are their flag's name already, and would match ordinary prose."""
    flags = {a.dest: a.option_strings[-1] for a in subparser._actions if a.option_strings and a.dest != "help"}
    words = {kw: flags[KEYWORD_DESTS.get(kw, kw)] for kw in keywords
             if KEYWORD_DESTS.get(kw, kw) in flags and ("_" in kw or kw in KEYWORD_DESTS)}
    for kw, flag in sorted(words.items()):
        if re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", message):  # the message names the flag already
            continue
        quoted = [m.span() for m in re.finditer(_QUOTED, message)]
        for match in re.finditer(_WORD.format(re.escape(kw)), message):
            if any(a < match.start() < b for a, b in quoted):
                continue  # (inside a quoted value: a file name, a user's string)
            message = f"{message[:match.end()]} ({flag}){message[match.end():]}"
            break
    return message


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _OneLineErrors(
        prog="fastdiff",
        description="fastdiff: fast inference for diffusion models (UNet, DiT) - generate images, export "
                    "ONNX / TensorRT artifacts, benchmark latency, inspect the machine.")
    parser.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"fastdiff.commands.{name}")
        except ModuleNotFoundError as e:  # a subcommand not shipped yet
            if e.name != f"fastdiff.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def _subparsers(parser: argparse.ArgumentParser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def main(argv=None) -> int:
    from .errors import FastdiffError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # No subcommand is a usage error: the help goes to stderr, as argparse's own errors do, so a script
        # piping stdout gets nothing it could mistake for a result.
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except FastdiffError as e:
        message = str(e)
        if args.command in ("generate", "bench"):  # (they call Pipeline.generate, whose errors name its keywords)
            message = name_flags(message, _subparsers(parser).choices[args.command], generate_keywords())
        print(f"fastdiff {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastdiff {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
