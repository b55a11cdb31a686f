"""`lsa-bench`: every benchmark of LSA: answers, memory and throughput against stock SGLang, kernels.

    lsa-bench tasks                                   # the task list
    lsa-bench sample --task niah_single --length 4K  # print one prompt and its answers
    lsa-bench accuracy --url URL --tasks T,.. --lengths L,.. --samples N [--json OUT]
    lsa-bench compare --model-path P --lengths L,.. --budgets B,.. [--tasks ..] [--samples N]
    lsa-bench throughput --model-path P --context L --concurrency C,.. [--max-total-tokens N]
    lsa-bench kits --model-path P [--kits K,..] [--variants short,long]   # SGLang's kits, stock vs LSA
    lsa-bench soak --model-path P [--requests 1000] [--concurrency 12]   # mixed load + bad input
    lsa-bench footprint | prefix | window0 | heads        # one server / offline studies (--help each)
    lsa-bench kernels | decode-loop | planning            # kernel and decode-loop timings (torch only)

`accuracy` works against any SGLang-compatible server. `compare` and `throughput` start the
servers themselves, one at a time (stock SGLang, then LSA), with the same flags and KV budget, or
use running ones (`--stock-url`, `--lsa-url`). Every run is saved under bench/results/ (JSON with
machine, model and versions; PNG plot) and summarized in bench/results/runs.jsonl.
Progress bars and server start-up go to stderr; tables to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lsa_sglang.cli import CliError, Command, command_parser, run_command

DEFAULT_TASKS = "niah_single,niah_multikey,niah_multivalue,vt"


# --- argument helpers --------------------------------------------------------------------------


def parse_tokens(text: str) -> int:
    """"8192", "8K", "8k", "1.5K", "1M" -> tokens (K = 1024)."""
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        value = float(t[:-1]) if mult > 1 else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"token count must be positive: {text!r}")
    return int(value * mult)


def int_list(text: str) -> list[int]:
    return [parse_tokens(x) for x in text.split(",") if x.strip()]


def budget_list(text: str) -> list[int | None]:
    """"4,8,default" -> [4, 8, None] (None: the server preset's page_budget)."""
    out: list[int | None] = []
    for x in text.split(","):
        x = x.strip()
        if not x:
            continue
        if x == "default":
            out.append(None)
        else:
            try:
                out.append(int(x))
            except ValueError:
                raise argparse.ArgumentTypeError(f"budget must be an integer or 'default': {x!r}") from None
    return out


def name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def json_obj(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _check_tasks(tasks: Sequence[str]) -> None:
    from lsa_sglang.bench.tasks import TASKS

    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise CliError(f"unknown task {bad[0]!r}; known: {', '.join(TASKS)}")


def _add_suite_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", type=name_list, default=name_list(DEFAULT_TASKS),
                   help=f"comma-separated tasks (default {DEFAULT_TASKS}; see `lsa-bench tasks`)")
    p.add_argument("--lengths", type=int_list, default=[4096], help="prompt lengths in the model's tokens, e.g. 4K,8K")
    p.add_argument("--samples", type=int, default=2, help="samples per task and length (default 2)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED+i (default 0)")
    p.add_argument("--template", choices=("auto", "chat", "raw"), default="auto",
                   help="chat: the model's chat template around the task (default when the tokenizer has one)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every task's decode length")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="OUT", help="also write the full results to OUT")
    p.add_argument("--png", metavar="OUT", help="also write the plot to OUT")
    p.add_argument("--results-dir", default=None, help="where runs accumulate (default bench/results)")
    p.add_argument("--no-save", action="store_true", help="do not write into the results folder")
    p.add_argument("--label", default=None, help="tag in the saved file name and JSON (e.g. smoke)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", required=True, help="model folder or embedded model name (lsa-sglang list-models)")
    p.add_argument("--lsa-config", default=None, help="LSA preset YAML (default server_configs/cpu-smollm2.yaml)")
    p.add_argument("--indexer-checkpoint", default=None, help="trained indexer (safetensors) for the LSA server")
    p.add_argument("--dtype", default=None, help="model dtype for both servers (default: float32 on CPU, auto on GPU)")
    p.add_argument("--context-length", type=parse_tokens, default=None,
                   help="server context length (default: the longest prompt + decode, rounded up)")
    p.add_argument("--max-total-tokens", type=parse_tokens, default=None,
                   help="KV token budget, the same for both servers (default 32768 on CPU)")
    p.add_argument("--mem-fraction-static", type=float, default=None, help="the same for both servers (GPU)")
    p.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                   help="extra SGLang flag for both servers, e.g. --server-arg=--chunked-prefill-size=4096")
    p.add_argument("--stock-attention-backend", default=None,
                   help="stock server backend (default torch_native on CPU, SGLang's default on GPU)")
    p.add_argument("--stock-url", default=None, help="use this running stock server instead of starting one")
    p.add_argument("--lsa-url", default=None, help="use this running LSA server instead of starting one")
    p.add_argument("--logs-dir", default=None, help="server logs (default a new temp folder)")


# --- shared pieces -----------------------------------------------------------------------------


def _counter_for_server(url: str, tokenizer: str | None):
    """The served model's tokenizer: given path/name, the server's local model folder, else /tokenize."""
    from lsa_sglang.bench.client import ServerClient
    from lsa_sglang.bench.tokens import ServerTokenCounter, load_hf_tokenizer

    if tokenizer:
        return load_hf_tokenizer(str(_resolve_model(tokenizer)))
    info = ServerClient(url).model_info()
    for key in ("tokenizer_path", "model_path"):
        path = info.get(key)
        if path and (Path(path) / "tokenizer_config.json").is_file():
            return load_hf_tokenizer(path)
    print("[lsa-bench] no local tokenizer for this server: counting with its /tokenize route, raw prompts",
          file=sys.stderr)
    return ServerTokenCounter(url)


def _resolve_model(name_or_path: str) -> Path:
    from lsa_sglang.assets import AssetError, model_path_or_fetch

    try:
        return model_path_or_fetch(name_or_path)
    except AssetError as e:
        raise CliError(str(e)) from None


def _samples(args: argparse.Namespace, counter) -> list:
    from lsa_sglang.bench.tasks import generate_samples

    _check_tasks(args.tasks)
    try:
        return generate_samples(args.tasks, args.lengths, args.samples, counter, seed=args.seed,
                                template=args.template, progress=not args.quiet)
    except ValueError as e:
        raise CliError(str(e)) from None


def _sample_record(s) -> dict[str, Any]:
    """A sample as saved: everything but the (reproducible, large) prompt text."""
    import hashlib

    d = s.to_dict()
    text = d.pop("prompt_text")
    d["prompt_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    d["prompt_tail"] = text[-300:]
    return d


def _save(args: argparse.Namespace, kind: str, model: str | None, data: dict[str, Any],
          summary: dict[str, Any], plot_fn) -> tuple[Path | None, Path | None]:
    """Write the run into the results folder (unless --no-save) and to --json/--png."""
    import shutil

    from lsa_sglang.bench.results import default_results_dir, result_stem, save_run

    saved = png = None
    if not args.no_save:
        folder = Path(args.results_dir) if args.results_dir else default_results_dir()
        stem = result_stem(kind, model, args.label)
        folder.mkdir(parents=True, exist_ok=True)
        png = plot_fn(folder / f"{stem}.png") if plot_fn else None
        if png:
            data["plot"] = png.name
        saved = save_run(data, folder, stem, summary)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=1, default=str) + "\n")
    if args.png and plot_fn:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        if png:
            shutil.copyfile(png, args.png)
        else:
            png = plot_fn(Path(args.png))
    return saved, png


def _server_flags(args: argparse.Namespace, preset: Path | None, need_context: int,
                  max_running: int) -> list[str]:
    """The SGLang flags both servers get: the preset's `sglang:` defaults, then ours, then --server-arg."""
    from lsa_sglang.bench.servers import common_flags, cuda_available, flag_value, merge_flags, preset_flags

    on_gpu = cuda_available()
    base = preset_flags(preset)
    ctx = args.context_length or max(2048, -(-need_context // 256) * 256)
    mtt = args.max_total_tokens
    if mtt is None and not on_gpu:
        mtt = max(32768, 2 * ctx)
    dtype = args.dtype or (None if on_gpu else "float32")
    ours = common_flags(dtype=dtype, context_length=ctx, max_total_tokens=mtt,
                        max_running_requests=max_running, mem_fraction_static=args.mem_fraction_static)
    extra: list[str] = []
    for a in args.server_arg:
        extra += a.split("=", 1) if a.startswith("--") and "=" in a else [a]
    flags = merge_flags(merge_flags(base, ours), extra)
    if flag_value(flags, "--dtype") is None and not on_gpu:
        flags += ["--dtype", "float32"]
    return flags


def _preset(args: argparse.Namespace, tmp: Path) -> Path | None:
    from lsa_sglang.bench.servers import cuda_available, default_preset, write_preset

    if not args.lsa_config and cuda_available():
        # The default preset's `sglang:` map is for CPU hosts (float32, 32K-token KV cache).
        raise CliError("on a GPU host pass --lsa-config (a GPU preset, e.g. server_configs/llama3-8b-128k.yaml)")
    preset = Path(args.lsa_config) if args.lsa_config else default_preset()
    if preset is not None and not preset.is_file():
        raise CliError(f"LSA preset not found: {preset}")
    if args.indexer_checkpoint:
        ckpt = Path(args.indexer_checkpoint).resolve()
        if not ckpt.is_file():
            raise CliError(f"indexer checkpoint not found: {ckpt}")
        if preset is None:
            raise CliError("--indexer-checkpoint needs an --lsa-config preset to extend")
        preset = write_preset(preset, {"indexer_checkpoint": str(ckpt)}, tmp)
    return preset


class _Servers:
    """Give out clients for 'stock' and 'lsa', starting (and later stopping) servers as needed."""

    def __init__(self, args: argparse.Namespace, model_path: str, preset: Path | None, flags: list[str]) -> None:
        self.args, self.model_path, self.preset, self.flags = args, model_path, preset, flags
        self._logs: Path | None = None
        self.info: dict[str, dict[str, Any]] = {}
        self.log: Path | None = None  # log of the server `run` started (None for --*-url)

    @property
    def logs(self) -> Path:
        """Server logs folder, made only when a server is started (none for --*-url runs)."""
        from lsa_sglang.bench.servers import logs_dir

        if self._logs is None:
            self._logs = logs_dir(self.args.logs_dir)
        return self._logs

    def run(self, kind: str, fn) -> Any:
        from lsa_sglang.bench.client import ServerClient
        from lsa_sglang.bench.servers import chunk_size_of, lsa_server, stock_server

        url = self.args.stock_url if kind == "stock" else self.args.lsa_url
        if url:
            client = ServerClient(url)
            if not client.healthy():
                raise CliError(f"{kind} server at {url} is not healthy")
            self.info[kind] = {"url": url, "started": False, "server_info": _brief_info(client.server_info())}
            self.log = None
            return fn(client)
        if kind == "stock":
            server = stock_server(self.model_path, self.flags, self.logs / "stock.log",
                                  self.args.stock_attention_backend, chunk_size_of(self.preset))
        else:
            server = lsa_server(self.model_path, self.preset, self.flags, self.logs / "lsa.log")
        t0 = time.monotonic()
        with server:
            server.start(progress=not self.args.quiet)
            startup = time.monotonic() - t0
            print(f"[lsa-bench] {kind} server up in {startup:.0f} s ({server.url}, log {server.log})", file=sys.stderr)
            client = ServerClient(server.url)
            self.info[kind] = {"command": server.cmd, "started": True, "startup_s": round(startup, 1),
                               "log": str(server.log), "server_info": _brief_info(client.server_info())}
            self.log = server.log
            return fn(client)


def _brief_info(info: dict[str, Any]) -> dict[str, Any]:
    keys = ("version", "attention_backend", "page_size", "dtype", "context_length", "max_total_tokens",
            "max_running_requests", "disable_radix_cache", "radix_cache_backend", "mem_fraction_static",
            "chunked_prefill_size", "device", "model_path")
    return {k: info.get(k) for k in keys if k in info}


# --- tasks / sample ----------------------------------------------------------------------------


def _tasks_run(args: argparse.Namespace) -> int:
    from lsa_sglang.bench.tasks import TASKS

    width = max(map(len, TASKS))
    for t in TASKS.values():
        print(f"{t.name:<{width}}  decode {t.max_new_tokens:>3}  {t.description}")
    return 0


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True)
    p.add_argument("--length", type=parse_tokens, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="smollm2-135m", help="model folder or embedded model name")
    p.add_argument("--template", choices=("auto", "chat", "raw"), default="auto")


def _sample_run(args: argparse.Namespace) -> int:
    from lsa_sglang.bench.tasks import generate_sample
    from lsa_sglang.bench.tokens import load_hf_tokenizer

    _check_tasks([args.task])
    s = generate_sample(args.task, args.length, args.seed, load_hf_tokenizer(str(_resolve_model(args.tokenizer))),
                        template=args.template)
    print(s.prompt_text)
    print(f"\n--- {s.task}: {s.n_tokens} tokens (target {s.target_tokens}), answers {s.answers}, "
          f"decode {s.max_new_tokens}, meta {s.meta}", file=sys.stderr)
    return 0


# --- accuracy ----------------------------------------------------------------------------------


def _accuracy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:30000")
    _add_suite_args(p)
    p.add_argument("--tokenizer", default=None,
                   help="model folder or name whose tokenizer counts lengths (default: the server's own folder if local, else its /tokenize)")
    p.add_argument("--lsa", type=json_obj, default=None, metavar="JSON",
                   help='per-request LSA overrides, e.g. \'{"policy": "recency", "page_budget": 8}\'')
    p.add_argument("--name", default=None, help="method label in the table (default: lsa, or server)")
    _add_output_args(p)


def _accuracy_run(args: argparse.Namespace) -> int:
    from lsa_sglang.bench.accuracy import Method, format_table, plot_accuracy_vs_kv, run_suite, summarize
    from lsa_sglang.bench.client import ServerClient
    from lsa_sglang.bench.results import run_metadata

    client = ServerClient(args.url)
    if not client.healthy():
        raise CliError(f"no healthy server at {args.url}")
    counter = _counter_for_server(args.url, args.tokenizer)
    samples = _samples(args, counter)
    is_lsa = client.is_lsa()
    over = args.lsa
    name = args.name or ((over or {}).get("policy") if over and "policy" in over else ("lsa" if is_lsa else "server"))
    if over and over.get("enabled") is False and not args.name:
        name = "dense"
    method = Method(name, "lsa" if is_lsa else "other", over, (over or {}).get("page_budget"))
    records = run_suite(client, samples, [method], max_new_tokens=args.max_new_tokens, progress=not args.quiet,
                        desc="accuracy")
    rows = summarize(records, [method.label])
    print(format_table(rows, args.tasks))
    model_info = client.model_info()
    model_path = model_info.get("model_path")
    data = {
        "kind": "accuracy", "label": args.label,
        "meta": run_metadata(model_path if model_path and Path(model_path).is_dir() else None,
                             server={"url": args.url, "lsa": is_lsa,
                                     "model_info": {k: model_info.get(k) for k in
                                                    ("model_path", "model_type", "architectures", "weight_version")},
                                     "server_info": _brief_info(client.server_info())},
                             tokenizer=counter.name),
        "config": {"tasks": args.tasks, "lengths": args.lengths, "samples": args.samples, "seed": args.seed,
                   "template": samples[0].template if samples else args.template, "lsa": over,
                   "max_new_tokens": args.max_new_tokens},
        "summary": rows, "records": records, "samples": [_sample_record(s) for s in samples],
    }
    errors = sum(r["errors"] for r in rows)
    saved, png = _save(args, "accuracy", model_path, data,
                       {"kind": "accuracy", "label": args.label, "rows": [_row_brief(r) for r in rows]},
                       (lambda p: plot_accuracy_vs_kv(rows, p, f"accuracy, {Path(model_path or 'server').name}"))
                       if is_lsa else None)
    _report_paths(saved, png, args)
    if errors:
        print(f"[lsa-bench] {errors} request(s) failed; see 'error' in the records", file=sys.stderr)
    return 0


def _row_brief(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in ("method", "length", "mean", "ci", "delta", "delta_ci", "identical", "kv_ratio", "n")
            if k in r}


def _report_paths(saved: Path | None, png: Path | None, args: argparse.Namespace) -> None:
    for what, p in (("results", saved), ("plot", png), ("json", args.json)):
        if p:
            print(f"[lsa-bench] {what}: {p}", file=sys.stderr)


# --- compare -----------------------------------------------------------------------------------


def _compare_args(p: argparse.ArgumentParser) -> None:
    _add_server_args(p)
    _add_suite_args(p)
    p.add_argument("--budgets", type=budget_list, default=[None],
                   help="page budgets of the LSA policies, e.g. 4,8,16 ('default': the preset's)")
    p.add_argument("--methods", type=name_list, default=name_list("stock,dense,indexer,recency,random,quest"),
                   help="of stock, dense, lsa (the preset as served), the policies, the A/B variants "
                        "(an unknown name lists them) and attention-from<N> (window 0 from layer N up)")
    _add_output_args(p)


def _compare_run(args: argparse.Namespace) -> int:
    import tempfile

    from lsa_sglang.bench.accuracy import (build_methods, format_table, judge_against, plot_accuracy_vs_kv,
                                           run_suite, summarize)
    from lsa_sglang.bench.results import run_metadata
    from lsa_sglang.bench.tasks import get_task
    from lsa_sglang.bench.tokens import load_hf_tokenizer

    try:
        methods = build_methods(args.methods, args.budgets)
    except ValueError as e:
        raise CliError(str(e)) from None
    _check_tasks(args.tasks)
    model_path = str(_resolve_model(args.model_path))
    samples = _samples(args, load_hf_tokenizer(model_path))
    decode = args.max_new_tokens or max(get_task(t).max_new_tokens for t in args.tasks)
    with tempfile.TemporaryDirectory(prefix="lsa-bench-") as tmp:
        preset = _preset(args, Path(tmp))
        flags = _server_flags(args, preset, max(s.n_tokens for s in samples) + decode + 64, 4)
        servers = _Servers(args, model_path, preset, flags)
        records: list[dict[str, Any]] = []
        notes: list[str] = []
        by_server = {k: [m for m in methods if m.server == k] for k in ("stock", "lsa")}
        for kind, ms in by_server.items():
            if not ms:
                continue

            def go(client, ms=ms, kind=kind):
                if kind == "lsa":
                    if not client.is_lsa():
                        raise CliError(f"the LSA server at {client.url} has no /lsa/stats (is LSA on?)")
                    info = client.server_info()
                    if info.get("disable_radix_cache") and len(ms) > 1:
                        notes.append(
                            f"the LSA server runs with --disable-radix-cache: each of the {len(ms)} LSA methods "
                            f"prefills every prompt again (with the prefix cache on, each prompt is prefilled once)")
                return run_suite(client, samples, ms, max_new_tokens=args.max_new_tokens,
                                 progress=not args.quiet, desc=f"{kind} server ({len(ms)} method(s))")

            records += servers.run(kind, go)
    labels = [m.label for m in methods]
    judge_against(records)
    rows = summarize(records, labels)
    cached = sum(int(r.get("cached_tokens") or 0) for r in records)
    notes.append(f"prompt tokens served from the prefix cache over the run: {cached}")
    print(format_table(rows, args.tasks))
    for n in notes:
        print(f"note: {n}")
    title = f"{Path(model_path).name}: accuracy vs device KV (tasks: {','.join(args.tasks)}; n={args.samples}/task)"
    data = {
        "kind": "compare", "label": args.label,
        "meta": run_metadata(model_path, servers=servers.info, flags=flags,
                             preset=str(args.lsa_config or "server_configs/cpu-smollm2.yaml"),
                             indexer_checkpoint=args.indexer_checkpoint),
        "config": {"tasks": args.tasks, "lengths": args.lengths, "samples": args.samples, "seed": args.seed,
                   "budgets": args.budgets, "methods": labels, "template": samples[0].template,
                   "max_new_tokens": args.max_new_tokens},
        "notes": notes, "summary": rows, "records": records, "samples": [_sample_record(s) for s in samples],
    }
    saved, png = _save(args, "compare", model_path, data,
                       {"kind": "compare", "label": args.label, "rows": [_row_brief(r) for r in rows]},
                       lambda p: plot_accuracy_vs_kv(rows, p, title))
    _report_paths(saved, png, args)
    return 0


# --- throughput --------------------------------------------------------------------------------


def _throughput_args(p: argparse.ArgumentParser) -> None:
    _add_server_args(p)
    p.add_argument("--context", type=parse_tokens, required=True, help="prompt length in tokens, e.g. 8K")
    p.add_argument("--output-len", type=int, default=64, help="tokens decoded per request (ignore_eos)")
    p.add_argument("--concurrency", type=int_list, default=[1, 4], help="concurrent clients, e.g. 1,4,16")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per level (default --rounds x concurrency)")
    p.add_argument("--rounds", type=int, default=2, help="requests per client at each level (default 2)")
    p.add_argument("--targets", type=name_list, default=["stock", "lsa"],
                   help="stock, lsa, dense (dense = LSA server with LSA off per request)")
    p.add_argument("--lsa", type=json_obj, default=None, metavar="JSON", help="per-request overrides for 'lsa'")
    p.add_argument("--task", default="niah_single_prose",
                   help="prompt generator (prose haystacks: no shared prefix the stock radix cache could reuse)")
    p.add_argument("--sample-interval", type=float, default=1.0, help="seconds between server samples")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--gate-off", type=int, default=0, metavar="N",
                   help="gate-off check: N more prompts decoded greedily (32 tokens) by stock and by the LSA "
                        "server with LSA off per request; reports how many are token-identical")
    _add_output_args(p)


GATE_OFF_TOKENS = 32


def _throughput_run(args: argparse.Namespace) -> int:
    import tempfile

    from lsa_sglang.bench import throughput as tp
    from lsa_sglang.bench.results import kv_bytes_per_token, run_metadata
    from lsa_sglang.bench.tasks import generate_sample
    from lsa_sglang.bench.tokens import load_hf_tokenizer
    from tqdm import tqdm

    bad = [t for t in args.targets if t not in ("stock", "lsa", "dense")]
    if bad:
        raise CliError(f"unknown target {bad[0]!r}; known: stock, lsa, dense")
    _check_tasks([args.task])
    model_path = str(_resolve_model(args.model_path))
    counter = load_hf_tokenizer(model_path)
    levels = args.concurrency
    n_req = {c: args.num_requests or args.rounds * c for c in levels}
    # Distinct prompts per level (and one warm-up), the same for every target: no prompt is ever
    # sent twice to one server, so a prefix cache cannot make either side look better.
    seeds: dict[int, list[int]] = {}
    nxt = args.seed
    for c in levels:
        seeds[c] = list(range(nxt, nxt + n_req[c]))
        nxt += n_req[c]
    jobs = [(c, s) for c in levels for s in seeds[c]]
    try:
        prompts: dict[int, list[str]] = {c: [] for c in levels}
        for c, s in tqdm(jobs, desc="generating prompts", unit="prompt", disable=args.quiet):
            prompts[c].append(generate_sample(args.task, args.context, s, counter).prompt_text)
        warm = generate_sample(args.task, min(args.context, 256), nxt, counter).prompt_text
        gate_prompts = [generate_sample(args.task, args.context, nxt + 1 + i, counter).prompt_text
                        for i in range(args.gate_off)]
    except ValueError as e:
        raise CliError(str(e)) from None
    rows: list[dict[str, Any]] = []
    gate: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="lsa-bench-") as tmp:
        preset = _preset(args, Path(tmp))
        flags = _server_flags(args, preset, args.context + args.output_len + 64, max(levels))
        from lsa_sglang.bench.servers import flag_value

        kvb = kv_bytes_per_token(model_path, flag_value(flags, "--dtype") or None)
        servers = _Servers(args, model_path, preset, flags)
        plan = {"stock": [t for t in args.targets if t == "stock"], "lsa": [t for t in args.targets if t != "stock"]}
        for kind, targets in plan.items():
            if not targets:
                continue

            def go(client, targets=targets, kind=kind):
                client.generate(warm, 4)  # first-request costs (graphs, allocator) out of the measurement
                off = None if kind == "stock" else {"enabled": False}
                gate[kind] = [client.generate(p, GATE_OFF_TOKENS, off, ignore_eos=True).get("output_ids")
                              for p in gate_prompts]
                out = []
                for target in targets:
                    lsa = {"enabled": False} if target == "dense" else args.lsa
                    for c in levels:
                        r = tp.measure(client.url, prompts[c], args.output_len, c, lsa=lsa,
                                       interval=args.sample_interval, progress=not args.quiet,
                                       desc=f"{target} x{c}", kv_bytes_per_token=kvb, server_log=servers.log)
                        r["target"] = target
                        out.append(r)
                return out

            rows += servers.run(kind, go)
    for r in rows:
        if r["target"] == "lsa" and r.get("lsa_decode_steps"):
            print(f"LSA at {r['concurrency']} clients: host time added per decode step "
                  f"{r['lsa_host_ms_per_step']:.2f} ms over {r['lsa_decode_steps']} steps, stall "
                  f"{r['lsa_stall_seconds']:.2f} s, copied in {r['lsa_bytes_copied'] / 2**20:.0f} MiB, "
                  f"selection {r['lsa_indexer_seconds']:.2f} s, {r['lsa_windows']} windows")
    base_name = "stock" if "stock" in args.targets else ("dense" if "dense" in args.targets else None)
    print(tp.format_table(rows))
    ratio_rows = []
    if base_name and "lsa" in args.targets:
        for c in levels:
            a = next((r for r in rows if r["target"] == "lsa" and r["concurrency"] == c), None)
            b = next((r for r in rows if r["target"] == base_name and r["concurrency"] == c), None)
            if a and b:
                rr = tp.ratios(a, b)
                ratio_rows.append({"concurrency": c, "baseline": base_name, **rr})
                fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}x"  # noqa: E731
                print(f"LSA/{base_name} at {c} clients: output tok/s {fmt(rr['output_tok_s'])}, admitted max "
                      f"{fmt(rr['admitted_max'])}, device KV mean {fmt(rr['device_kv_bytes_mean'])}, "
                      f"TTFT p50 {fmt(rr['ttft_s_p50'])}, TPOT p50 {fmt(rr['tpot_s_p50'])}")
    gate_off = None
    if gate_prompts and len(gate) == 2:
        same = [a is not None and a == b for a, b in zip(gate["stock"], gate["lsa"])]
        gate_off = {"prompts": len(same), "tokens": GATE_OFF_TOKENS, "identical": sum(same),
                    "stock": gate["stock"], "lsa_off": gate["lsa"]}
        print(f"gate-off: {sum(same)}/{len(same)} greedy answers of the LSA server with LSA off are "
              f"token-identical to stock's ({GATE_OFF_TOKENS} tokens each)")
    title = (f"{Path(model_path).name}: {args.context}-token prompts, {args.output_len} new tokens, "
             f"max-total-tokens {flag_value(flags, '--max-total-tokens') or 'default'}")
    data = {
        "kind": "throughput", "label": args.label,
        "meta": run_metadata(model_path, servers=servers.info, flags=flags, kv_bytes_per_token=kvb,
                             preset=str(args.lsa_config or "server_configs/cpu-smollm2.yaml")),
        "config": {"context": args.context, "output_len": args.output_len, "concurrency": levels,
                   "num_requests": n_req, "targets": args.targets, "lsa": args.lsa, "task": args.task},
        "summary": [{k: v for k, v in r.items() if k not in ("timeline", "per_request")} for r in rows],
        "ratios": ratio_rows, "gate_off": gate_off, "runs": rows,
    }
    saved, png = _save(args, "throughput", model_path, data,
                       {"kind": "throughput", "label": args.label, "ratios": ratio_rows},
                       lambda p: tp.plot(rows, p, title))
    _report_paths(saved, png, args)
    return 0


# --- kits --------------------------------------------------------------------------------------


def _kits_args(p: argparse.ArgumentParser) -> None:
    _add_server_args(p)
    p.add_argument("--kits", type=name_list, default=None,
                   help="kits (or kit.test_name) to run, default all that apply to one server")
    p.add_argument("--variants", type=name_list, default=["short", "long"],
                   help="short: the kits' own prompts; long: a ~2.7K-token document in front of each")
    p.add_argument("--targets", type=name_list, default=["stock", "lsa"], help="stock, lsa")
    _add_output_args(p)


def _kits_run(args: argparse.Namespace) -> int:
    import tempfile
    from dataclasses import asdict

    from lsa_sglang.bench import kits as K
    from lsa_sglang.bench.results import run_metadata

    bad = [v for v in args.variants if v not in ("short", "long")] + [t for t in args.targets if t not in ("stock", "lsa")]
    if bad:
        raise CliError(f"unknown variant or target {bad[0]!r}")
    model_path = str(_resolve_model(args.model_path))
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="lsa-bench-") as tmp:
        preset = _preset(args, Path(tmp))
        flags = _server_flags(args, preset, 8192, 8)
        servers = _Servers(args, model_path, preset, flags)
        for target in args.targets:
            try:
                results[target] = servers.run(target, lambda c: K.run_kits(c.url, args.kits, tuple(args.variants),
                                                                           progress=not args.quiet))
            except ValueError as e:
                raise CliError(str(e)) from None
    rows = K.parity(results.get("stock", []), results.get("lsa", [])) if "lsa" in results else []
    if rows:
        print(K.format_table(rows))
    regressions = [r for r in rows if r["regression"]]
    summary = {t: dict(Counter(r.outcome for r in res)) for t, res in results.items()}
    print(f"kits: {summary}; LSA fails {len(regressions)} test(s) that pass on stock")
    data = {"kind": "kits", "label": args.label,
            "meta": run_metadata(model_path, servers=servers.info, flags=flags, preset=str(preset)),
            "config": {"kits": args.kits, "variants": args.variants, "targets": args.targets,
                       "not_applicable": K.NOT_APPLICABLE},
            "summary": summary, "regressions": len(regressions), "rows": rows,
            "results": {t: [asdict(r) for r in res] for t, res in results.items()}}
    saved, _ = _save(args, "kits", model_path, data,
                     {"kind": "kits", "label": args.label, "summary": summary, "regressions": len(regressions)}, None)
    _report_paths(saved, None, args)
    return 1 if regressions else 0


# --- soak --------------------------------------------------------------------------------------


def _soak_args(p: argparse.ArgumentParser) -> None:
    _add_server_args(p)
    p.add_argument("--requests", type=int, default=1000, help="requests to send (default 1000)")
    p.add_argument("--concurrency", type=int, default=12, help="clients at once (default 12)")
    p.add_argument("--host-pool-gb", type=float, default=0.75,
                   help="host mirror of the started server: small, so long prompts queue for it (default 0.75)")
    p.add_argument("--tau", type=int, default=16, help="window length of the started server (default 16)")
    p.add_argument("--no-poison", action="store_true",
                   help="do not fill released device cells with NaN (poisoning shows any read of them)")
    p.add_argument("--abort-all-every", type=int, default=250, help="an abort-all round after this many jobs")
    p.add_argument("--seed", type=int, default=0)
    _add_output_args(p)


def _soak_run(args: argparse.Namespace) -> int:
    import tempfile

    from lsa_sglang.bench import soak as S
    from lsa_sglang.bench.results import run_metadata
    from lsa_sglang.bench.servers import write_preset

    model_path = str(_resolve_model(args.model_path))
    with tempfile.TemporaryDirectory(prefix="lsa-bench-") as tmp:
        preset = _preset(args, Path(tmp))
        if not args.lsa_url and preset is not None:
            preset = write_preset(preset, {"host_pool_gb": args.host_pool_gb, "tau": args.tau,
                                           "poison_released": not args.no_poison}, Path(tmp))
        flags = _server_flags(args, preset, 8192, 8)
        servers = _Servers(args, model_path, preset, flags)

        def go(client):
            soak = S.Soak(client.url, args.requests, args.concurrency, args.seed, args.abort_all_every,
                          progress=not args.quiet)
            return soak.run().to_dict()

        rep = servers.run("lsa", go)
        log = servers.log.read_text(errors="replace") if servers.log else ""
    rep["server_log_errors"] = [ln[:300] for ln in log.splitlines() if "Traceback" in ln or "leak detected" in ln]
    rep["passed"] = rep["passed"] and not rep["server_log_errors"]
    print(S.format_report(rep))
    data = {"kind": "soak", "label": args.label,
            "meta": run_metadata(model_path, servers=servers.info, flags=flags, preset=str(preset)),
            "config": {"requests": args.requests, "concurrency": args.concurrency, "host_pool_gb": args.host_pool_gb,
                       "tau": args.tau, "poison_released": not args.no_poison, "seed": args.seed,
                       "abort_all_every": args.abort_all_every, "mix": S.MIX},
            **rep}
    title = f"soak of {Path(model_path).name}: {rep['requests']} requests, {rep['wall_s']:.0f} s"
    saved, png = _save(args, "soak", model_path, data,
                       {"kind": "soak", "label": args.label, "passed": rep["passed"], "requests": rep["requests"],
                        "server_deaths": rep["server_deaths"], "leaked": rep["leaked"], "failures": rep["failures"]},
                       lambda p: S.plot(rep, p, title))
    _report_paths(saved, png, args)
    return 0 if rep["passed"] else 1


# --- entry point -------------------------------------------------------------------------------

COMMANDS = {
    "tasks": Command("list the tasks", lambda p: None, _tasks_run),
    "sample": Command("print one generated prompt (stdout) and its answers (stderr)", _sample_args, _sample_run),
    "accuracy": Command("accuracy suite against a running server", _accuracy_args, _accuracy_run),
    "compare": Command("stock SGLang vs LSA methods at equal budgets: accuracy and device KV ratio",
                       _compare_args, _compare_run),
    "throughput": Command("stock vs LSA under concurrent load at the same KV budget", _throughput_args,
                          _throughput_run),
    "kits": Command("SGLang's own server test kits against stock and LSA: a parity table", _kits_args, _kits_run),
    "soak": Command("a bounded soak of one LSA server: mixed traffic, bad input, aborts, back at baseline",
                    _soak_args, _soak_run),
    # Benchmarks that parse their own flags (--help shows them). kernels, decode-loop and planning
    # need only torch and triton: on a bare GPU host, `python -m lsa_sglang.bench decode-loop ...`.
    "footprint": Command("device KV and decode tokens/s of one long prompt, LSA on vs off, one server",
                         script="lsa_sglang.bench.footprint"),
    "prefix": Command("multi-turn chat over a long document, LSA with vs without the prefix cache",
                      script="lsa_sglang.bench.prefix"),
    "window0": Command("window-0 selection rules judged by answers, offline (transformers, no server)",
                       script="lsa_sglang.bench.window0"),
    "heads": Command("a model's retrieval heads (attention_heads), from dense answers, offline",
                     script="lsa_sglang.bench.heads"),
    "kernels": Command("sparse decode, chunk scoring and copy kernels vs dense decode (GPU timings)",
                       script="lsa_sglang.bench.kernels"),
    "decode-loop": Command("synthetic LSA decode loop vs dense paged decode at equal device KV (GPU; --smoke on CPU)",
                           script="lsa_sglang.bench.decode_loop"),
    "planning": Command("per-step sparse decode planning cost: per-request loop vs DecodePlan",
                        script="lsa_sglang.bench.planning"),
    "dummy-model": Command("a model folder of a named shape for --load-format dummy (config + small tokenizer)",
                           script="lsa_sglang.bench.dummy_model"),
}


def build_parser() -> argparse.ArgumentParser:
    return command_parser("lsa-bench", __doc__.split("\n\n")[0], COMMANDS,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        # A plain SIGTERM would end us without unwinding: the servers we started would outlive us.
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return run_command("lsa-bench", build_parser(), argv)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
