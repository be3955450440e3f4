"""``lightning-tricks search`` and ``lightning-tricks ablate``: experiment runners over a recipe.

Example::

    lightning-tricks search --config configs/search/digits_mlp.yaml --search configs/search/digits_lr_wd.yaml
    lightning-tricks ablate --ablation configs/ablations/digits_few_labels.yaml
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path


def _search_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        allow_abbrev=False,
        help="Coarse-to-fine random search of a recipe's hyperparameters (Optuna).",
    )
    p.add_argument("--config", action="append", required=True, help="Recipe YAML (repeatable, as for `fit`).")
    p.add_argument(
        "--search", required=True, help="Search file: metric, stages and the space by dotted keys."
    )
    p.add_argument("--study-name", default=None, help="Study name (default: the search file's stem).")
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna RDB URL shared by all workers (default: sqlite:///<out>/study.db). The same command"
        " with the same --storage on other machines joins the study, e.g. postgresql://user:pw@host/db.",
    )
    p.add_argument("--out", default=None, help="Report folder (default: runs/search/<study-name>).")
    p.add_argument("--n-jobs", type=int, default=1, help="Worker processes on this machine.")
    p.add_argument(
        "--heartbeat-interval",
        type=int,
        default=60,
        help="Seconds between a running trial's heartbeats in the study (Optuna's heartbeat).",
    )
    p.add_argument(
        "--grace-period",
        type=int,
        default=None,
        help="Seconds without a heartbeat after which another worker fails a trial (its worker was"
        " killed or lost) and queues it again (default: 2 x --heartbeat-interval).",
    )
    p.add_argument("--report-only", action="store_true", help="Only write the report of an existing study.")


def _ablate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate",
        allow_abbrev=False,
        help="Base recipe vs named variants over several seeds, paired statistics.",
    )
    p.add_argument("--ablation", required=True, help="Ablation file: recipe, metric, seeds, variants.")
    p.add_argument("--out", default=None, help="Output folder (default: runs/ablations/<file stem>).")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="Override the file's seeds.")
    p.add_argument(
        "--variants", nargs="+", default=None, help="Run only these variants (the base always runs)."
    )


def main(argv: Sequence[str]) -> None:
    """Dispatch ``search``/``ablate`` (``argv`` without the program name)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    # Like `fit`: an abbreviated option (--seed for --seeds) is an error, never taken for the longer one.
    parser = argparse.ArgumentParser(prog="lightning-tricks", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    _search_parser(sub)
    _ablate_parser(sub)
    args = parser.parse_args(list(argv))
    from lightning_tricks.experiments.interrupt import SearchInterrupted

    try:
        _check_files_exist(args)
        _search(args) if args.command == "search" else _ablate(args)
    except ValueError as err:  # bad input: the message names the key and the fix, no traceback needed
        parser.exit(2, f"lightning-tricks {args.command}: error: {err}\n")
    except SearchInterrupted as err:  # 130 = 128 + SIGINT, as shells report a Ctrl-C
        parser.exit(130, f"lightning-tricks {args.command}: {err}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"lightning-tricks {args.command}: interrupted.\n")


def _check_files_exist(args: argparse.Namespace) -> None:
    """A missing ``--config``/``--search``/``--ablation`` file is named before anything starts."""
    given = {"--config": getattr(args, "config", None) or [], "--search": [getattr(args, "search", None)]}
    given["--ablation"] = [getattr(args, "ablation", None)]
    for option, paths in given.items():
        for path in paths:
            if path is not None and not Path(path).is_file():
                raise ValueError(
                    f"{option} {path} is not a file (looked for {Path(path).resolve()}); pass an existing "
                    "YAML file, e.g. the shipped ones under configs/search/ and configs/ablations/"
                )


def _search(args: argparse.Namespace) -> None:
    from lightning_tricks.experiments.report import write_report
    from lightning_tricks.experiments.search import SearchConfig, SearchRun, ddp_peer_trial, run_search

    if args.n_jobs < 1:
        raise ValueError(f"--n-jobs must be >= 1, got {args.n_jobs}.")
    timing = {"--heartbeat-interval": args.heartbeat_interval, "--grace-period": args.grace_period}
    for option, value in timing.items():
        if value is not None and value < 1:
            raise ValueError(
                f"{option} must be a whole number of seconds >= 1, got {value}; e.g. {option} 60"
                " (a killed worker's trial is failed and queued again after the grace period)."
            )
    search = SearchConfig.from_yaml(args.search)
    name = args.study_name or Path(args.search).stem
    out = Path(args.out or f"runs/search/{name}")
    storage = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    run = SearchRun(
        list(args.config),
        search,
        storage,
        name,
        out,
        heartbeat_interval=args.heartbeat_interval,
        grace_period=args.grace_period,
    )
    peer = ddp_peer_trial()
    if peer is not None:  # a DDP rank > 0 of a trial that this command's rank 0 runs
        run.run_ddp_peer(peer)
        return
    out.mkdir(parents=True, exist_ok=True)
    wall_s = None
    run.open_storage()  # an unreachable URL (or a bad heartbeat setting) fails before anything else
    if not args.report_only:
        search.validate_against(run.configs)
        wall_s = run_search(run, n_jobs=args.n_jobs)
    write_report(run, wall_s)


def _ablate(args: argparse.Namespace) -> None:
    from lightning_tricks.experiments.ablation import AblationConfig, run_ablation

    config = AblationConfig.from_yaml(args.ablation)
    if args.seeds:
        config.seeds = list(args.seeds)
    if args.variants:
        config = config.select(args.variants)
    out = Path(args.out or f"runs/ablations/{Path(args.ablation).stem}")
    run_ablation(config, out)
