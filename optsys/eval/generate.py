"""Where a completion ends: the stop token ids of a model and its chat template (every engine stops at them)."""

from __future__ import annotations


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a completion, in order, without repeats.

    The union of the model's generation_config.eos_token_id (an int or a list: Qwen2.5 and Llama 3 Instruct
    list their end-of-turn token beside end-of-text), the tokenizer's eos token and the chat template's
    end-of-turn token (a base model's template may close turns with a token that is neither)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    ids += [i for i in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)) if i is not None]
    return list(dict.fromkeys(int(i) for i in ids))


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message, or None.

    Found by rendering a two-message conversation with a marker as the assistant's content and
    tokenizing the text that follows the marker (e.g. `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`)."""
    if tokenizer.chat_template is None:
        return None
    marker = "optsys-end-of-turn-probe"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    after = text[text.rfind(marker) + len(marker):].lstrip() if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False).input_ids if after else []
    special = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special} | set(tokenizer.all_special_ids)
    return ids[0] if ids and ids[0] in special else None
