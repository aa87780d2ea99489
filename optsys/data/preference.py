"""Preference rows -> tokenized (chosen, rejected) pairs -> packed rows holding whole pairs.

Paired rows: `prompt` (a string or a list of messages) with `chosen` / `rejected` (assistant strings
or message lists); `prompt` may be absent when chosen / rejected are full conversations, whose
shared prompt is everything before the last assistant turn. KTO's unpaired rows: `prompt`,
`completion`, `label` (bool, True = desirable).

Each completion is tokenized as a `prompt/completion` row by optsys.data.tokenize (chat template,
loss on the completion only, targets already shifted). A pair packs as two adjacent sequences
(chosen_i then rejected_i) in one padding-free row, so one forward with the block-diagonal mask
and `sequence_logprobs(cu_seqlens=...)` gives the per-sequence log-probs: sequence 2i is pair i's
chosen, 2i + 1 its rejected. KTO uses the same layout: sequence 2i is example i, 2i + 1 its KL partner,
the same prompt with the completion of an example of ANOTHER prompt (`kl_partners`), whose log-ratio
estimates KL(pi || ref).
"""

from __future__ import annotations

import hashlib
import math
import random
from array import array
from dataclasses import dataclass, field

import torch

from optsys.config import DataConfig
from optsys.data.packing import PackedBatch, collate_packed, pack_best_fit_decreasing
from optsys.data.sources import load_rows
from optsys.data.tasks import get_task
from optsys.data.tokenize import IGNORE, DataReport, TokenizedExample, _encode_prompt_completion
from optsys.errors import DataError

BAD_PAIR_POLICIES = ("error", "skip")


@dataclass
class PreferencePair:
    """Two sequences sharing a prompt. KTO: `chosen` is the example, `rejected` its KL partner."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    label: bool | None = None  # KTO only: True = desirable
    margin: float | None = None  # reward models: an optional per-row margin

    @property
    def num_tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


@dataclass
class PairBatch:
    """One packed row of whole pairs: sequences (c_0, r_0, c_1, r_1, ...), with pair indices."""

    packed: PackedBatch
    pair_index: list[int]  # index of each pair in its dataset (reference log-prob cache lookup)
    labels: list[bool | None] = field(default_factory=list)
    margins: list[float | None] = field(default_factory=list)

    @property
    def num_pairs(self) -> int:
        return len(self.pair_index)

    @property
    def num_tokens(self) -> int:
        return self.packed.num_tokens

    @property
    def chosen_target_tokens(self) -> int:
        """Target tokens of the row's chosen sequences (KTO: its examples)."""
        return int((self.packed.targets[0, self.seq_ids() % 2 == 0] != IGNORE).sum())

    def seq_ids(self) -> torch.Tensor:
        """[T] sequence index of every position (2i = chosen of pair i in this row, 2i + 1 = rejected)."""
        lens = torch.tensor(self.packed.seq_lens)
        return torch.repeat_interleave(torch.arange(len(lens)), lens)

    def half(self, which: int) -> PackedBatch:
        """The row's chosen sequences (which=0; KTO: the examples) or rejected ones (1; KTO: the KL partners),
        packed as a row of their own, in pair order."""
        keep = self.seq_ids() % 2 == which
        b = self.packed
        targets = b.targets[:, keep]
        return PackedBatch(b.input_ids[:, keep], targets, b.position_ids[:, keep], b.seq_lens[which::2],
                           int((targets != IGNORE).sum()))


def _shift(ids: list[int], labels: list[bool]) -> list[int]:
    """The same shift as tokenize_rows: position i predicts token i + 1 where that token is trained."""
    return [ids[i + 1] if labels[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]


def _split_conversation(msgs, where: str, field_name: str):
    """A full conversation -> (prompt messages, completion messages): split before the last assistant turn."""
    if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
        raise DataError(f"{where}: field '{field_name}' must end with an assistant turn, got {msgs!r}.")
    k = len(msgs)
    while k > 0 and isinstance(msgs[k - 1], dict) and msgs[k - 1].get("role") == "assistant":
        k -= 1
    return msgs[:k], msgs[k:]


def _completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))


def _pair_parts(row: dict, where: str):
    """(prompt, chosen completion, rejected completion) of a paired row, validated."""
    for name in ("chosen", "rejected"):
        if row.get(name) is None:
            raise DataError(f"{where}: field '{name}' is missing; preference rows need prompt, chosen and "
                            f"rejected. Fix or remove the row.")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if prompt is None or (isinstance(prompt, list) and isinstance(chosen, list)
                          and chosen[: len(prompt)] == prompt and len(chosen) > len(prompt)):
        # Full conversations (TRL's implicit-prompt format): both must share the turns before the answer.
        if not isinstance(chosen, list) or not isinstance(rejected, list):
            raise DataError(f"{where}: field 'prompt' is missing, so 'chosen' and 'rejected' must be full "
                            f"conversations (lists of messages); got {type(chosen).__name__} and "
                            f"{type(rejected).__name__}.")
        p_c, chosen = _split_conversation(chosen, where, "chosen")
        p_r, rejected = _split_conversation(rejected, where, "rejected")
        if p_c != p_r:
            raise DataError(f"{where}: field 'rejected' has a different prompt from field 'chosen' (the turns "
                            f"before the last assistant answer differ); a pair must share its prompt.")
        if prompt is None:
            prompt = p_c
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(completion, (str, list)):
            raise DataError(f"{where}: field '{name}' must be a string or a list of messages, got {completion!r}.")
        if not _completion_text(completion).strip():
            raise DataError(f"{where}: field '{name}' is an empty completion; give it content or remove the row.")
    if _completion_text(chosen).strip() == _completion_text(rejected).strip():
        raise DataError(f"{where}: field 'rejected' equals field 'chosen' ({_completion_text(chosen)!r}); a "
                        f"pair needs two different completions. Fix or remove the row.")
    return prompt, chosen, rejected


def _kto_parts(row: dict, where: str):
    if row.get("prompt") is None or row.get("completion") is None:
        raise DataError(f"{where}: unpaired (KTO) rows need fields 'prompt', 'completion' and 'label'; "
                        f"got {sorted(k for k, v in row.items() if v is not None)}.")
    label = row.get("label")
    if not isinstance(label, bool):
        raise DataError(f"{where}: field 'label' must be a boolean (true = desirable), got {label!r}.")
    completion = row["completion"]
    if not isinstance(completion, (str, list)) or not _completion_text(completion).strip():
        raise DataError(f"{where}: field 'completion' is empty or not a string/message list: {completion!r}.")
    return row["prompt"], completion, label


def _margin(value, where: str) -> float | None:
    """A row's optional reward margin: a finite number (or absent)."""
    if value is None:
        return None
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is not None and math.isfinite(number):
        return number
    raise DataError(f"{where}: field 'margin' must be a finite number (or absent, for rm.margin), got {value!r}.")


def _encode(prompt, completion, tokenizer, where: str) -> TokenizedExample:
    ids, labels = _encode_prompt_completion(prompt, completion, tokenizer, where, False)
    return TokenizedExample(list(ids), _shift(ids, labels))


def _truncate(ex: TokenizedExample, n: int) -> TokenizedExample:
    return TokenizedExample(ex.input_ids[:n], ex.targets[: n - 1] + [IGNORE])


def tokenize_pairs(rows, tokenizer, *, max_tokens: int, kto: bool = False, overlong: str = "error",
                   on_bad_pair: str = "error", source: str = "data") -> tuple[list[PreferencePair], DataReport]:
    """Tokenize preference rows (or KTO rows with kto=True) into pairs of at most max_tokens tokens together.

    A bad row raises a DataError naming source, row and field, or with on_bad_pair=skip is counted in
    the report (skipped_bad_pair). overlong=truncate cuts each sequence to max_tokens // 2.
    """
    if on_bad_pair not in BAD_PAIR_POLICIES:
        raise ValueError(f"data.on_bad_pair must be one of {list(BAD_PAIR_POLICIES)}, got {on_bad_pair!r}")
    report = DataReport()
    parts: list[tuple] = []  # (row index, prompt, first completion, second completion | None, label, margin)
    for index, row in enumerate(rows):
        report.rows += 1
        where = f"{source}: row {index}"
        try:
            if not isinstance(row, dict):
                raise DataError(f"{where} is a {type(row).__name__}, not an object with fields.")
            if kto:
                prompt, completion, label = _kto_parts(row, where)
                parts.append((index, prompt, completion, None, label, None))
            else:
                prompt, chosen, rejected = _pair_parts(row, where)
                parts.append((index, prompt, chosen, rejected, None, _margin(row.get("margin"), where)))
        except DataError:
            if on_bad_pair == "error":
                raise
            report.skipped["bad_pair"] = report.skipped.get("bad_pair", 0) + 1
    partner = kl_partners([p[1] for p in parts], source) if kto else []
    pairs: list[PreferencePair] = []
    for k, (index, prompt, first, second, label, margin) in enumerate(parts):
        where = f"{source}: row {index}"
        if kto:
            second = parts[partner[k]][2]
        try:
            a, b = _encode(prompt, first, tokenizer, where), _encode(prompt, second, tokenizer, where)
        except DataError:
            if on_bad_pair == "error":
                raise
            report.skipped["bad_pair"] = report.skipped.get("bad_pair", 0) + 1
            continue
        if len(a.input_ids) + len(b.input_ids) > max_tokens:
            if overlong == "error":
                raise DataError(
                    f"{where}: chosen + rejected are {len(a.input_ids)} + {len(b.input_ids)} tokens, more than "
                    f"data.max_tokens={max_tokens} (a pair packs into one row). Raise data.max_tokens, or set "
                    f"data.overlong=truncate or data.overlong=skip.")
            if overlong == "skip":
                report.skipped["overlong"] = report.skipped.get("overlong", 0) + 1
                continue
            half = max_tokens // 2
            a, b = _truncate(a, half), _truncate(b, half)
            if a.num_target_tokens == 0 or b.num_target_tokens == 0:
                report.skipped["no_trained_tokens_after_truncation"] = \
                    report.skipped.get("no_trained_tokens_after_truncation", 0) + 1
                continue
            report.truncated += 1
        report.kept += 1
        report.tokens += len(a.input_ids) + len(b.input_ids)
        report.trained_tokens += a.num_target_tokens + (0 if kto else b.num_target_tokens)
        pairs.append(PreferencePair(a, b, label=label, margin=margin))
    if not pairs and report.rows:
        raise DataError(f"{source}: all {report.rows} rows were skipped ({report.skipped}); nothing is left to "
                        f"train on.")
    return pairs, report


KL_PARTNER_SEED = 0  # fixed: the partners are part of the data (hashed into the reference cache's key)


def kl_partners(prompts: list, source: str = "data") -> list[int]:
    """For each KTO example k, the index of the example whose completion is its KL partner: one with a
    different prompt, as the KTO paper (Sec. 4.1) and TRL use (a "mismatched" x, y' pair).

    In a fixed random order of the examples, example k takes the next one (cyclically) whose prompt differs
    from its own. A random order keeps the partners' mix of labels and prompts that of the data (the next row
    of `unpaired_rows` would always be the same prompt's other answer, biasing z0 toward 0), and each
    completion serves as a partner about once. A DataError if every example has the same prompt."""
    n = len(prompts)
    order = list(range(n))
    random.Random(KL_PARTNER_SEED).shuffle(order)
    ring = order + order  # walk past the end of the order back to its start
    # nxt[t]: the first position after t in `ring` whose prompt differs from ring[t]'s (None: none left)
    nxt: list[int | None] = [None] * len(ring)
    for t in range(len(ring) - 2, -1, -1):
        nxt[t] = t + 1 if prompts[ring[t + 1]] != prompts[ring[t]] else nxt[t + 1]
    out = [0] * n
    for t in range(n):
        if nxt[t] is None:
            raise DataError(f"{source}: all {n} KTO examples have the same prompt, so no example has a KL partner "
                            f"of another prompt (KTO's KL estimate pairs a prompt with another prompt's "
                            f"completion). Add examples with other prompts.")
        out[ring[t]] = ring[nxt[t]]
    return out


def unpaired_rows(pair_rows: list[dict]) -> list[dict]:
    """Paired rows -> KTO rows: each pair gives its chosen (desirable) and its rejected (undesirable)."""
    out = []
    for row in pair_rows:
        out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    return out


def collate_pairs(pairs: list[PreferencePair], pair_index: list[int]) -> PairBatch:
    seqs = [ex for p in pairs for ex in (p.chosen, p.rejected)]
    return PairBatch(collate_packed(seqs), list(pair_index), [p.label for p in pairs], [p.margin for p in pairs])


def packed_pair_batches(pairs: list[PreferencePair], max_tokens: int, *, shuffle_seed: int | None,
                        order: list[int] | None = None) -> list[PairBatch]:
    """Best-fit-decreasing packing of whole pairs into rows of <= max_tokens tokens; pair indices kept."""
    order = list(range(len(pairs))) if order is None else order
    bins = pack_best_fit_decreasing([pairs[i].num_tokens for i in order], max_tokens)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(bins)
    return [collate_pairs([pairs[order[j]] for j in b], [order[j] for j in b]) for b in bins]


def pairs_sha256(pairs: list[PreferencePair]) -> str:
    """Content hash of tokenized pairs (ids and targets, order included): the reference-cache data key."""
    h = hashlib.sha256()
    for p in pairs:
        for ex in (p.chosen, p.rejected):
            h.update(array("q", [len(ex.input_ids), *ex.input_ids, *ex.targets]).tobytes())
        h.update(bytes([2 if p.label is None else int(p.label)]))
    return h.hexdigest()


@dataclass
class PreferenceData:
    train: list[PreferencePair]
    eval: list[PreferencePair]
    train_report: DataReport


def build_preference_data(d: DataConfig, tokenizer, *, seed: int, kto: bool, pair_rows: list[dict] | None = None,
                          pair_source: str = "on-policy pairs") -> PreferenceData:
    """Pairs from a built-in task (Task.preference_pairs, fixed train/test splits) or a dataset, tokenized; for KTO
    (`kto`) each pair becomes an unpaired desirable and undesirable example.

    pair_rows: the training pairs given (pref.pairs=on_policy, named `pair_source` in errors) in place of the
    task's or data.dataset's. The held-out pairs are then a task's test pairs as usual; with a dataset there are
    none (data.eval_dataset holds {prompt, answer} questions for held-out accuracy, not pairs)."""
    if d.task is not None:
        task = get_task(d.task)
        train_rows = task.preference_pairs("train", d.num_train, difficulty=d.difficulty, seed=seed) \
            if pair_rows is None else pair_rows
        eval_rows = task.preference_pairs("test", d.num_eval, difficulty=d.difficulty, seed=seed)
        if kto:
            train_rows, eval_rows = unpaired_rows(train_rows), unpaired_rows(eval_rows)
        train_name, eval_name = f"task:{d.task}/train", f"task:{d.task}/test"
    elif pair_rows is not None:
        train_rows, eval_rows = (unpaired_rows(pair_rows) if kto else pair_rows), []
        train_name, eval_name = d.dataset, ""
    else:
        train_rows = load_rows(d.dataset, split=d.split)
        eval_rows = load_rows(d.eval_dataset, split=d.eval_split) if d.eval_dataset else []
        train_name, eval_name = d.dataset, d.eval_dataset or ""
    if pair_rows is not None:
        train_name = pair_source
    kw = dict(max_tokens=d.max_tokens, kto=kto, overlong=d.overlong, on_bad_pair=d.on_bad_pair)
    train, report = tokenize_pairs(train_rows, tokenizer, source=train_name, **kw)
    evals = tokenize_pairs(eval_rows, tokenizer, source=eval_name, **kw)[0] if eval_rows else []
    return PreferenceData(train, evals, report)
