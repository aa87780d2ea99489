"""Rows -> token ids and shifted targets: chat template, loss mask, overlong policy, counts.

Targets are shifted here, once: `targets[i]` is the token the model must predict at position
`i` (that is `input_ids[i + 1]` when that token is trained) and -100 otherwise, and the last
position of every sequence is -100. Packing can then concatenate sequences with no label
crossing from one sequence into the next, and losses never shift again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from optsys.data.sources import row_format
from optsys.errors import DataError

IGNORE = -100
OVERLONG_POLICIES = ("error", "truncate", "skip")
ROLES = ("system", "user", "assistant")


@dataclass
class TokenizedExample:
    """One sequence: its token ids and its already-shifted targets (-100 where not trained)."""

    input_ids: list[int]
    targets: list[int]

    @property
    def num_target_tokens(self) -> int:
        return sum(t != IGNORE for t in self.targets)


@dataclass
class DataReport:
    """What tokenization did to the rows, for the run's metrics. Nothing is dropped uncounted."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    tokens: int = 0
    trained_tokens: int = 0

    def metrics(self, prefix: str = "data/") -> dict[str, int]:
        """Flat `data/<name>` counters for metrics.jsonl and summary.json."""
        out = {
            f"{prefix}{k}": getattr(self, k)
            for k in ("rows", "kept", "truncated", "tokens", "trained_tokens")
        }
        out.update({f"{prefix}skipped_{reason}": n for reason, n in sorted(self.skipped.items())})
        return out


def tokenize_rows(
    rows,
    tokenizer,
    *,
    max_tokens: int,
    train_on_prompt: bool = False,
    overlong: str = "error",
    source: str = "data",
) -> tuple[list[TokenizedExample], DataReport]:
    """Tokenize rows of any supported format into examples of at most `max_tokens` tokens."""
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"data.overlong must be one of {list(OVERLONG_POLICIES)}, got {overlong!r}")
    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise ValueError(f"data.max_tokens must be an integer >= 2, got {max_tokens!r}")
    examples: list[TokenizedExample] = []
    report = DataReport()
    for index, row in enumerate(rows):
        report.rows += 1
        fmt = row_format(row, source=source, index=index)
        where = f"{source}: row {index}"
        if fmt == "messages":
            ids, labels = _encode_messages(row["messages"], tokenizer, where, "messages", train_on_prompt)
        elif fmt == "prompt_completion":
            ids, labels = _encode_prompt_completion(
                row["prompt"], row["completion"], tokenizer, where, train_on_prompt
            )
        else:
            ids, labels = _encode_text(row["text"], tokenizer, where)

        truncated = False
        if len(ids) > max_tokens:
            if overlong == "error":
                raise DataError(
                    f"{where} is {len(ids)} tokens long, more than data.max_tokens={max_tokens}. Raise "
                    f"data.max_tokens, or set data.overlong=truncate (keep the first {max_tokens} tokens) "
                    f"or data.overlong=skip (drop such rows; they are counted in the data report)."
                )
            if overlong == "skip":
                _count(report.skipped, "overlong")
                continue
            ids, labels, truncated = ids[:max_tokens], labels[:max_tokens], True

        # Shift: position i predicts token i + 1; the last position predicts nothing.
        targets = [ids[i + 1] if labels[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]
        trained = sum(t != IGNORE for t in targets)
        if trained == 0:  # only truncation can get here: the trained part was cut off
            _count(report.skipped, "no_trained_tokens_after_truncation")
            continue
        report.truncated += truncated
        report.kept += 1
        report.tokens += len(ids)
        report.trained_tokens += trained
        examples.append(TokenizedExample(input_ids=list(ids), targets=targets))
    if not examples and report.rows:
        raise DataError(
            f"{source}: all {report.rows} rows were skipped ({report.skipped}); nothing is left to train on. "
            f"Raise data.max_tokens or change data.overlong."
        )
    return examples, report


def _count(counter: dict[str, int], key: str) -> None:
    counter[key] = counter.get(key, 0) + 1


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos_id(tokenizer, where: str) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"{where}: the tokenizer has no eos_token to end the sequence; set tokenizer.eos_token."
        )
    return tokenizer.eos_token_id


def _encode_text(text, tokenizer, where: str) -> tuple[list[int], list[bool]]:
    """Plain text: every token is trained, eos appended."""
    if not isinstance(text, str) or not text.strip():
        raise DataError(
            f"{where}: field 'text' must be a non-empty string, got {text!r}; fix or remove the row."
        )
    eos = _eos_id(tokenizer, where)
    ids = _encode(tokenizer, text, special=True)
    if not ids or ids[-1] != eos:  # some tokenizers (T5) already append eos
        ids.append(eos)
    return ids, [True] * len(ids)


def _encode_prompt_completion(prompt, completion, tokenizer, where, train_on_prompt):
    """Prompt/completion: a two-turn chat when the tokenizer has a template, else prompt + completion + eos."""
    if isinstance(completion, str):
        if not completion.strip():
            raise DataError(
                f"{where}: field 'completion' is empty; give the row a non-empty completion or remove it."
            )
        completion_msgs = [{"role": "assistant", "content": completion}]
    elif isinstance(completion, list):  # conversational prompt/completion (TRL's format)
        completion_msgs = completion
    else:
        raise DataError(
            f"{where}: field 'completion' must be a string or a list of messages, got {completion!r}."
        )
    if isinstance(prompt, str):
        prompt_msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        prompt_msgs = prompt
    else:
        raise DataError(f"{where}: field 'prompt' must be a string or a list of messages, got {prompt!r}.")

    if tokenizer.chat_template is not None or isinstance(prompt, list) or isinstance(completion, list):
        return _encode_messages(
            prompt_msgs + completion_msgs, tokenizer, where, "prompt/completion", train_on_prompt
        )

    eos = _eos_id(tokenizer, where)
    # Tokenized apart so the boundary is exact: no BPE merge across prompt and completion.
    prompt_ids = _encode(tokenizer, prompt, special=True)
    completion_ids = _encode(tokenizer, completion, special=False) + [eos]
    ids = prompt_ids + completion_ids
    return ids, [train_on_prompt] * len(prompt_ids) + [True] * len(completion_ids)


def _check_messages(messages, where: str, field_name: str) -> list[dict]:
    """Validate a conversation; return it with None-valued keys dropped (columnar readers add them)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: field '{field_name}' must be a non-empty list of {{role, content}}, got {messages!r}."
        )
    clean = []
    for j, m in enumerate(messages):
        at = f"{where}: field '{field_name}[{j}]'"
        if not isinstance(m, dict):
            raise DataError(f"{at} must be an object with 'role' and 'content', got {m!r}.")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{at}.role is {role!r}; it must be one of {list(ROLES)}. Fix or remove the row.")
        if not isinstance(content, str):
            raise DataError(f"{at}.content must be a string, got {content!r}. Fix or remove the row.")
        if role == "assistant" and not content.strip():
            raise DataError(f"{at}.content is an empty assistant turn; give it content or remove the row.")
        clean.append({k: v for k, v in m.items() if v is not None})
    if not any(m["role"] == "assistant" for m in clean):
        raise DataError(
            f"{where}: field '{field_name}' has no assistant turn, so there is nothing to train on; "
            f"add an assistant turn or remove the row."
        )
    return clean


def _encode_messages(messages, tokenizer, where, field_name, train_on_prompt):
    """Chat template, loss on assistant turns only (content and the end-of-turn token after it).

    Renders incrementally: for assistant turn k, the template of messages[:k] with a generation
    prompt must be a token prefix of messages[:k+1], which must be a prefix of the whole
    conversation. The tokens in between are the turn's trained tokens. This needs no
    {% generation %} markers in the template and works for any number of turns.
    """
    messages = _check_messages(messages, where, field_name)
    if tokenizer.chat_template is None:
        raise DataError(
            f"{where}: field '{field_name}' needs a chat template, but the tokenizer has none. Set "
            f"tokenizer.chat_template (for example in the model's tokenizer_config.json), or use "
            f"prompt/completion or text rows, which work without one."
        )

    def render(msgs, generation_prompt: bool) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # jinja errors raised by the template itself (e.g. role order checks)
            roles = [m["role"] for m in msgs]
            raise DataError(
                f"{where}: the model's chat template rejected field '{field_name}' (roles {roles}): "
                f"{type(e).__name__}: {e}. Rewrite the row's turns in the order and roles the template accepts, "
                f"or remove the row."
            ) from e
        return _encode(tokenizer, text, special=False)

    ids = render(messages, False)
    if train_on_prompt:
        return ids, [True] * len(ids)
    labels = [False] * len(ids)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, upto = render(messages[:k], True), render(messages[: k + 1], False)
        if upto[: len(prefix)] != prefix or ids[: len(upto)] != upto:
            raise DataError(
                f"{where}: the chat template is not prefix-stable at field '{field_name}[{k}]': rendering "
                f"the turns before it (with the generation prompt) is not a token prefix of rendering the "
                f"conversation through it, or that is not a prefix of the whole conversation (templates "
                f"that rewrite earlier turns, such as ones that strip reasoning, do this). Use a template "
                f"that renders each turn the same way wherever it appears, or set data.train_on_prompt=true."
            )
        end = _strip_after_end_of_turn(upto, len(prefix), len(upto), special, tokenizer)
        labels[len(prefix) : end] = [True] * (end - len(prefix))
    return ids, labels


def _strip_after_end_of_turn(ids, start, end, special, tokenizer) -> int:
    """Exclude template glue after the end-of-turn token (ChatML's newline after <|im_end|>).

    Generation stops at the end-of-turn token, so the model never has to produce what follows it.
    """
    last = max((i for i in range(start, end) if ids[i] in special), default=None)
    if last is None:
        return end
    if all(not tokenizer.decode([t]).strip() for t in ids[last + 1 : end]):
        return last + 1
    return end
