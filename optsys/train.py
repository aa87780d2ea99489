"""`python -m optsys.train [--recipe NAME | --config FILE] [key.sub=value ...]`

With no arguments it runs the `quickstart` recipe: a tiny model learns 2-digit addition on CPU
in about 7 minutes on 2 cores, with held-out accuracy measured before and after.
Under `torchrun` the same command runs one process per device.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from optsys.errors import InputError, input_error_message
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


def run(cfg) -> dict | None:
    """Train `cfg` (a TrainConfig from optsys.validation.load_config) with its method's trainer, model sources
    resolved here (optsys.sources: `stage:` recipes trained first or reused, `tiny:` presets built). Under
    torchrun every rank calls it; ranks other than 0 may return None."""
    from optsys.sources import resolve_source

    trainer = importlib.import_module(METHODS[cfg.method].trainer)
    return trainer.train(cfg, resolve=resolve_source)


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from optsys.trainers.run import check_output_dir
        from optsys.validation import load_config

        cfg = load_config(args.recipe, args.config, args.overrides)
        check_output_dir(cfg)  # on every rank: a refused folder stops the whole job alike
        # Input problems (and RL's checked failures) are InputErrors: the message names the file/row/key/phase
        # and the fix.
        summary = run(cfg)
    except InputError as e:
        _exit_with(e)
    if summary is not None:  # ranks other than 0 under torchrun may return None
        print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
