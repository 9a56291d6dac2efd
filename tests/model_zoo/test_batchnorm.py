"""keep_running_stats: running statistics and batch counters unchanged, normalisation and gradients as without it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model_zoo.batchnorm import keep_running_stats


@pytest.mark.parametrize("momentum", [0.1, None], ids=["exponential", "cumulative"])
def test_running_statistics_survive_the_block_and_nothing_else_changes(momentum: float | None) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=momentum), nn.ReLU(), nn.BatchNorm2d(3))
    net(torch.randn(4, 1, 6, 6))  # non-trivial statistics to start from
    plain = copy.deepcopy(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 1, 6, 6) * 3 + 1
    with keep_running_stats(net):
        out = net(x)
        out.square().sum().backward()  # the backward inside the block, as a sub-step does
    plain_out = plain(x)
    plain_out.square().sum().backward()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not torch.equal(plain.state_dict()["1.running_mean"], before["1.running_mean"])  # it would have moved
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)  # batch statistics, as without the block
    for p, q in zip(net.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert net[1].momentum == momentum  # restored
    net(x)  # and updates resume after the block
    assert not torch.equal(net.state_dict()["1.running_mean"], before["1.running_mean"])
