"""`lsa-sglang` command line: one entry point, subcommands registered in `COMMANDS`.

To add a subcommand, add one `Command` to `COMMANDS` (or call `register_command`): a help line,
a function adding its arguments to its own sub-parser, and a function running it that returns an
exit code. Keep heavy imports (torch, sglang) inside the run functions so `lsa-sglang --help` and
`fetch-model` on a warm cache stay fast.

Conventions: stdout carries only a command's result (for `fetch-model`, the model folder, so
`$(lsa-sglang fetch-model)` works in scripts); progress and errors go to stderr. An expected
failure raises `CliError` or `AssetError` and exits 1 with its message, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence

from lsa_sglang import __version__


class CliError(RuntimeError):
    """An expected failure of a subcommand: printed as one message, exit status 1."""


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: how to declare its arguments and how to run it."""

    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _add_home(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home",
        metavar="DIR",
        default=None,
        help="cache root (default: $LSA_SGLANG_HOME, else ~/.cache/lsa-sglang); models go in DIR/models/NAME",
    )


# --- fetch-model -------------------------------------------------------------------------------


def _fetch_model_args(parser: argparse.ArgumentParser) -> None:
    from lsa_sglang import assets

    parser.add_argument(
        "name",
        nargs="?",
        default=assets.default_model_name(),
        metavar="NAME",
        help=f"model to fetch (default: {assets.default_model_name()}; see list-models)",
    )
    _add_home(parser)


def _fetch_model_run(args: argparse.Namespace) -> int:
    from lsa_sglang import assets

    path = assets.fetch_model(args.name, home=args.home)
    print(path)
    return 0


# --- list-models -------------------------------------------------------------------------------


def _list_models_run(args: argparse.Namespace) -> int:
    from lsa_sglang import assets

    default = assets.default_model_name()
    width = max(len(name) for name in assets.MODELS)
    for name, spec in assets.MODELS.items():
        cached = assets.cached_model_path(name, home=args.home)
        flag = "*" if name == default else " "
        where = str(cached) if cached else "not fetched"
        print(f"{flag} {name:<{width}}  {spec.description}  [{where}]")
    return 0


COMMANDS: dict[str, Command] = {
    "fetch-model": Command(
        help="download, verify and convert an embedded model; prints its folder",
        add_args=_fetch_model_args,
        run=_fetch_model_run,
    ),
    "list-models": Command(
        help="list the embedded models (* = default) and whether they are cached",
        add_args=_add_home,
        run=_list_models_run,
    ),
}


def register_command(name: str, command: Command) -> None:
    """Add a subcommand (for modules that prefer registering over editing COMMANDS)."""
    if name in COMMANDS:
        raise ValueError(f"subcommand {name!r} is already registered")
    COMMANDS[name] = command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsa-sglang",
        description="Lookahead Sparse Attention for SGLang: models, serving, indexer training and evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sp = sub.add_parser(name, help=command.help, description=command.help)
        command.add_args(sp)
        sp.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the chosen subcommand, turn expected failures into exit status 1."""
    from lsa_sglang.assets import AssetError

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (CliError, AssetError) as exc:
        print(f"lsa-sglang {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lsa-sglang {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
