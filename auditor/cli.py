"""The ``auditor`` command line.

Exit codes (DESIGN.md §3): 0 success, 1 a gate failed, 2 usage or config error, 3 runtime error (bad data,
model load). Errors print one message naming the culprit; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from auditor.errors import AuditorError, ConfigError
from auditor.store.rundir import REPORT, RunDir
from auditor.version import __version__

log = logging.getLogger("auditor")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x9b]")


def printable(text: str, keep_newlines: bool = False) -> str:
    """Text from the data (labels, paths, messages) with control characters (terminal escapes) replaced."""
    if not keep_newlines:
        text = text.replace("\n", " ")
    return _CONTROL.sub("?", text)


def _methods_rows() -> list[dict[str, str]]:
    from auditor.cams import CAMS, FAST_METHODS

    rows = []
    for name, spec in CAMS.items():
        rows.append(
            {
                "name": name,
                "family": spec.family,
                "set": "fast" if name in FAST_METHODS else "all",
                "forwards": spec.forwards,
                "backwards": spec.backwards,
                "class_sensitive": "yes" if spec.class_sensitive else "no",
                "options": ", ".join(f"{k}={v}" for k, v in spec.options.items()) or "-",
                "reference": spec.reference,
            }
        )
    return rows


def _metrics_rows() -> list[dict[str, str]]:
    from auditor.metrics import FAST_METRICS, METRICS

    return [
        {
            "name": name,
            "family": m.family,
            "set": "fast" if name in FAST_METRICS else "all",
            "needs": m.needs,
            "better": m.direction,
            "forwards": m.cost,
            "subset": "expensive subset" if m.expensive else "every sample",
            "options": ", ".join(f"{k}={v}" for k, v in m.options.items()) or "-",
            "reference": m.reference,
        }
        for name, m in METRICS.items()
    ]


def _table(rows: list[dict[str, str]], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    print("  ".join("-" * widths[c] for c in cols))
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip())


def cmd_methods(args: argparse.Namespace) -> int:
    """Print every registered method and metric with its cost per image and explained class."""
    methods, metrics = _methods_rows(), _metrics_rows()
    if args.json:
        print(json.dumps({"methods": methods, "metrics": metrics}, indent=2))
        return 0
    print("CAM methods")
    _table(methods, ["name", "family", "set", "forwards", "backwards", "class_sensitive", "reference"])
    print("\nMetrics")
    _table(metrics, ["name", "family", "set", "needs", "better", "forwards", "subset"])
    print()
    print("Cost is per image and explained class; K = channels of the target layer. 'fast' = the default set:")
    print("all fast methods share one forward and one backward to the target layer.")
    print("Options (and metric references): auditor methods --json")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run (or resume) an audit."""
    from auditor.config import load_config
    from auditor.run.local import Selection, run_audit, run_shard

    cfg = load_config(args.config)
    updates = {
        k: v
        for k, v in {
            "seed": args.seed,
            "device": args.device,
            "batch_size": args.batch_size,
            "workers": args.workers,
        }.items()
        if v is not None
    }
    if updates:
        from pydantic import ValidationError

        from auditor.config import AuditConfig
        from auditor.validation import format_validation_error

        try:
            cfg = cfg.model_validate({**cfg.model_dump(), **updates})
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, "command line", AuditConfig)) from None
    from auditor.run.shards import shard_from_env

    only = [c.strip() for c in args.only_classes.split(",") if c.strip()] if args.only_classes else None
    shard = shard_from_env(args.num_shards, args.shard_id)
    selection = Selection(limit=args.limit, per_class=args.per_class, only_classes=only)
    if args.dry_run:
        from auditor.run.estimate import dry_run, format_plan

        print(format_plan(dry_run(cfg, selection)))
        return 0
    if args.backend == "ray":
        if shard is not None:
            raise ConfigError("--backend ray distributes the batches itself: drop --num-shards / --shard-id")
        from auditor.run.raydriver import run_ray

        summary = run_ray(
            cfg,
            args.out,
            force=args.force,
            selection=selection,
            progress=args.progress,
            address=args.address,
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
        )
        return _after_run(summary, cfg.gates, args.out, args.gate)
    if shard is not None:
        run_shard(cfg, args.out, shard, force=args.force, selection=selection, progress=args.progress)
        print(f"shard {shard.index} of {shard.count} done; once every shard is, run: auditor merge {args.out}")
        return 0
    summary = run_audit(cfg, args.out, force=args.force, selection=selection, progress=args.progress)
    return _after_run(summary, cfg.gates, args.out, args.gate)


def cmd_merge(args: argparse.Namespace) -> int:
    """Reduce a sharded run once every shard is complete (with --shard-id: only that shard's share of the
    analyses' work items, for the final merge to read back)."""
    from auditor.run.shards import merge, merge_share, shard_from_env

    if args.num_shards is not None or args.shard_id is not None:
        shard = shard_from_env(args.num_shards, args.shard_id)  # the arguments only, never the environment
        if shard is not None:
            count = merge_share(args.out, shard, progress=args.progress)
            print(
                f"shard {shard.index} of {shard.count}: {count} analysis work items done; once every shard's "
                f"are, run: auditor merge {args.out}"
            )
            return 0
    summary = merge(args.out, progress=args.progress)
    return _after_run(summary, summary["config"].get("gates"), args.out, args.gate)


def _after_run(summary: Any, gates: Any, out: str, gate: str | None) -> int:
    acc = summary["accuracy"]["*"]
    print(
        f"audited {summary['dataset']['n']} images ({len(summary['dataset']['skipped'])} skipped), "
        f"accuracy {acc['accuracy']:.3f}; results in {out}"
    )
    flags = RunDir(out).read_flags()
    for flag in flags[:5]:
        print(f"  [{flag['severity']}] {printable(flag['message'])}")
    if len(flags) > 5:
        print(f"  ... {len(flags) - 5} more in {Path(out) / 'flags.json'}")
    if gate is not None or gates is not None:
        from auditor.outputs.gate import run_gate

        ok, report = run_gate(Path(out), Path(gate) if gate else Path(gates), None, None)
        print(report)
        return 0 if ok else 1
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    """Evaluate CI rules over a finished run; exit 1 when a rule fails or cannot be evaluated."""
    from auditor.outputs.gate import run_gate

    run = Path(args.run)
    rules = Path(args.rules) if args.rules else None
    if rules is None:  # the run's own config may name a rules file
        resolved = run / "config.resolved.yaml"
        if resolved.is_file():
            named = yaml.safe_load(resolved.read_text()).get("gates")
            rules = Path(named) if named else None
    ok, report = run_gate(
        run, rules, Path(args.baseline) if args.baseline else None, Path(args.junit) if args.junit else None
    )
    print(report)
    return 0 if ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the tank-vs-weather demo and print where the report is and what it found."""
    import time

    from auditor.demo import run_demo

    start = time.perf_counter()
    out = Path(args.out)
    summary = run_demo(out)
    flags = RunDir(out / "run").read_flags()
    print(
        f"audited {summary['dataset']['n']} images in {time.perf_counter() - start:.0f} s; "
        f"accuracy {summary['accuracy']['*']['accuracy']:.2f}"
    )
    for flag in flags[:5]:
        print(f"  [{flag['severity']}] {printable(flag['message'])}")
    print(f"report: {(RunDir(out / 'run') / REPORT).resolve()}")
    return 0


def cmd_screenshot(args: argparse.Namespace) -> int:
    """Check a report in headless Chromium (console errors, network requests, verdict) and save a screenshot."""
    from auditor.outputs.browser import check_report

    check = check_report(Path(args.report), Path(args.png) if args.png else None)
    print(
        f"verdict: {check.verdict!r}; findings shown: {check.flags_shown}; console errors: {check.console_errors}; "
        f"network requests: {check.external_requests}"
    )
    if not check.verdict or check.console_errors or check.external_requests:
        from auditor.errors import DataError

        # a broken report is a runtime error (3): exit 1 belongs to a failed gate alone
        raise DataError(f"{args.report} failed its browser check (no verdict, console errors or network requests)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Re-render the report of a finished run (nothing is recomputed)."""
    from auditor.outputs.report import render_report

    out = render_report(Path(args.run), Path(args.out) if args.out else None)
    print(f"report written to {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Write the comparison page of two runs."""
    from auditor.outputs.compare import compare_runs

    data = compare_runs(Path(args.run_a), Path(args.run_b), Path(args.out))
    print(f"{len(data['flag_changes'])} flag change(s); comparison written to {args.out}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_run(sub: Any) -> None:
    """The ``run`` sub-command's arguments."""
    p = sub.add_parser("run", help="audit a model on a dataset (resumes an unfinished run in --out)")
    p.add_argument("config", help="audit YAML config")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="overwrite a finished run in --out")
    p.add_argument("--limit", type=_positive, help="audit at most N images (seeded choice)")
    p.add_argument("--per-class", type=_positive, help="audit at most N images per class (seeded choice)")
    p.add_argument("--only-classes", help="comma-separated class names to audit (the model's class order is kept)")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--device", help="override the config's device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--batch-size", type=_positive, help="override the config's batch_size")
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="force a progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="log lines instead of a bar")
    p.add_argument("--gate", metavar="RULES", help="evaluate these CI rules after the run (exit 1 on failure)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, model and data, print each stage's forwards and a time estimate from a short "
        "probe on this device, and stop (nothing is written to --out)",
    )
    p.add_argument("--backend", choices=("local", "ray"), default="local", help="where the map stage runs")
    p.add_argument("--address", help="Ray cluster address (--backend ray; default: a local Ray)")
    p.add_argument("--actors", type=_positive, default=2, help="Ray actors (--backend ray; default 2)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per Ray actor (--backend ray)")
    p.add_argument("--num-shards", type=int, help="split the run into N shards (default: WORLD_SIZE or SLURM)")
    p.add_argument("--shard-id", type=int, help="run shard I of --num-shards (default: RANK or SLURM)")
    p.set_defaults(func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="auditor", description="Dataset-level shortcut auditor for image classifiers")
    parser.add_argument("--version", action="version", version=f"auditor {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("methods", help="list CAM methods with their cost per image")
    p.add_argument("--json", action="store_true", help="machine-readable output with options and references")
    p.set_defaults(func=cmd_methods)

    _add_run(sub)

    p = sub.add_parser("merge", help="reduce a sharded run (OUT/shards/*) once every shard is complete")
    p.add_argument("out", help="the --out of the shards")
    p.add_argument("--gate", metavar="RULES", help="evaluate these CI rules after the merge (exit 1 on failure)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="log lines")
    p.add_argument("--num-shards", type=int, help="with --shard-id: run only this share of the analyses' work items")
    p.add_argument("--shard-id", type=int, help="the share (0..N-1) of the analyses' work items this process runs")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("gate", help="evaluate CI rules over a finished run (exit 1 on failure)")
    p.add_argument("run", help="run directory")
    p.add_argument("--rules", help="rules YAML (default: the config's gates:, else configs/gates.yaml)")
    p.add_argument("--baseline", help="baseline run directory (same data) for relative rules")
    p.add_argument("--junit", help="write JUnit XML here (one test case per rule x scope)")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("demo", help="train a model that learned the weather and audit it (about a minute on a CPU)")
    p.add_argument("--out", default="audit-demo", help="output folder (default: audit-demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("screenshot", help="open a report in headless Chromium: check it and save a screenshot")
    p.add_argument("report", help="report.html")
    p.add_argument("png", nargs="?", help="screenshot to write")
    p.set_defaults(func=cmd_screenshot)

    p = sub.add_parser("report", help="re-render report.html from a finished run's saved results")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", help="HTML file to write (default: RUN/report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="compare two runs of two models on the same data (HTML)")
    p.add_argument("run_a", help="the reference run (e.g. the current release)")
    p.add_argument("run_b", help="the candidate run")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``auditor`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(message)s")
    try:
        code: int = args.func(args)
        return code
    except AuditorError as err:
        if args.debug:
            raise
        print(f"error: {printable(str(err), keep_newlines=True)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (finished batches are kept)", file=sys.stderr)
        return 130
    except Exception as err:  # not one of ours: a runtime error (3), never the gate's 1, and never silent
        if args.debug:
            raise
        print(
            f"error: unexpected {type(err).__name__}: {printable(str(err))}\n"
            "this input is not handled cleanly yet; rerun with --debug for the traceback and report it",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
