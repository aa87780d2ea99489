"""Reward models: a scalar head on a causal LM backbone, as a Hugging Face sequence-classification model.

Loaded with AutoModelForSequenceClassification(num_labels=1) from any causal LM folder (the lm_head
is dropped, the `score` Linear(H, 1) starts random), so the saved folder reloads the same way.

Which token is pooled: Hugging Face's sequence-classification head reads the RIGHTMOST token whose id is not
`config.pad_token_id` (position 0 if every token is pad; the last position if pad_token_id is None).
Training and `score()` apply that same rule to each packed sequence (`pooled_positions`), so a reward
trained here, a reward from `score()` and the exported `final/` reloaded by AutoModelForSequenceClassification
on a right-padded batch read the same hidden state. When pad == eos (load_tokenizer's fallback for tokenizers
without a pad token) a sequence ending in eos is pooled at the token before its trailing eos run, as in HF
and TRL's RewardTrainer. We do not add a distinct pad token instead: that adds a vocabulary row (resized
embeddings, a tokenizer that no longer matches the policy or reference), and any HF user scoring with the
base tokenizer would still pool by HF's rule; one rule everywhere is the contract that survives export.
"""

from __future__ import annotations

import torch

from optsys.config import ModelConfig
from optsys.data.packing import collate_packed, pack_best_fit_decreasing
from optsys.data.tokenize import IGNORE, TokenizedExample
from optsys.models.load import DTYPES, load_tokenizer, pick_attn_implementation
from optsys.models.lora import apply_lora
from optsys.models.packed import packed_hidden
from optsys.models.sources import local_source


def load_reward_model(cfg: ModelConfig, device: torch.device, seed: int = 0, resolve=local_source):
    """(sequence-classification model with one label, tokenizer); pad_token_id set so HF finds the last token.
    `resolve(source, seed)` gives the folder of cfg.name_or_path (optsys.models.load)."""
    from transformers import AutoModelForSequenceClassification

    path = resolve(cfg.name_or_path, seed, dtype=cfg.dtype)
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


def pooled_positions(input_ids: torch.Tensor, seq_lens: list[int], pad_token_id: int | None) -> torch.Tensor:
    """[S] index into the packed row [1, T] of the token each sequence's reward is read at (HF's rule, per
    sequence): its rightmost token that is not pad_token_id; its first token if all are pad; its last token
    when pad_token_id is None."""
    ids = input_ids.reshape(-1)
    lens = torch.tensor(seq_lens, device=ids.device)
    ends = lens.cumsum(0)
    if pad_token_id is None:
        return ends - 1
    starts = ends - lens
    seg = torch.repeat_interleave(torch.arange(len(seq_lens), device=ids.device), lens)
    pos = torch.arange(ids.numel(), device=ids.device)
    # A pad position stands for its sequence's start, so an all-pad sequence pools its first token (HF's argmax
    # over zeros picks index 0); any non-pad position is >= the start, so the max is the rightmost non-pad.
    cand = torch.where(ids != pad_token_id, pos, starts[seg])
    return starts.scatter_reduce(0, seg, cand, reduce="amax", include_self=True)


def packed_rewards(model, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """[S] rewards of the sequences of one packed row [1, T]: the head at each one's `pooled_positions`."""
    hidden = packed_hidden(model, input_ids, position_ids, seq_lens)
    pooled = pooled_positions(input_ids, seq_lens, model.config.get_text_config().pad_token_id)
    return score_head(model)(hidden[pooled]).squeeze(-1).float()


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
