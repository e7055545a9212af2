"""A network wrapper that counts its calls: one call is one network evaluation of the batch, so exact NFE
accounting can be checked at the network rather than trusted from a sampler's own report."""
from __future__ import annotations

import torch


class CountingNet(torch.nn.Module):
    """`net`, unchanged, with `calls` incremented on every forward."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args, **kw):
        self.calls += 1
        return self.net(*args, **kw)
