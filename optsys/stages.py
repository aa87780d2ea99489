"""Training stages as configs: `model.name_or_path: stage:<recipe>` (or `pref.reference_model`, `rl.teacher`)
names another shipped recipe whose final model this run starts from. This module says where a stage's run
lives and whether it is complete; optsys.sources (at the top, above the trainers) trains it first or reuses it,
so `python -m optsys.train --recipe X` on a fresh machine runs the SFT stage and then X. Nothing here trains.

Cache layout: `<cache root>/stages/<recipe>-<key>/` is the stage's ordinary run folder (config.yaml,
metrics.jsonl, summary.json, final/). The cache root is $OPTSYS_CACHE_DIR, else $XDG_CACHE_HOME/optsys or
~/.cache/optsys (tiny models live beside it in tiny/). <key> is the first 16 hex digits of the sha256 of the
stage's resolved config minus the keys that do not change the trained weights (STAGE_KEY_IGNORES), with a
nested stage, a tiny preset or a local model folder replaced by its own identity, and the optsys version:
change a setting of the stage's recipe and a new stage is trained beside the old one. A local
data.dataset file is named by its path only: edit it in place and the stale stage is reused (delete its folder).

A cached stage is complete when its summary.json (written last) and its final/*.safetensors exist
(optsys.sources moves an incomplete folder aside and trains the stage again).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from optsys.config import TrainConfig, to_dict
from optsys.models.sources import STAGE_PREFIX
from optsys.validation import load_stage_recipe

# Settings that change how a run is logged, where it is written or how it is spread over ranks (like the world
# size: the same weights to rounding), not the weights it trains.
STAGE_KEY_IGNORES = ("output_dir", "overwrite", "resume", "trainer.progress", "trainer.telemetry",
                     "trainer.log_every", "trainer.save_every", "trainer.keep_last", "trainer.tensorboard",
                     "trainer.plots", "trainer.wandb", "trainer.wandb_project", "parallel")



def is_stage(value) -> bool:
    return isinstance(value, str) and value.startswith(STAGE_PREFIX)


def stage_name(value: str) -> str:
    return value[len(STAGE_PREFIX):].strip()


def stage_root() -> Path:
    from optsys.models.tiny import cache_root

    return cache_root() / "stages"


# ---------------------------------------------------------------------------- stage configs


def stage_config(name: str) -> TrainConfig:
    """The stage's recipe as a validated TrainConfig (optsys.validation.load_stage_recipe), its output_dir set to
    its cache folder."""
    cfg = load_stage_recipe(name)
    cfg.output_dir = str(stage_root() / f"{name}-{stage_key(cfg)}")
    return cfg


def stage_key(cfg: TrainConfig) -> str:
    """16 hex digits identifying what the stage trains (see the module docstring)."""
    from optsys import __version__

    data = to_dict(cfg)
    for dotted in STAGE_KEY_IGNORES:
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    data["model"]["name_or_path"] = _source_identity(cfg.model.name_or_path)
    if "pref" in data and data["pref"].get("reference_model"):
        data["pref"]["reference_model"] = _source_identity(cfg.pref.reference_model)
    if "rl" in data and data["rl"].get("teacher"):
        data["rl"]["teacher"] = _source_identity(cfg.rl.teacher)
    data["optsys_version"] = __version__
    return hashlib.sha256(yaml.safe_dump(data, sort_keys=False).encode()).hexdigest()[:16]


def _source_identity(value: str) -> str:
    """A model source with what pins its weights: a nested stage's cache folder, a tiny preset's shape key,
    a local folder's weight-file stamp; a hub id is its own name (model.revision is in the config)."""
    if is_stage(value):
        return f"{value}@{Path(stage_config(stage_name(value)).output_dir).name}"
    if value.startswith("tiny:"):
        from optsys.models.tiny import PRESETS, _spec_key

        preset = value.split(":", 1)[1]
        return f"{value}@{_spec_key(PRESETS[preset], 0)}" if preset in PRESETS else value
    from optsys.checkpoint import weights_stamp

    stamp = weights_stamp(os.path.expanduser(value))
    return f"{value}@{stamp}" if stamp else value


def final_dir(cfg: TrainConfig) -> Path:
    """The model folder a stage hands on: final/, or final-merged/ for a LoRA stage."""
    merged = cfg.model.lora.r > 0 and cfg.method != "rm"
    return Path(cfg.output_dir) / ("final-merged" if merged else "final")


def is_complete(cfg: TrainConfig) -> bool:
    """summary.json is written after final/ (trainers' close_run): both present = the run finished."""
    return (Path(cfg.output_dir) / "summary.json").is_file() and any(final_dir(cfg).glob("*.safetensors"))


def stage_provenance(cfg: TrainConfig) -> dict:
    """Summary entries naming the stage folders a run starts from (`model/stage`, `model/reference_stage`)."""
    out = {}
    for key, value in (("model/stage", cfg.model.name_or_path), ("model/reference_stage", cfg.pref.reference_model),
                       ("model/teacher_stage", cfg.rl.teacher)):
        if is_stage(value):
            out[key] = str(final_dir(stage_config(stage_name(value))))
    return out


def read_summary(cfg: TrainConfig) -> dict:
    return json.loads((Path(cfg.output_dir) / "summary.json").read_text())


