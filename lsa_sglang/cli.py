"""`lsa-sglang` command line: one entry point, subcommands registered in `COMMANDS`; and the
scaffold both command lines (`lsa-sglang`, `lsa-bench`) are built on (`Command`, `command_parser`,
`run_command`, `CliError`).

To add a subcommand, add one `Command` to `COMMANDS` (or call `register_command`): a help line,
a function adding its arguments to its own sub-parser, and a function running it that returns an
exit code; or a help line and `script=`, a module with its own `main(argv, prog)`. Keep heavy
imports (torch, sglang) inside the run functions so `lsa-sglang --help` and `fetch-model` on a
warm cache stay fast.

Conventions: stdout carries only a command's result (for `fetch-model`, the model folder, so
`$(lsa-sglang fetch-model)` works in scripts); progress and errors go to stderr. An expected
failure raises `CliError` or `AssetError` and exits 1 with its message, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lsa_sglang import __version__


class CliError(RuntimeError):
    """An expected failure of a subcommand: printed as one message, exit status 1."""


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: how to declare its arguments and how to run it; or, for a `script`
    command, the module whose `main(argv, prog) -> int` parses its own arguments and runs
    (`PROG NAME ARGS...`; `PROG NAME --help` prints the module's help)."""

    help: str
    add_args: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int] | None = None
    script: str | None = None

    def __post_init__(self) -> None:
        if (self.script is None) == (self.run is None):
            raise ValueError("a Command has either run (with add_args) or script")


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


# --- dump / train / eval (indexer training; lsa_sglang.training) ------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _dump_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", required=True, metavar="P", help="model folder or embedded model name")
    parser.add_argument("--docs", default="mixed", metavar="SPEC",
                        help="built-in source (mixed, shakespeare, needle) or a JSONL file of {\"text\": ...} lines")
    parser.add_argument("--out", required=True, metavar="DIR", help="dump directory (resumed if it holds a dump)")
    parser.add_argument("--train-docs", type=int, default=12, help="built-in sources: training documents")
    parser.add_argument("--val-docs", type=int, default=2, help="built-in sources: validation documents")
    parser.add_argument("--test-docs", type=int, default=4, help="built-in sources: held-out test documents")
    parser.add_argument("--doc-tokens", type=int, default=4096, help="tokens per document (longer ones are cut)")
    parser.add_argument("--positions", type=int, default=32, help="sampled decode positions per document")
    parser.add_argument("--focus-fraction", type=float, default=0.5,
                        help="share of positions placed right before a needle answer (needle documents)")
    parser.add_argument("--min-position", type=int, default=None, help="earliest decode position (default: doc-tokens/4)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--tau", type=int, default=64, help="decode steps per window: labels are the union over it")
    parser.add_argument("--top-p", type=float, default=0.6, help="attention mass each layer's picks must cover")
    parser.add_argument("--votes", type=int, default=0, help="layers that must pick a chunk (0: a quarter of the voting layers)")
    parser.add_argument("--vote-layers", default=None,
                        help="comma-separated layers, 'all', or default (2 .. last target layer)")
    parser.add_argument("--target-layers", type=_int_list, default=None, help="default: the server's choice from depth")
    parser.add_argument("--sink-chunks", type=int, default=1, help="as the server preset (excluded from candidates)")
    parser.add_argument("--recent-chunks", type=int, default=4, help="recency tail in chunks, as the server preset")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_home(parser)


def _dump_run(args: argparse.Namespace) -> int:
    from lsa_sglang.training.docs import DocsError
    from lsa_sglang.training.dump import DumpError, run_dump

    vote_layers = args.vote_layers
    if vote_layers not in (None, "all", "default"):
        vote_layers = _int_list(vote_layers)
    try:
        run_dump(
            args.model_path, args.out, docs=args.docs,
            counts=None if Path(args.docs).is_file()
            else {"train": args.train_docs, "val": args.val_docs, "test": args.test_docs},
            doc_tokens=args.doc_tokens, positions=args.positions, focus_fraction=args.focus_fraction,
            min_position=args.min_position, chunk_size=args.chunk_size, tau=args.tau, top_p=args.top_p,
            votes=args.votes, vote_layers=vote_layers, target_layers=args.target_layers,
            sink_chunks=args.sink_chunks, recent_chunks=args.recent_chunks, threshold=args.threshold,
            seed=args.seed, home=args.home, threads=args.threads, progress=not args.no_progress,
        )
    except (DumpError, DocsError) as e:
        raise CliError(str(e)) from None
    print(args.out)
    return 0


def _train_args(parser: argparse.ArgumentParser) -> None:
    from lsa_sglang.training.train_config import TrainConfig

    d = TrainConfig()
    parser.add_argument("--data", required=True, metavar="DIR", help="dump directory")
    parser.add_argument("--out", required=True, metavar="CKPT", help="checkpoint to write (.safetensors)")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate of the head weights and biases")
    parser.add_argument("--q-lr", type=float, default=d.q_lr, help="learning rate of the query projection")
    parser.add_argument("--anchor", type=float, default=d.anchor, help="L2 pull towards the initial q projection")
    parser.add_argument("--loss", choices=("bce", "focal"), default=d.loss)
    parser.add_argument("--pos-weight", type=float, default=d.pos_weight)
    parser.add_argument("--focal-gamma", type=float, default=d.focal_gamma)
    parser.add_argument("--neg-ratio", type=float, default=d.neg_ratio, help="negatives per positive")
    parser.add_argument("--hard-fraction", type=float, default=d.hard_fraction, help="share of hard (mined) negatives")
    parser.add_argument("--aux-weight", type=float, default=d.aux_weight, help="weight of the per-layer losses")
    parser.add_argument("--rank-weight", type=float, default=d.rank_weight,
                        help="weight of the listwise ranking loss over each sample's candidates")
    parser.add_argument("--bias-lr", type=float, default=d.bias_lr, help="learning rate of the biases")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="start from the untrained indexer as is (no dot centring, no bias calibration)")
    parser.add_argument("--ensemble", choices=("max", "mean"), default=d.ensemble, help="as the server's ensemble field")
    parser.add_argument("--train-params", choices=("all", "head", "head+norm", "head+q"), default=d.train_params,
                        help="what is trained: head = per-head weights and biases; +norm: the rank-space scale; "
                             "+q: the q projection; all: also wq_a")
    parser.add_argument("--leak", type=float, default=d.leak,
                        help="leaky-relu slope while training (annealed to the served relu)")
    parser.add_argument("--budget", type=int, default=d.budget, help="page budget for the validation metrics")
    parser.add_argument("--operating-beta", type=float, default=d.operating_beta,
                        help="after training, shift the layer biases to the best served F-beta on val (0: off)")
    parser.add_argument("--votes", type=int, default=None, help="override the dump's vote threshold")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--state", default=None, metavar="FILE", help="resume state (default: in the dump directory)")
    parser.add_argument("--threads", type=int, default=None)


def _train_run(args: argparse.Namespace) -> int:
    import torch

    from lsa_sglang.indexer import IndexerCheckpointError
    from lsa_sglang.training.dump import DumpError
    from lsa_sglang.training.trainer import TrainConfig, TrainError, train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, q_lr=args.q_lr, anchor=args.anchor,
            loss=args.loss, pos_weight=args.pos_weight, focal_gamma=args.focal_gamma, neg_ratio=args.neg_ratio,
            hard_fraction=args.hard_fraction, aux_weight=args.aux_weight, rank_weight=args.rank_weight,
            bias_lr=args.bias_lr, calibrate=not args.no_calibrate, ensemble=args.ensemble,
            train_params=args.train_params, leak=args.leak, budget=args.budget,
            operating_beta=args.operating_beta, votes=args.votes, seed=args.seed,
        )
        train(args.data, args.out, cfg, state=args.state)
    except (DumpError, TrainError, IndexerCheckpointError) as e:
        raise CliError(str(e)) from None
    print(args.out)
    return 0


def _eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="dump directory")
    parser.add_argument("--ckpt", required=True, metavar="CKPT", help="trained indexer checkpoint")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write all metrics as JSON")
    parser.add_argument("--ks", type=_int_list, default=(2, 4, 8, 16), help="recall@K cut-offs")
    parser.add_argument("--budget", type=int, default=9, help="selector page budget (the CPU preset's 9)")
    parser.add_argument("--ensemble", choices=("max", "mean"), default=None, help="default: the checkpoint's")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--votes", type=int, default=None, help="override the dump's vote threshold")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    parser.add_argument("--threads", type=int, default=None)


def _eval_run(args: argparse.Namespace) -> int:
    import torch

    from lsa_sglang.indexer import IndexerCheckpointError
    from lsa_sglang.training.dump import DumpError
    from lsa_sglang.training.evaluate import evaluate, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = evaluate(args.data, args.ckpt, ks=args.ks, budget=args.budget, ensemble=args.ensemble,
                          split=args.split, seed=args.seed, votes=args.votes)
    except (DumpError, IndexerCheckpointError, ValueError) as e:
        raise CliError(str(e)) from None
    print(result["table"])
    if args.json:
        write_json(result, args.json)
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
    "dump": Command(
        help="run a model over long documents; write hidden states, chunk keys and golden labels",
        add_args=_dump_args,
        run=_dump_run,
    ),
    "train": Command(
        help="train the indexer's query side on a dump (never loads the backbone)",
        add_args=_train_args,
        run=_train_run,
    ),
    "bundle": Command(
        help="offline SGLang bundle for a GPU host without network: build | install | check",
        script="lsa_sglang.bundle",
    ),
    "eval": Command(
        help="recall/precision/F1/keep ratio of a trained indexer vs untrained, recency, random, quest",
        add_args=_eval_args,
        run=_eval_run,
    ),
}


def register_command(name: str, command: Command) -> None:
    """Add a subcommand (for modules that prefer registering over editing COMMANDS)."""
    if name in COMMANDS:
        raise ValueError(f"subcommand {name!r} is already registered")
    COMMANDS[name] = command


def command_parser(prog: str, description: str, commands: dict[str, Command], version: str | None = None,
                   **kwargs) -> argparse.ArgumentParser:
    """A parser with one sub-parser per command (`kwargs` go to ArgumentParser)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, **kwargs)
    if version is not None:
        parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in commands.items():
        if command.script is not None:  # its module parses the rest of the command line
            sp = sub.add_parser(name, help=command.help, add_help=False)
            sp.set_defaults(_script=command.script)
            continue
        sp = sub.add_parser(name, help=command.help, description=command.help)
        if command.add_args is not None:
            command.add_args(sp)
        sp.set_defaults(_run=command.run)
    return parser


def run_command(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse `argv`, run the chosen command, turn expected failures into exit status 1."""
    import importlib

    from lsa_sglang.assets import AssetError

    args, rest = parser.parse_known_args(argv)
    script = getattr(args, "_script", None)
    if script is None and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if script is not None:
            return int(importlib.import_module(script).main(rest, prog=f"{prog} {args.command}") or 0)
        return int(args._run(args) or 0)
    except (CliError, AssetError) as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    return command_parser(
        "lsa-sglang", "Lookahead Sparse Attention for SGLang: models, serving, indexer training and evaluation.",
        COMMANDS, version=__version__,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("lsa-sglang", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
