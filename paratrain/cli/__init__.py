"""``paratrain`` command line: a thin layer over the library.

Each subcommand lives in its own module here with ``register(subparsers)``; heavy imports (torch)
happen inside the command, so planning commands stay fast. User errors
(:class:`~paratrain.errors.ConfigError`) print one paragraph and exit with code 2; a failed rank
prints that rank's error and exits with code 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from typing import NoReturn

from paratrain.errors import ConfigError, Interrupted

COMMANDS = ("train", "bench", "estimate", "plan", "simulate", "calibrate", "schedule", "convert", "prepare-data",
            "explain")


class _Parser(argparse.ArgumentParser):
    """argparse with a short usage error: one usage line pointing at ``--help`` (a command's whole
    usage is 20+ lines), the error, and the closest option for a misspelt one."""

    def error(self, message: str) -> NoReturn:
        import difflib

        unknown = [w.split("=")[0] for w in message.partition("unrecognized arguments: ")[2].split()
                   if w.startswith("--")]
        options = [o for a in self._actions for o in a.option_strings]
        close = []
        for w in unknown:  # the closest option(s), ties included (--dpp: --pp or --dp)
            scores = {o: difflib.SequenceMatcher(None, w, o).ratio() for o in options}
            best = max(scores.values(), default=0.0)
            close += [o for o, r in scores.items() if r == best >= 0.6]
        hint = f"; did you mean {' or '.join(dict.fromkeys(close))}?" if close else ""
        commands = "COMMAND " if self.prog == "paratrain" else ""
        self.exit(2, f"usage: {self.prog} {commands}[options]   (all of them: {self.prog} --help)\n"
                     f"{self.prog}: error: {message}{hint}\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with ``only`` (a command's name) just that sub-command's
    options: a planning command then does not import the training side to build its parser."""
    parser = _Parser(
        prog="paratrain",
        description="Train models with data, tensor and pipeline parallelism on torch.distributed, "
                    "and plan which layout to use.",
        epilog="Run 'paratrain COMMAND --help' for the options of one command.",
    )
    from paratrain import __version__

    parser.add_argument("--version", action="version", version=f"paratrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in ([only] if only in COMMANDS else COMMANDS):
        importlib.import_module(f"paratrain.cli.{name.replace('-', '_')}").register(sub)
    return parser


def error(message: str) -> int:
    text = textwrap.fill(message, width=100, subsequent_indent="  ", break_on_hyphens=False)  # flags stay whole
    print(f"paratrain: error: {text}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(words[0] if words else None)
    args, extra = parser.parse_known_args(argv)
    if extra:  # the sub-command's usage, not the top-level one, goes with its unknown flag
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = int(args.run(args) or 0)
    except ConfigError as e:
        code = error(str(e))
    except KeyboardInterrupt:
        print("paratrain: interrupted", file=sys.stderr)
        code = 130
    except Interrupted as e:  # SIGTERM & co. inside a command that did not report it itself
        print(f"paratrain: {e}", file=sys.stderr)
        code = e.exit_code
    except BrokenPipeError:  # `paratrain plan | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        code = 141
    except BaseException:  # under torchrun this process is a rank: report, then end like one
        if not _is_rank_process():
            raise
        import traceback

        traceback.print_exc()
        code = 1
    if _is_rank_process():
        from paratrain.rank import end_process

        end_process(code)  # skip interpreter finalisation, as launched ranks do (paratrain/rank.py)
    return code


def _is_rank_process() -> bool:
    """Started by an outside torchrun and torch.distributed was used in this process (checked
    first: the planning commands never import the launcher)."""
    if "torch.distributed" not in sys.modules:
        return False
    from paratrain.launch import under_torchrun

    return under_torchrun()
