"""EMA of weights: the update rule, hand-computed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dl_utils.ema import EMA


def test_ema_update_rule_by_hand() -> None:
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    model[1].num_batches_tracked.fill_(5)
    ema.update(model)  # 0.9 * 1 + 0.1 * 3 = 1.2
    assert torch.allclose(ema.module[0].weight, torch.full((1, 2), 1.2))
    assert ema.module[1].num_batches_tracked.item() == 5  # integer buffers are copied
    ema.update(model)  # 0.9 * 1.2 + 0.1 * 3 = 1.38
    assert torch.allclose(ema.module[0].bias, torch.tensor([1.38]))
    assert torch.allclose(model[0].bias, torch.tensor([3.0]))  # the live model is untouched
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert set(ema.state_dict()) == set(model.state_dict())


def test_ema_decay_range() -> None:
    with pytest.raises(ValueError, match="ema_decay must be in \\[0, 1\\), got 1.0"):
        EMA(nn.Linear(1, 1), decay=1.0)


def test_ema_warmup_decay_by_hand() -> None:
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 1.0)
    ema = EMA(model, decay=0.9, warmup=True)
    assert [ema.decay_at(n) for n in (0, 1, 8, 100)] == [0.1, 2 / 11, 0.5, 0.9]  # (1 + n) / (10 + n), capped
    nn.init.constant_(model.weight, 3.0)
    ema.update(model, step=0)  # 0.1 * 1 + 0.9 * 3 = 2.8: the initial weights are mostly forgotten at once
    assert torch.allclose(ema.module.weight, torch.tensor([[2.8]]))
    ema.update(model, step=100)  # the full decay: 0.9 * 2.8 + 0.1 * 3 = 2.82
    assert torch.allclose(ema.module.weight, torch.tensor([[2.82]]))
    assert EMA(model, decay=0.9).decay_at(0) == 0.9  # no warm-up unless asked
    with pytest.raises(ValueError, match="update index must be >= 0"):
        ema.decay_at(-1)
