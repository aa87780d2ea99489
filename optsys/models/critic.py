"""PPO's critic: a copy of the policy's decoder with a scalar value head, and its packed forward.

build_critic(policy) makes it (the head at zero, so V = 0 at the start); the trainer prepares it like the policy
(fp32 master weights, FSDP2 shards) with `packed_values` attached as its forward method, and reads V(s_t) at
every trained position of a packed row.
"""

from __future__ import annotations

import copy

import torch

from optsys.data.tokenize import IGNORE


class ValueModel(torch.nn.Module):
    """PPO's critic: the policy's decoder (a copy, trained on its own) and a scalar head on its hidden states."""

    def __init__(self, lm):
        super().__init__()
        lm.lm_head = torch.nn.Identity()  # unused: the value head reads the final hidden states
        self.lm = lm
        hidden = lm.config.hidden_size
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: the first advantages are the returns
        torch.nn.init.zeros_(self.value_head.bias)

    def get_decoder(self):  # what shard_model and packed_hidden use
        return self.lm.get_decoder()

    @property
    def config(self):
        return self.lm.config

    @property
    def dtype(self):  # packed_hidden builds eager attention's additive mask in it
        return self.lm.dtype


def packed_values(critic, input_ids, position_ids, seq_lens, targets) -> torch.Tensor:
    """V(s_t) at every trained position of a packed row (the state before each model token), [N]."""
    from optsys.models.packed import packed_hidden

    hidden = packed_hidden(critic, input_ids, position_ids, seq_lens)
    keep = targets.reshape(-1) != IGNORE
    return critic.value_head(hidden[keep]).squeeze(-1).float()


def build_critic(policy) -> ValueModel:
    """A critic for `policy`: a deep copy of it (the policy is untouched) under a zero value head."""
    return ValueModel(copy.deepcopy(policy))
