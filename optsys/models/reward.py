"""Reward models: a scalar head on a causal LM backbone, as a Hugging Face sequence-classification model.

Loaded with AutoModelForSequenceClassification(num_labels=1) from any causal LM folder (the lm_head
is dropped, the `score` Linear(H, 1) starts random), so the saved folder reloads the same way. The
reward of a sequence is the head applied to the hidden state of its LAST token, as HF computes it
(last non-pad token); on packed rows that is the last position of each sequence.
"""

from __future__ import annotations

import torch

from optsys.config import ModelConfig
from optsys.data.packing import collate_packed, pack_best_fit_decreasing
from optsys.data.tokenize import IGNORE, TokenizedExample
from optsys.models.load import DTYPES, load_tokenizer, pick_attn_implementation, resolve_model_path
from optsys.models.lora import apply_lora
from optsys.models.packed import packed_hidden


def load_reward_model(cfg: ModelConfig, device: torch.device, seed: int = 0):
    """(sequence-classification model with one label, tokenizer); pad_token_id set so HF finds the last token."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(cfg.name_or_path, seed)
    tokenizer = load_tokenizer(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    torch.manual_seed(seed)  # the fresh score head
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, pad_token_id=tokenizer.pad_token_id, revision=cfg.revision, dtype=DTYPES[cfg.dtype],
        attn_implementation=pick_attn_implementation(cfg.attn_implementation, device),
        trust_remote_code=cfg.trust_remote_code, use_safetensors=True).to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora.r > 0:  # adapters on the backbone; peft keeps the head itself fully trainable
        model = apply_lora(model, cfg.lora, task_type="SEQ_CLS")
    return model, tokenizer


def score_head(model) -> torch.nn.Module:
    return model.score


def packed_rewards(model, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """[S] rewards of the sequences of one packed row [1, T]: the head on each sequence's last token."""
    hidden = packed_hidden(model, input_ids, position_ids, seq_lens)
    last = torch.tensor(seq_lens, device=hidden.device).cumsum(0) - 1
    return score_head(model)(hidden[last]).squeeze(-1).float()


def _ids(item, tokenizer) -> list[int]:
    if isinstance(item, str):
        return list(tokenizer(item, add_special_tokens=True)["input_ids"])
    if isinstance(item, list):
        text = tokenizer.apply_chat_template(item, tokenize=False, add_generation_prompt=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    raise TypeError(f"score() takes strings or conversations (lists of {{role, content}}), got {type(item).__name__}")


@torch.no_grad()
def score(model, tokenizer, items: list, *, max_tokens: int = 4096) -> torch.Tensor:
    """Rewards [N] (fp32, CPU) for texts or conversations, in order; packed forwards, no padding."""
    seqs = [_ids(item, tokenizer) for item in items]
    if not seqs:
        return torch.zeros(0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.zeros(len(seqs))
    try:
        for b in pack_best_fit_decreasing([len(s) for s in seqs], max(max_tokens, max(len(s) for s in seqs))):
            batch = collate_packed([TokenizedExample(seqs[i], [IGNORE] * len(seqs[i])) for i in b])
            out[torch.tensor(b)] = packed_rewards(model, batch.input_ids.to(device), batch.position_ids.to(device),
                                                  batch.seq_lens).cpu()
    finally:
        model.train(was_training)
    return out
