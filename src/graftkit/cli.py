"""``graft``: the command line. Thin: parse arguments, call the library, print results.

Only the standard library is imported at start-up so that ``graft --help`` is instant;
torch and transformers load inside the subcommand that needs them. Errors graftkit raises
on purpose print one line and exit with status 2; ``--debug`` (or ``GRAFT_DEBUG=1``) shows
the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def _print_rows(rows: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _inspect_params(args: argparse.Namespace) -> int:
    """``graft inspect --params RECIPE.yaml``: the recipe's trainable and total parameters, from
    the model's config alone (no weights read, nothing trained)."""
    from .train.params import recipe_parameters
    from .train.recipe import load_recipe

    info = recipe_parameters(load_recipe(args.path))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    heads = sorted({n.rsplit(".", 1)[0] for n in info["train_also"]})
    head = f" (incl. {info['head_parameters']:,} in the new head {', '.join(heads)})" if info["head_parameters"] else ""
    labels = info["labels"]
    rows = [
        ("recipe", args.path), ("model", f"{info['model']} ({info['class']}, built from its config: no weights read)"),
        ("method", f"{info['method']} {json.dumps(info['config'])}"), ("targets", info["targets"]),
        ("trainable", f"{info['trainable']:,}{head}"), ("total", f"{info['total']:,} base parameters"),
        ("ratio", f"{100 * info['ratio']:.4f}%"),
    ]
    if labels:
        rows.insert(2, ("labels", f"{labels['count']} (from {labels['from']})"))
    if info["note"]:
        rows.append(("note", info["note"]))
    _print_rows(rows)
    return 0


def _inspect_deltas(args: argparse.Namespace) -> int:
    """``graft inspect --deltas A [B ...] --base BASE [--out DIR]``: delta statistics, spectra, intruder
    dimensions and task-vector similarity; the report goes to --out, one summary line to stdout."""
    from .errors import ConfigError

    if args.path is not None:
        raise ConfigError(f"inspect takes either PATH or --deltas, not both (got PATH {args.path}); "
                          "put every fine-tune after --deltas")
    if not args.base:
        raise ConfigError("inspect --deltas needs --base BASE, the model the deltas were fine-tuned from")
    from .analysis.delta_stats import inspect_deltas
    from .analysis.inspect_report import summary_line, write_inspect_report

    res = inspect_deltas(args.base, args.deltas, top_k=args.top_k, epsilon=args.epsilon, exclude=args.exclude or (),
                         progress=sys.stderr.isatty())
    if args.out:
        html_path, _ = write_inspect_report(res, args.out)
    if args.json:
        print(json.dumps(res))
    else:
        print(summary_line(res) + (f"; report {html_path}" if args.out else ""))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from collections import Counter

    if args.deltas:
        return _inspect_deltas(args)
    if args.path is None or args.base or args.out:
        from .errors import ConfigError

        raise ConfigError("inspect: the path argument is required (a model folder, adapter folder or safetensors file), "
                          "unless you pass --deltas A [B ...] --base BASE [--out DIR]; --base and --out go with --deltas")
    if args.params:
        return _inspect_params(args)

    from .files import path_kind, read_json
    from .tensors import Checkpoint, dir_size

    path = Path(args.path)
    if path_kind(path) is None:
        from .errors import FileFormatError

        raise FileFormatError(f"{path} does not exist")
    if path.is_dir() and (path / "run.json").exists():  # a graft train output folder
        from .train.runstate import describe_run

        run = describe_run(path)
        if run is not None:
            if args.json:
                print(json.dumps(run, indent=2))
            else:
                rows = [("run", str(path)), ("status", f"{run['status']} ({run['why']})" if run["why"] else run["status"])]
                rows += [(k.replace("_", " "), v) for k, v in run.items() if k not in ("kind", "status", "why", "data", "outputs") and v is not None]
                rows += [(f"data {role}", f"{d['path']} ({d['examples']} examples, sha256 {str(d['sha256'])[:12]})") for role, d in run["data"].items()]
                rows += [(name, where) for name, where in (run["outputs"] or {}).items()]
                _print_rows(rows)
            return 0
    if path.is_dir() and ((path / "adapter.json").exists() or (path / "adapter_config.json").exists()):
        from .io import adapter_format, read_adapter

        fmt = adapter_format(path)
        adapter = read_adapter(path, allow_pickle=args.allow_pickle)
        base = adapter.meta.get("base_model") or {}
        total = (base.get("fingerprint") or {}).get("num_parameters")
        from .methods import method_named

        # a method's saved-but-frozen tensors (VeRA's shared random pair) are not trained
        frozen = set(getattr(getattr(method_named(adapter.method), "site_cls", None), "frozen_slots", ()))
        # integer tensors are positions (a sparse delta's indices), not parameters
        trainable = sum(t.numel() for k, t in adapter.tensors.items()
                        if k.rsplit(".", 1)[-1] not in frozen and t.is_floating_point())
        dtypes = Counter(str(t.dtype).replace("torch.", "") for t in adapter.tensors.values())
        from .errors import AdapterError
        from .validate import check_adapter

        try:  # inspect describes a broken adapter too, and says what every other command would refuse
            check_adapter(adapter, str(path))
            problem = None
        except AdapterError as exc:
            problem = str(exc)
            print(f"graft: warning: {problem}", file=sys.stderr)
        info = {
            "kind": "adapter", "format": fmt, "method": adapter.method, "base_model": base.get("name_or_path"),
            "base_class": base.get("class"), "targets": len(adapter.targets), "train_also": adapter.train_also,
            "trainable_parameters": trainable, "base_parameters": total,
            "dtype": dict(dtypes), "size_on_disk": dir_size(path), "config": adapter.meta.get("config"),
            "target_names": adapter.targets, "problem": problem,
        }
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        share = f" ({100 * trainable / total:.3f}% of {total:,} base parameters)" if total else ""
        shown = ", ".join(adapter.targets[:4]) + (f", ... ({len(adapter.targets) - 4} more)" if len(adapter.targets) > 4 else "")
        cfg = {k: v for k, v in (adapter.meta.get("config") or {}).items() if k not in ("targets",) and v not in ([], {}, None)}
        _print_rows([
            ("adapter", f"{path} ({fmt})"), ("method", adapter.method), ("base model", f"{base.get('name_or_path')} ({base.get('class')})"),
            ("targets", f"{len(adapter.targets)}: {shown}"), ("trained whole", ", ".join(adapter.train_also) or "-"),
            ("trainable", f"{trainable:,}{share}"), ("dtype", ", ".join(f"{d} x{n}" for d, n in dtypes.items())),
            ("size on disk", _human_bytes(dir_size(path))), ("config", json.dumps(cfg)),
            ("checks", "refused by merge, export, eval and import-peft (see the warning)" if problem else "complete, ranks agree, no NaN/Inf"),
        ])
        return 0
    ckpt = Checkpoint(path, allow_pickle=args.allow_pickle)
    config = {}
    if path.is_dir() and (path / "config.json").exists():
        config = read_json(path / "config.json", "model config")
        if not isinstance(config, dict):
            from .errors import FileFormatError

            raise FileFormatError(f"{path / 'config.json'} is not a JSON object; re-create the model's config.json")
    dtypes = Counter(ckpt.dtype(k) for k in ckpt.keys())
    n_params = ckpt.num_parameters()
    info = {
        "kind": "model", "model_type": config.get("model_type"), "architectures": config.get("architectures"),
        "tensors": len(ckpt.keys()), "parameters": n_params, "trainable_parameters": n_params,
        "dtype": dict(dtypes), "files": len(set(ckpt.files.values())), "size_on_disk": ckpt.size_on_disk(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    _print_rows([
        ("model", str(path)), ("type", f"{config.get('model_type')} {config.get('architectures') or ''}".strip()),
        ("parameters", f"{info['parameters']:,} in {info['tensors']} tensors (all trainable when fully fine-tuned)"),
        ("dtype", ", ".join(f"{d} x{n}" for d, n in dtypes.items())),
        ("files", f"{info['files']} weight file(s), {_human_bytes(info['size_on_disk'])}"),
    ])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .errors import ConfigError

    chosen = [(k, v) for k, v in (("merged", args.merged), ("peft", args.peft), ("native", args.native)) if v]
    if len(chosen) != 1:
        raise ConfigError("graft export needs exactly one of --merged OUT, --peft OUT or --native OUT")
    kind, out = chosen[0]
    from .outputs import check_output

    check_output(out, [("adapter", args.adapter), ("base", args.base)])
    if Path(out).exists() and not args.overwrite:
        from .errors import FileFormatError

        raise FileFormatError(f"{out} already exists; choose another output folder or pass --overwrite")
    if kind == "merged":
        from .io import export_merged

        export_merged(args.adapter, args.base, out, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                      force=args.force, allow_pickle=args.allow_pickle)
        print(f"merged model written to {out}")
        return 0
    from .io import apply_adapter, load_base_for, read_adapter, save_adapter

    adapter = read_adapter(args.adapter, allow_pickle=args.allow_pickle)
    model = load_base_for(adapter, args.base, allow_pickle=args.allow_pickle)
    apply_adapter(model, adapter, force=args.force)
    save_adapter(model, out, format=kind, overwrite=args.overwrite)
    print(f"{kind} adapter written to {out}")
    return 0


def cmd_import_peft(args: argparse.Namespace) -> int:
    from .io import adapter_from_model, apply_adapter, load_base_for, read_peft, write_native
    from .outputs import check_output

    check_output(args.out, [("peft adapter", args.peft_dir), ("base", args.base)])
    if Path(args.out).exists() and not args.overwrite:
        from .errors import FileFormatError

        raise FileFormatError(f"{args.out} already exists; choose another output folder or pass --overwrite")
    from .validate import check_adapter

    adapter = read_peft(args.peft_dir, allow_pickle=args.allow_pickle)
    check_adapter(adapter, args.peft_dir)  # the checks merge / export / eval make: complete, consistent, no NaN/Inf
    if args.base:  # check it fits, and record the base's fingerprint
        model = load_base_for(adapter, args.base, allow_pickle=args.allow_pickle)
        apply_adapter(model, adapter, force=args.force)
        adapter = adapter_from_model(model)
    write_native(adapter, args.out, overwrite=args.overwrite)
    print(f"native adapter written to {args.out} ({adapter.method}, {len(adapter.targets)} targets)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo_recipe, run_demo

    if args.recipe:
        print(demo_recipe(), end="")
        return 0
    return run_demo(Path(args.out) if args.out else None)


def cmd_study(args: argparse.Namespace) -> int:
    from .eval.study import run_study

    result = run_study(args.study, args.out, progress=not args.no_progress)
    report = result.get("report", {})
    print(f"study written to {Path(report.get('html', args.out or '.')).parent}; report: {report.get('html', '(not written)')}")
    for f in result.get("failures", []):
        print(f"graft: failed: {f['stage']} {f['model']}: {f['error']}", file=sys.stderr)
    return 1 if result.get("failures") else 0


def cmd_merge(args: argparse.Namespace) -> int:
    if args.dry_run:
        from .merge.api import dry_run

        print(dry_run(args.config, args.out, overwrite=args.overwrite, threads=args.threads, allow_pickle=args.allow_pickle,
                      force=args.force))
        return 0
    from .merge import merge

    out = merge(args.config, args.out, overwrite=args.overwrite, threads=args.threads, allow_pickle=args.allow_pickle,
                force=args.force)
    meta = Path(out) / "adapter.json"
    soup = json.loads(meta.read_text()).get("soup") if meta.exists() else None
    if soup is not None:
        print(f"adapter soup written to {out} ({soup['merge_method']} of {len(soup['models'])} adapters)")
        return 0
    if meta.exists():
        record = json.loads(meta.read_text())["merge"]
        err = record["relative_error"]
        worst = max(err["per_key"].items(), key=lambda kv: kv[1], default=("-", 0.0))
        ranks = sorted(set((record.get("ranks") or {}).values()))
        span = f"rank {ranks[0]}" if len(ranks) == 1 else (f"ranks {ranks[0]}-{ranks[-1]}" if ranks else f"rank {record.get('rank')}")
        print(f"merged {'DoRA' if record.get('dora') else 'LoRA'} adapter written to {out} ({span}); SVD relative error "
              f"{err['overall']:.3e} overall, worst {worst[1]:.3e} ({worst[0]}); per key in adapter.json")
        return 0
    print(f"merged model written to {out}")
    return 0


def cmd_merge_multi(args: argparse.Namespace) -> int:
    from .merge.api import run_multi

    done = run_multi(args.config, args.intermediate_dir, args.out_path, lazy=args.lazy, overwrite=args.overwrite,
                     threads=args.threads, allow_pickle=args.allow_pickle, force=args.force)
    print(f"{len(done)} stage(s) done; " + ", ".join(f"{name or 'final'}: {path}" for name, path in done.items()))
    return 0


def cmd_moe(args: argparse.Namespace) -> int:
    from .merge.moe import run_moe

    out = run_moe(args.config, args.out, overwrite=args.overwrite, seed=args.random_seed,
                  allow_all_same=args.i_understand_this_is_not_useful_without_training)
    arch = json.loads((Path(out) / "config.json").read_text())["architectures"][0]
    print(f"mixture of experts written to {out} ({arch})")
    return 0


def cmd_port(args: argparse.Namespace) -> int:
    from .analysis.port import port

    r = port(args.patch, args.v1, args.v2, args.out, full=args.full, overwrite=args.overwrite, force=args.force)
    what = "re-targeted adapter" if r["kind"] == "adapter" else "model folder"
    print(f"ported {what} written to {r['out']} ({r['patched']} patched tensor(s) of {r['tensors']}; base {args.v2})")
    return 0


def cmd_dare_tolerance(args: argparse.Namespace) -> int:
    from .analysis.dare_tolerance import dare_tolerance, write_dare_report

    res = dare_tolerance(args.base, args.expert, args.task, rates=args.rates, seed=args.seed)
    print(f"{'p':>6}  {'accuracy':>8}  {'retained':>8}  {'kept':>6}")
    for r in res["rows"]:
        retained = "-" if r["retained"] is None else f"{r['retained']:.3f}"
        print(f"{r['rate']:>6g}  {r['accuracy']:>8.4f}  {retained:>8}  {r['kept_share']:>6.4f}")
    if args.out:
        html_path, _ = write_dare_report(res, args.out)
        print(f"report: {html_path}")
    return 0


def cmd_extract_lora(args: argparse.Namespace) -> int:
    from .merge.extract_lora import extract_lora

    out, report = extract_lora(args.ft, args.base, args.out, rank=args.rank, sv_threshold=args.sv_threshold,
                               max_error=args.max_error, max_rank=args.max_rank, embed_lora=args.embed_lora,
                               skip_undecomposable=args.skip_undecomposable, include=tuple(args.include_regex),
                               exclude=tuple(args.exclude_regex), peft=args.peft, overwrite=args.overwrite,
                               allow_pickle=args.allow_pickle)
    err, ranks = report["relative_error"], sorted(report["rank"].values())
    worst = max(err["per_key"].items(), key=lambda kv: kv[1], default=("-", 0.0))
    span = f"rank {ranks[0]}" if ranks and ranks[0] == ranks[-1] else (f"ranks {ranks[0]}-{ranks[-1]}" if ranks else "no LoRA")
    print(f"{'peft' if args.peft else 'native'} LoRA adapter written to {out}: {len(ranks)} matrices ({span}), "
          f"{len(report['whole'])} tensor(s) whole; SVD relative error {err['overall']:.3e} overall, worst {worst[1]:.3e} "
          f"({worst[0]}); per key in {'extraction.json' if args.peft else 'adapter.json'}")
    for what, keys in (("skipped (--skip-undecomposable)", report["skipped"]), ("dropped (rank 0)", report["dropped"])):
        if keys:
            print(f"note: {len(keys)} changed tensor(s) {what}, e.g. {keys[0]}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config import read_yaml

    read_yaml(args.recipe, "recipe file")  # a bad file fails in a second, before torch is imported
    from .train import load_recipe
    from .train.loop import train

    recipe = load_recipe(args.recipe, args.overrides)
    train(recipe, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.config import load_eval_config
    from .eval.runner import evaluate, summary_table

    cfg = load_eval_config(args.config)
    if args.force:  # the fingerprint check's own advice; the shape and NaN checks still run
        for spec in cfg.models:
            spec.force = True
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    out = Path(args.out or cfg.output)
    summary = evaluate(cfg, out, overwrite=args.overwrite, models=split(args.models), tasks=split(args.tasks),
                       progress=not args.no_progress, raise_errors=args.debug or os.environ.get("GRAFT_DEBUG") == "1",
                       unsafe_no_isolation=args.unsafe_no_isolation)
    if summary["models"] or summary["failures"]:
        from rich.console import Console

        Console(highlight=False).print(summary_table(summary, title=f"graft eval: main metric per task ({out})"))
    print(f"results written to {out} (summary.json, <model>/results.json, <model>/predictions/)")
    from .eval.runner import stale_warnings

    for line in stale_warnings(summary, args.config, args.out):
        print(f"graft: warning: {line}", file=sys.stderr)
    for f in summary["failures"]:
        print(f"graft: error: model {f['model']!r} failed: {f['error']}", file=sys.stderr)
    return 2 if summary["failures"] else 0


def cmd_probe_intrinsic_dim(args: argparse.Namespace) -> int:
    from .config import read_yaml

    read_yaml(args.recipe, "recipe file")  # a bad file fails in a second, before torch is imported
    from .train import load_recipe
    from .train.probe import probe_intrinsic_dim

    recipe = load_recipe(args.recipe, args.overrides)
    out = args.out or f"{recipe.output.dir.rstrip('/')}-probe"
    probe_intrinsic_dim(recipe, args.dims, out, full_score=args.full_score, full_lr=args.full_lr, subspace_lr=args.subspace_lr,
                        overwrite=args.overwrite, progress=not args.no_progress, source=str(args.recipe))
    return 0


def cmd_localize(args: argparse.Namespace) -> int:
    from .analysis.localize import run_localize, summary_line

    print(summary_line(run_localize(args.recipe, progress=sys.stderr.isatty())))
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from .analysis.tall import compress

    m = compress(args.recipe, args.out, overwrite=args.overwrite)
    st = m["storage"]
    print(f"TALL bundle written to {args.out}: {len(m['tasks'])} tasks, {m['merged_parameters']:,} merged parameters; "
          f"{_human_bytes(st['bundle_bytes'])} vs {_human_bytes(st['experts_bytes'])} for the separate experts "
          f"(storage ratio {st['ratio']:.3f}, base referenced, not stored)")
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    from .analysis.tall import decompress

    out = decompress(args.bundle, args.task, args.out, base=args.base, overwrite=args.overwrite)
    print(f"expert {args.task} rebuilt from {args.bundle} into {out} (theta_0 + m_t * tau_MTL)")
    return 0


def _dims(text: str) -> list[int]:
    from .errors import ConfigError
    from .train.probe import parse_dims

    try:
        return parse_dims(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--dims: ", "")) from None


def cmd_compare(args: argparse.Namespace) -> int:
    from .eval.compare import compare_runs, format_comparison, parse_experts

    report = compare_runs(args.a, args.b, base=args.base, experts=parse_experts(args.expert), confidence=args.confidence,
                          resamples=args.resamples, seed=args.seed)
    print(json.dumps(report, indent=2) if args.json else format_comparison(report))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .errors import ConfigError

    if args.eft_scale is not None and not args.eft:
        raise ConfigError("--eft-scale needs --eft SMALL_FT SMALL_BASE (it scales their difference)")
    from .decode.generate import generate
    from .decode.loop import Sampling

    records = generate(args.model, args.prompt or [], eft=tuple(args.eft) if args.eft else None,
                       scale=1.0 if args.eft_scale is None else args.eft_scale, max_new_tokens=args.max_new_tokens,
                       sampling=Sampling(args.temperature, args.top_p, args.seed), chat=args.chat, system=args.system,
                       device=args.device, dtype=args.dtype)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        for r in records:
            print(r["text"])
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in the same one line as every other error.

    argparse prints the usage block and then ``prog: error: ...``; a script that reads the
    first stderr line (or a user scanning a log) then sees ``usage:`` instead of the problem.
    Here it is ``graft: error: <message> (see graft <cmd> --help)``, exit status 2.
    """

    def error(self, message: str):  # noqa: D401 - argparse's hook
        # self.prog is "graft" or "graft <cmd>" (subparsers inherit the class through parser_class)
        message = " ".join(str(message).split())
        self.exit(2, f"graft: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def _size(text: str) -> int:
    """--max-shard-size, parsed before any model loads (a bad unit once failed only after the load)."""
    from .errors import ConfigError
    from .validate import parse_size

    try:
        return parse_size(text, "")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graft", description="graftkit: tune, merge, localize and evaluate pretrained-model deltas.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"graftkit {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p.set_defaults(_subparsers=sub.choices)

    s = sub.add_parser("inspect", help="describe a model folder, adapter folder (native or peft) or safetensors file")
    s.add_argument("path", nargs="?")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--params", action="store_true",
                   help="PATH is a training recipe: print its trainable and total parameters and their ratio without training "
                        "(the model is built from its config, no weights read)")
    s.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (weights_only)")
    s.add_argument("--deltas", nargs="+", metavar="MODEL",
                   help="fine-tuned model or adapter folders: delta statistics, spectra, intruder dimensions, similarity")
    s.add_argument("--base", help="with --deltas: the base model the deltas were fine-tuned from")
    s.add_argument("--out", metavar="DIR", help="with --deltas: write report.html, report.md and report_files/ here")
    s.add_argument("--top-k", type=int, default=10, help="with --deltas: top singular vectors checked for intruders (10)")
    s.add_argument("--epsilon", type=float, default=0.5, help="with --deltas: intruder cosine threshold (0.5)")
    s.add_argument("--exclude", action="append", metavar="GLOB", help="with --deltas: skip tensors matching GLOB (repeatable)")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("export", help="fold an adapter into its base (--merged) or convert it (--peft / --native)")
    s.add_argument("adapter", help="native or peft adapter folder")
    s.add_argument("--base", required=True, help="base model folder or alias (minilm, smollm2)")
    s.add_argument("--merged", metavar="OUT", help="write an HF model folder with the adapter folded in")
    s.add_argument("--peft", metavar="OUT", help="write a peft adapter folder")
    s.add_argument("--native", metavar="OUT", help="write a graftkit adapter folder")
    s.add_argument("--max-shard-size", default="2GB", type=_size, help="shard size of the merged model (default 2GB)")
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    s.add_argument("--force", action="store_true", help="load even if the base fingerprint differs")
    s.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (weights_only)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("import-peft", help="convert a peft adapter folder to a graftkit adapter folder")
    s.add_argument("peft_dir")
    s.add_argument("out")
    s.add_argument("--base", help="base model to check the adapter against and fingerprint")
    s.add_argument("--force", action="store_true", help="with --base: accept it even if the adapter records another base")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--allow-pickle", action="store_true", help="read a pickled adapter_model.bin (weights_only)")
    s.set_defaults(func=cmd_import_peft)

    s = sub.add_parser("merge", help="merge models with a mergekit-style YAML recipe (linear, ties, dare, ...)")
    s.add_argument("config", help="merge config (YAML, mergekit schema)")
    s.add_argument("out", help="output folder (an HF model folder)")
    s.add_argument("--dry-run", action="store_true", help="print the plan (inputs, tensors, methods, peak memory) and exit")
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    s.add_argument("--threads", type=_positive_int, default=None, help="worker threads (default: min(4, cores))")
    s.add_argument("--force", action="store_true", help="merge adapters even if their base fingerprint differs from base_model")
    s.add_argument("--allow-pickle", action="store_true", help="read legacy pytorch_model.bin inputs (weights_only)")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("merge-multi", help="run a multi-stage merge file (mergekit-multi: named recipes as YAML documents)")
    s.add_argument("config", help="YAML file with one merge recipe per document, each with a name (the final one may have none)")
    s.add_argument("-I", "--intermediate-dir", required=True, help="folder for the named stages' outputs")
    s.add_argument("--out-path", default=None, help="output folder of the unnamed final merge")
    s.add_argument("--no-lazy", dest="lazy", action="store_false",
                   help="re-run stages whose folder already holds this recipe's output")
    s.add_argument("--overwrite", action="store_true", help="replace the final output folder if it exists")
    s.add_argument("--threads", type=_positive_int, default=None, help="worker threads per merge (default: min(4, cores))")
    s.add_argument("--force", action="store_true", help="merge adapters even if their base fingerprint differs from base_model")
    s.add_argument("--allow-pickle", action="store_true", help="read legacy pytorch_model.bin inputs (weights_only)")
    s.set_defaults(func=cmd_merge_multi)

    s = sub.add_parser("extract-lora", help="a LoRA adapter from a full fine-tune by truncated SVD (mergekit-extract-lora); docs/merge.md")
    s.add_argument("ft", help="fine-tuned model folder")
    s.add_argument("base", help="the base model folder it was tuned from")
    s.add_argument("out", help="output adapter folder")
    s.add_argument("--rank", type=int, default=None, help="rank of every matrix (at most its size)")
    s.add_argument("--sv-threshold", "--sv-epsilon", dest="sv_threshold", type=float, default=None,
                   help="keep the singular values above E (absolute; mergekit's --sv-epsilon)")
    s.add_argument("--max-error", type=float, default=None, help="per matrix, the smallest rank within this relative Frobenius error")
    s.add_argument("--max-rank", type=int, default=None, help="cap of --sv-threshold / --max-error ranks; alone, the same as --rank")
    s.add_argument("--embed-lora", action="store_true", help="factor embeddings too (default: stored whole when changed, as mergekit)")
    s.add_argument("--skip-undecomposable", action="store_true", help="leave out changed tensors that are not factored (norms, biases)")
    s.add_argument("-i", "--include-regex", action="append", default=[], help="only tensors matching this regex (repeatable)")
    s.add_argument("-e", "--exclude-regex", action="append", default=[], help="leave out tensors matching this regex (repeatable)")
    s.add_argument("--peft", action="store_true", help="write a peft adapter folder (default: a graftkit adapter folder)")
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    s.add_argument("--allow-pickle", action="store_true", help="read legacy pytorch_model.bin inputs (weights_only)")
    s.set_defaults(func=cmd_extract_lora)

    s = sub.add_parser("port", help="PortLLM: apply a fine-tune's delta or an adapter made on base v1 to an updated base v2; docs/analysis.md")
    s.add_argument("patch", help="fine-tuned model folder of v1, or an adapter trained on v1")
    s.add_argument("--from", dest="v1", required=True, help="the base v1 the patch was made on (model folder)")
    s.add_argument("--to", dest="v2", required=True, help="the updated base v2 (model folder, same architecture and shapes)")
    s.add_argument("out", help="output: a model folder (full patch, or --full) or the adapter re-targeted to v2")
    s.add_argument("--full", action="store_true", help="write v2 + the adapter's delta as a model folder (needed for deltas that depend on the base: DoRA, IA3)")
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    s.add_argument("--force", action="store_true", help="port an adapter whose base fingerprint does not match v1")
    s.set_defaults(func=cmd_port)

    s = sub.add_parser("dare-tolerance", help="accuracy of base + DARE(expert - base, p) as the drop rate p grows; docs/analysis.md")
    s.add_argument("base", help="the base model folder the expert was fine-tuned from")
    s.add_argument("expert", help="the fine-tuned model folder (with its classification head)")
    s.add_argument("task", help="classification task: a JSONL file with text and label fields")
    s.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.9, 0.95, 0.99], help="drop rates in [0, 1) (default 0.5 0.9 0.95 0.99)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random drop masks (per tensor)")
    s.add_argument("--out", metavar="DIR", help="write report.html, report.md and report_files/ here")
    s.set_defaults(func=cmd_dare_tolerance)

    s = sub.add_parser("moe", help="assemble a Mixtral / Qwen2-MoE model from dense experts (mergekit-moe YAML); docs/merge.md")
    s.add_argument("config", help="MoE config (YAML, mergekit-moe schema)")
    s.add_argument("out", help="output folder (an HF model folder)")
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    s.add_argument("--random-seed", type=int, default=None, help="seed of random gates and expert noise (default 0)")
    s.add_argument("--i-understand-this-is-not-useful-without-training", action="store_true",
                   help="allow every expert to be the same model (for MoE training from a dense start)")
    s.set_defaults(func=cmd_moe)

    s = sub.add_parser("train", help="fine-tune a model from a recipe (YAML); docs/train.md")
    s.add_argument("recipe", help="recipe YAML file")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe keys, e.g. optim.lr=3e-4 method.r=16")
    s.add_argument("--resume", action="store_true", help="continue the run in output.dir from its latest checkpoint")
    s.add_argument("--overwrite", action="store_true", help="replace an output folder that holds another run")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("demo", help="the end-to-end study on packaged data: tune MiniLM on 4 tasks, merge 7 ways, evaluate, report")
    s.add_argument("--out", default=None, help="output folder (default out/demo)")
    s.add_argument("--recipe", action="store_true", help="print the demo's study recipe (YAML) and exit")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("study", help="train an expert per task, merge them with every method, evaluate all, write a report")
    s.add_argument("study", help="study recipe (YAML); see graft demo --recipe")
    s.add_argument("--out", default=None, help="output folder (default: the recipe's output)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_study)

    s = sub.add_parser("eval", help="evaluate models (folders, adapters, merges) on tasks from an EVAL.yaml; docs/eval.md")
    s.add_argument("config", help="eval config (YAML): models, tasks, output")
    s.add_argument("--out", default=None, help="output folder (default: the config's output)")
    s.add_argument("--overwrite", action="store_true", help="replace existing OUT/<model> folders")
    s.add_argument("--models", default=None, metavar="A,B", help="evaluate only these models (comma-separated names)")
    s.add_argument("--tasks", default=None, metavar="X,Y", help="run only these tasks (comma-separated names)")
    s.add_argument("--force", action="store_true", help="apply adapters even if their base fingerprint differs (every model)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--unsafe-no-isolation", action="store_true",
                   help="run code tasks even without bubblewrap, with in-process checks only (unsafe for untrusted models)")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("probe", help="measure a task: intrinsic-dim (d_int90 by random-subspace tuning); docs/methods.md")
    probes = s.add_subparsers(dest="probe", metavar="PROBE", parser_class=_Parser, required=True)
    s = probes.add_parser("intrinsic-dim", help="train full fine-tuning and a random subspace of each --dims size; report d_int90")
    s.add_argument("recipe", help="training recipe (YAML): its model, data and budget are used for every run")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe keys, e.g. optim.max_steps=200")
    s.add_argument("--dims", required=True, type=_dims, metavar="D1,D2,...", help="subspace dimensions, e.g. 10,100,1000")
    s.add_argument("--out", default=None, help="output folder (default: the recipe's output.dir + '-probe')")
    s.add_argument("--full-score", type=float, default=None, help="full fine-tuning's score, if known (skips that run)")
    s.add_argument("--full-lr", type=float, default=None, help="full fine-tuning's learning rate (default: the recipe's if its "
                   "method is full, else 5e-5)")
    s.add_argument("--subspace-lr", type=float, default=None, help="z's learning rate (default: the recipe's if its method is "
                   "subspace, else 1e-2)")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_probe_intrinsic_dim)

    s = sub.add_parser("compare", help="compare two graft eval model folders: per-task scores, bootstrap CI, verdict, flips")
    s.add_argument("a", metavar="A", help="reference model folder written by graft eval (OUT/<model>)")
    s.add_argument("b", metavar="B", help="model folder compared against A (diff = B - A)")
    s.add_argument("--base", metavar="BASE", help="base model's eval folder: add each model's score minus the base's")
    s.add_argument("--expert", action="append", default=[], metavar="TASK=DIR",
                   help="TASK's expert eval folder: add score / expert score (repeat per task)")
    s.add_argument("--confidence", type=float, default=0.95, help="confidence of the bootstrap interval (default 0.95)")
    s.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples (default 10000)")
    s.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("localize", help="skill localization: learned vs magnitude grafting masks over a fine-tune's delta; docs/analysis.md")
    s.add_argument("recipe", metavar="RECIPE.yaml", help="base, expert, task, sparsity list, steps, lr, out")
    s.set_defaults(func=cmd_localize)

    s = sub.add_parser("compress", help="store experts of one base as tau_MTL + one bit-packed TALL mask per task; docs/analysis.md")
    s.add_argument("recipe", metavar="RECIPE.yaml", help="base, experts (task: folder), lambda, exclude")
    s.add_argument("out", metavar="OUT", help="bundle folder to write")
    s.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    s.set_defaults(func=cmd_compress)

    s = sub.add_parser("decompress", help="rebuild one expert of a TALL bundle as an HF folder; docs/analysis.md")
    s.add_argument("bundle", metavar="BUNDLE", help="folder graft compress wrote")
    s.add_argument("task", metavar="TASK", help="the task whose expert to rebuild")
    s.add_argument("out", metavar="OUT", help="model folder to write")
    s.add_argument("--base", metavar="BASE", help="the base folder (default: the path the bundle recorded)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.set_defaults(func=cmd_decompress)

    s = sub.add_parser("generate", help="generate text from a causal LM, or from a large base up-scaled by a small "
                                        "fine-tuned/base pair (--eft); docs/generate.md")
    s.add_argument("model", help="causal LM folder or alias (smollm2); with --eft the large base")
    s.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
    s.add_argument("--eft", nargs=2, metavar=("SMALL_FT", "SMALL_BASE"),
                   help="emulated fine-tuning: decode from log p_model + scale * (log p_SMALL_FT - log p_SMALL_BASE), "
                        "token by token (all three must share one tokenizer)")
    s.add_argument("--eft-scale", type=float, default=None, help="the scale on the small pair's difference (default 1)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default); above 0 samples")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    s.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    s.add_argument("--system", default=None, help="with --chat: a system prompt")
    s.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    s.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    s.add_argument("--json", action="store_true", help="print JSON: text, token ids, log-probability, whether it stopped")
    s.set_defaults(func=cmd_generate)
    return p


def _version() -> str:
    from . import __version__

    return __version__


def _unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    import difflib

    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(extra[0].split("=", 1)[0], flags, n=1) if extra[0].startswith("-") else []
    hint = f"; did you mean {close[0]}?" if close else ""
    parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) in ("train", "probe") and not any(x.startswith("-") for x in extra):
        # argparse fills the KEY=VALUE list only before the first flag; `train r.yaml --resume a=1` means the same
        args.overrides = [*args.overrides, *extra]
        extra = []
    if extra:  # what parse_args does, but named against the subcommand whose --help lists the flags
        _unrecognized(args._subparsers.get(getattr(args, "command", None)) or parser, extra)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("GRAFT_DEBUG") == "1"
    # transformers' per-tensor "Loading weights" bars would bury the one-line error on stderr;
    # read before transformers is imported, so a user's own setting still wins
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("graft: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from .errors import GraftError

        if debug:
            raise
        if isinstance(exc, GraftError):
            print(f"graft: error: {exc}", file=sys.stderr)
            return exc.exit_code
        if isinstance(exc, OSError):  # disk full, permissions: the environment, not a bug to report
            print(f"graft: error: {exc}; check the path, its permissions and the free disk space", file=sys.stderr)
            return 1
        print(f"graft: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
