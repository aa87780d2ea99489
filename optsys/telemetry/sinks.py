"""Where MetricsLog's rows go besides metrics.jsonl: TensorBoard event files and a Weights & Biases run.

Both take the same `split/name` keys as metrics.jsonl and the row's step as the global step; neither sees
the jsonl row's own columns (`step`, `time_s`). Values that are not numbers are left out of both (every
trainer logs numbers). Each sink is opened on rank 0 only (MetricsLog is enabled there alone).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TENSORBOARD_DIR = "tensorboard"  # <output_dir>/tensorboard/: `tensorboard --logdir runs/` lists every run
WANDB_INSTALL = "pip install wandb (or pip install 'optsys[wandb]')"

_said: set[str] = set()  # one-time notes already printed in this process


def _say_once(key: str, text: str) -> None:
    if key not in _said:
        _said.add(key)
        print(text, file=sys.stderr, flush=True)


def numbers(metrics: dict) -> dict[str, float]:
    """The entries of a metrics row that are numbers (tensors, bools and ints as floats; NaN and inf kept)."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, (bool, int, float)):
            out[key] = float(value)
    return out


class TensorBoardSink:
    """Scalars into `<log_dir>/events.out.tfevents.*`, flushed after every row (the jsonl cadence), so a killed
    run keeps in TensorBoard exactly what it kept in metrics.jsonl.

    A run resumed from step `start_step` starts its event file with a restart marker (SummaryWriter's
    purge_step), so TensorBoard hides what the killed run logged after that checkpoint, as the resume
    rewinds metrics.jsonl. TensorBoard stores scalars as float32."""

    def __init__(self, log_dir: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1 if start_step > 0 else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(out_dir: Path, start_step: int = 0) -> TensorBoardSink | None:
    """A TensorBoardSink in <out_dir>/tensorboard/, or None (one warning per process) without the package."""
    try:
        return TensorBoardSink(Path(out_dir) / TENSORBOARD_DIR, start_step)
    except ImportError as e:
        _say_once("tensorboard", f"warning: trainer.tensorboard=true but TensorBoard cannot be imported ({e}); "
                                 "metrics.jsonl is written as usual. pip install tensorboard to get event files, "
                                 "or set trainer.tensorboard=false to silence this.")
        return None


class WandbSink:
    """A W&B run named after the run folder, with the resolved config as its config, its files in
    <out_dir>/wandb/. Offline unless the user set WANDB_MODE (said once): a run never waits on the network,
    and `wandb sync <out_dir>/wandb/offline-run-*` uploads it later. A resumed run starts a new W&B run of
    the same name whose steps continue from the checkpoint."""

    def __init__(self, out_dir: Path, project: str, config: dict):
        try:
            import wandb
        except ImportError as e:  # validation checks first (TrainConfig.validate); a library call may not
            raise ImportError(f"trainer.wandb=true needs the wandb package: {WANDB_INSTALL}") from e
        out_dir = Path(out_dir)
        # passed explicitly: wandb reads WANDB_MODE once per process, at its first init
        mode = os.environ.get("WANDB_MODE") or "offline"
        if not os.environ.get("WANDB_MODE"):
            _say_once("wandb", f"W&B: offline mode (WANDB_MODE is not set): the run is saved under {out_dir}/wandb/; "
                               "upload it with `wandb sync <that folder>/offline-run-*`, or set WANDB_MODE=online "
                               "to stream it live")
        try:
            self.run = wandb.init(project=project, name=out_dir.name, config=config, dir=str(out_dir), mode=mode)
        except Exception as e:
            raise RuntimeError(f"trainer.wandb=true: wandb.init failed (WANDB_MODE={os.environ.get('WANDB_MODE')!r}): "
                               f"{e}. Log in with `wandb login`, unset WANDB_MODE to log offline, or set "
                               "trainer.wandb=false") from e

    def log(self, step: int, metrics: dict[str, float]) -> None:
        # rows of one step (train metrics, then an eval) merge into that step's W&B history entry
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()
