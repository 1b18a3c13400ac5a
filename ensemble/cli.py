"""The `ensemble` command: run the pipeline, run one stage, show a run's state."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import load_config, run_config
from .data import fingerprints_held
from .launch import USER_ERRORS, TasksFailed, one_line
from .pipeline import STAGES, run_pipeline, stage_named, state
from .rundir import Manifest

EPILOG = """\
examples:
  ensemble run                                   # the whole pipeline on the built-in synthetic data
  ensemble run --config configs/omniglot.yaml    # a real data set (downloaded through torchvision)
  ensemble run generalist.train.epochs=3 name=quick
  ensemble stage generalist --config configs/emnist.yaml
  ensemble status runs/default
  ensemble submit --address http://HEAD:8265 --config configs/emnist.yaml   # a job on a Ray cluster

A run lives in <runs_dir>/<name> (default runs/default). Rerunning the same command skips the stages
that are done and resumes an interrupted one from its last checkpoint; changing a stage's config reruns
that stage and every stage after it.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ensemble", description="Specialist ensembles for many-class classification "
        "(Hinton, Vinyals & Dean 2015, section 5), and distillation of the ensemble back into one network.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_run = sub.add_parser("run", help="run every stage of the pipeline (skipping those done)",
                           description="Run every stage in order, skipping the ones already done.")
    _config_args(p_run)
    p_stage = sub.add_parser("stage", help="run one stage (its input stages must be done)",
                             description="Run one stage; the stages it reads from must be done.")
    p_stage.add_argument("name", choices=[s.name for s in STAGES], help="the stage to run")
    _config_args(p_stage)
    p_submit = sub.add_parser("submit", help="submit the pipeline to a running Ray cluster as a job",
                              description="Submit `ensemble run` to a running Ray cluster through Ray's Jobs "
                              "API, with the working directory (and the config file inside it), then follow "
                              "its logs.")
    p_submit.add_argument("--address", help="the cluster's dashboard URL (default: $RAY_ADDRESS, else "
                          "http://127.0.0.1:8265)")
    p_submit.add_argument("--working-dir", type=Path, default=Path.cwd(),
                          help="the directory uploaded with the job (default: the current one)")
    p_submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    _config_args(p_submit)
    p_status = sub.add_parser("status", help="show each stage's state and key metric for a run directory",
                              description="Show each stage's state and key metric for a run directory.")
    p_status.add_argument("run_dir", type=Path, help="a run directory, e.g. runs/default")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show its traceback instead of one line (or set ENSEMBLE_DEBUG=1)")

    # argparse gives `overrides` nothing once an option follows the stage name ("stage cluster
    # --config f a=b"), so key=value words it leaves over are overrides too.
    args, rest = parser.parse_known_args(argv)
    unknown = [w for w in rest if "=" not in w or w.startswith("-") or args.command == "status"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command != "status":
        args.overrides += rest
    try:
        if args.command == "status":
            return status(args.run_dir)
        if args.command == "submit":
            from .submit import submit
            return submit(args.address, args.config, args.overrides, args.working_dir, wait=not args.no_wait)
        cfg = load_config(args.config, args.overrides)
        summaries = run_pipeline(cfg, only=args.name if args.command == "stage" else None)
        print(f"\nrun directory: {cfg.run_dir}")
        for name, summary in summaries.items():
            metric = stage_named(name).metric
            if metric in summary:
                print(f"  {name}: {metric} = {summary[metric]:.4f}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume where it stopped", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug or os.environ.get("ENSEMBLE_DEBUG"):
            raise
        print(f"error: {_message(e)}", file=sys.stderr)
        return 2


def _message(error: Exception) -> str:
    """What the user reads of an error: its message for the errors a user causes (bad settings, files,
    data, a failed task: one line each), else its type and first line and where to see more."""
    if isinstance(error, (*USER_ERRORS, TasksFailed)):
        return str(error)
    return f"{one_line(error)} (unexpected: rerun with --debug for the traceback)"


def status(run_dir: Path) -> int:
    """Print each stage's state, key metric and time for the run in `run_dir`."""
    cfg = run_config(run_dir)
    manifest = Manifest(run_dir)
    print(f"run {run_dir}")
    print(f"  {'stage':<14}{'state':<14}{'metric':<24}{'seconds':>9}")
    with fingerprints_held():
        states = {stage.name: state(stage, cfg, manifest) for stage in STAGES}
    for stage in STAGES:
        entry = manifest.get(stage.name)
        value = entry.get("summary", {}).get(stage.metric)
        metric = f"{stage.metric} {value:.4f}" if value is not None else ""
        seconds = f"{entry['seconds']:.1f}" if "seconds" in entry else ""
        print(f"  {stage.name:<14}{states[stage.name]:<14}{metric:<24}{seconds:>9}")
    general = manifest.get("generalist").get("summary", {})
    if general.get("imported"):
        print(f"  generalist: imported from {cfg.generalist.checkpoint} (sha256 {general['imported_sha256'][:12]}), "
              "evaluated, not trained here")
    subsets = manifest.get("cluster").get("summary")
    if subsets:
        print(f"  subsets: {subsets['num_subsets']} ({subsets['shape']}), sizes {subsets['size_min']} to "
              f"{subsets['size_max']} (median {subsets['size_median']:g}), {subsets['classes_covered']} classes covered")
    spec = manifest.get("specialists").get("summary")
    if spec:
        print(f"  specialists: conditional top-1 {spec['conditional_top1']:.4f} vs the generalist's "
              f"{spec['generalist_conditional_top1']:.4f} on the same subsets; "
              f"{spec['specialists_at_least_generalist']} of {spec['num_specialists']} at least as good")
    student = manifest.get("distill_back").get("summary")
    if student:
        kept = "n/a" if student["gain_kept"] is None else f"{student['gain_kept']:.0%}"
        print(f"  distill_back: test top-1 generalist {student['generalist_top1']:.4f}, ensemble "
              f"{student['ensemble_top1']:.4f}, student {student['student_top1']:.4f} (keeps {kept} of the gain)")
    return 0


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="a YAML config file (see configs/); defaults apply otherwise")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config keys, dotted: generalist.train.epochs=5 data.source=digits")


if __name__ == "__main__":
    sys.exit(main())
