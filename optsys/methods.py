"""The one registry of training methods: which trainer runs each, and which config section it reads.

Everything else derives from it: the valid `method` values (config validation, with a did-you-mean), the
dispatch in `python -m optsys.train`, the loss hyper-parameters a preference trainer passes on, the checks
that refuse a setting a method would ignore, and the sections a run's config.yaml carries (its own family's
only). Adding a method is one entry here plus its loss (optsys.losses) or trainer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    trainer: str  # module with `train(cfg) -> summary`
    section: str | None = None  # TrainConfig section of the method family's settings (None: no own section)
    hyper: tuple[str, ...] = ()  # keys of `section` that the method's loss takes, by name
    reference: bool = False  # scores against a reference model (pref.reference, pref.reference_model)


PREF = "optsys.trainers.preference"

METHODS: dict[str, Method] = {
    "sft": Method("optsys.trainers.sft"),
    "dpo": Method(PREF, "pref", ("beta", "label_smoothing"), reference=True),
    "robust": Method(PREF, "pref", ("beta", "label_smoothing"), reference=True),
    "ipo": Method(PREF, "pref", ("beta",), reference=True),
    "simpo": Method(PREF, "pref", ("beta", "gamma", "label_smoothing")),
    "orpo": Method(PREF, "pref", ("lam",)),
    "cpo": Method(PREF, "pref", ("beta", "alpha", "label_smoothing")),
    "kto": Method(PREF, "pref", ("beta", "desirable_weight", "undesirable_weight"), reference=True),
    "rm": Method("optsys.trainers.reward", "rm", ("margin", "center_coef")),
}

# Every family section of TrainConfig; a run's config.yaml keeps only its method's.
FAMILY_SECTIONS = sorted({m.section for m in METHODS.values() if m.section})


def methods_of(trainer: str) -> list[str]:
    """The method names a trainer module runs."""
    return [name for name, m in METHODS.items() if m.trainer == trainer]


def takes(key: str) -> list[str]:
    """The methods whose loss takes hyper-parameter `key` (e.g. "label_smoothing")."""
    return [name for name, m in METHODS.items() if key in m.hyper]
