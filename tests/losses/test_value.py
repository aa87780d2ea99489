"""PPO's clipped value loss as a pure tensor function."""

import pytest
import torch

from optsys.losses import value_loss


def test_clipped_value_loss_by_hand():
    values = torch.tensor([1.0, 0.0, 2.0, 5.0], requires_grad=True)
    returns = torch.tensor([1.5, 1.0, 0.0, 0.0])
    old = torch.tensor([0.0, 0.0, 1.5, 0.0])
    w = torch.tensor([0.25, 0.25, 0.5, 0.0])  # the last token carries no weight (a filler's)
    loss, metrics = value_loss(values, returns, old, w, clip=0.2)
    # token 0: V moved 1.0 from V_old (clipped to 0.2): max((1 - 1.5)^2, (0.2 - 1.5)^2) = 1.69
    # token 1: unclipped: (0 - 1)^2 = 1; token 2: V moved 0.5 (clipped to 1.7): max(4, 2.89) = 4
    per_token = 0.5 * torch.tensor([1.69, 1.0, 4.0])
    assert float(loss) == pytest.approx(float((per_token * w[:3]).sum()))
    assert float(metrics["value_loss"]) == pytest.approx(float(per_token.mean()))
    assert float(metrics["value_clip_fraction"]) == pytest.approx(2 / 3)  # tokens 0 and 2 of the 3 live ones
    loss.backward()
    assert values.grad[3] == 0 and values.grad[0] == 0  # no weight; clipped side is the max: no gradient
