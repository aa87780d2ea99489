"""The errors optsys raises for input a user can fix, and the one paragraph each CLI prints for them.

Every class derives from InputError, so an entry point catches one class and prints `input_error_message(e)`
(no traceback): the message itself names the key, file, row or phase and says what to do. Each also keeps the
builtin base it always had (ValueError or RuntimeError) for callers that catch those. This module is the bottom
layer: it imports nothing of optsys.
"""

from __future__ import annotations

import difflib


class InputError(Exception):
    """A problem with what the user gave (config, data, folders, endpoints), with what to do about it."""


class ConfigError(InputError, ValueError):
    """A config problem, with the key and what to do."""


class DataError(InputError, ValueError):
    """Bad training data: the message names the source, the row and the field, and what to do."""


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be resumed from, with the folder and what to do."""


class EngineError(InputError, RuntimeError):
    """A rollout engine could not start, generate or take weights; the message says why and what to do."""


class SyncError(InputError, RuntimeError):
    """The engine is not running the trainer's weights (the canary disagrees)."""


class RewardError(InputError, ValueError):
    """A reward function failed on a sample (raised, returned a non-number, or timed out) with on_error='error'."""


KINDS = {"ConfigError": "config error", "DataError": "data error", "CheckpointError": "checkpoint error",
         "EngineError": "rollout engine error", "SyncError": "weight sync error", "RewardError": "reward error"}


def input_error_message(error: Exception) -> str:
    """One paragraph for an input error: what kind, then its message (which names the key, file or row
    and what to do). Lines of the message stay together; no blank line, no traceback."""
    text = "\n".join(line for line in str(error).strip().splitlines() if line.strip())
    return f"{KINDS.get(type(error).__name__, type(error).__name__)}: {text}"


def did_you_mean(name: str, options) -> str:
    """' (did you mean 'x'?)' for the closest option, else '; valid: a, b, c'."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; valid: {', '.join(sorted(options))}"
