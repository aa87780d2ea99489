"""Batched greedy generation with Hugging Face `generate` (the CPU fallback; vLLM serves RL rollouts)."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_greedy(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int,
                    batch_size: int, synced_gpus: bool = False) -> list[str]:
    """Completions (special tokens stripped) for chat prompts, in order.

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
                eos_token_id=tokenizer.eos_token_id,
                synced_gpus=synced_gpus,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs
