"""`python -m optsys.train [--recipe NAME | --config FILE] [key.sub=value ...]`

With no arguments it runs the `quickstart` recipe: a tiny model learns 2-digit addition on CPU
in about 7 minutes on 2 cores, with held-out accuracy measured before and after.
Under `torchrun` the same command runs one process per device.
"""

from __future__ import annotations

import argparse
import sys

from optsys.config import ConfigError, load_config
from optsys.methods import METHODS


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m optsys.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="a shipped recipe from optsys/recipes/ (default: quickstart)")
    p.add_argument("--config", help="a YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=2e-5 data.max_tokens=4096")
    return p.parse_args(argv)


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="optsys run summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


def input_error_message(error: Exception) -> str:
    """One paragraph for an input error: what kind, then its message (which names the key, file or row
    and what to do). Lines of the message stay together; no blank line, no traceback."""
    kind = {"ConfigError": "config error", "DataError": "data error", "CheckpointError": "checkpoint error",
            "EngineError": "rollout engine error", "SyncError": "weight sync error", "RewardError": "reward error"}
    text = "\n".join(line for line in str(error).strip().splitlines() if line.strip())
    return f"{kind.get(type(error).__name__, type(error).__name__)}: {text}"


RANK_GRACE_S = 10


def _exit_with(error: Exception) -> None:
    """Exit non-zero with the paragraph on stderr. Under torchrun every rank meets the same input error (each
    validates the same config and output folder, loads the same data, and checkpoint verdicts are shared), so
    rank 0 prints it. The other ranks wait first: torchrun stops them as soon as rank 0 exits, and a rank that
    exited at once could get rank 0 stopped before it printed. A rank still running after the wait (its error
    was its own) prints it, marked with its rank."""
    import os
    import time

    rank = os.environ.get("RANK", "0")
    if rank != "0":
        time.sleep(RANK_GRACE_S)
        sys.exit(f"rank {rank}: {input_error_message(error)}")
    sys.exit(input_error_message(error))


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.recipe, args.config, args.overrides)
        from optsys.trainers.common import check_output_dir

        check_output_dir(cfg)  # on every rank: a refused folder stops the whole job alike
    except ConfigError as e:
        _exit_with(e)
    import importlib

    from optsys.checkpoint import CheckpointError
    from optsys.data.errors import DataError
    from optsys.rollout.engine import EngineError
    from optsys.rollout.rewards import RewardError
    from optsys.rollout.sync import SyncError

    trainer = importlib.import_module(METHODS[cfg.method].trainer)
    try:
        summary = trainer.train(cfg)
    except (ConfigError, DataError, CheckpointError, EngineError, SyncError, RewardError) as e:
        # Input problems (and RL's checked failures): the message names the file/row/key/phase and the fix.
        _exit_with(e)
    if summary is not None:  # ranks other than 0 under torchrun may return None
        print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
