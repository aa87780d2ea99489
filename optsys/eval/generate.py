"""Batched greedy generation with Hugging Face `generate` (the CPU fallback; vLLM serves RL rollouts)."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_greedy(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int,
                    batch_size: int, synced_gpus: bool = False) -> list[str]:
    """Completions (special tokens stripped) for chat prompts, in order.

    A completion ends at any of `stop_token_ids(model, tokenizer)`, or after max_new_tokens.
    synced_gpus: keep stepping until every rank's batch is done (ranks of an FSDP model generating
    different prompts must run the same number of forwards)."""
    if tokenizer.chat_template is None:
        raise ValueError(
            "the tokenizer has no chat template, so chat prompts cannot be rendered; set "
            "tokenizer.chat_template (or use a model whose tokenizer_config.json carries one)"
        )
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # decoder-only: pad on the left
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    outputs: list[str] = []
    try:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stops,
                synced_gpus=synced_gpus,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


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
