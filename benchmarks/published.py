"""BASELINE ONLY: an unfused transcription of the authors' published multi-pass update.

Karoni, Rajpal, Leimkuhler & Stoltz (2026) publish iKFAD, CD and CADAM in this style:
hyperparameters are one-element device tensors and each sub-step is its own pass over all
parameters, building temporaries. This file writes that style out so the benchmarks can time
it against the fused paths; it is not part of dampopt and nothing imports it outside
``benchmarks/``.

The math is the same as dampopt's (``lr = h**2``, sub-steps in the order of the README's
"Update rules", momentum starting at 0; the authors start CD's momentum at ``+grad``, which
changes no timing).
"""

from __future__ import annotations

import math

import torch


class _Published(torch.optim.Optimizer):
    """Shared plumbing: one-element hyperparameter tensors, state created on first use."""

    state_names: tuple[str, ...] = ()

    def __init__(self, params, lr, **hyperparameters):
        super().__init__(params, dict(lr=lr, **hyperparameters))

    def _setup(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        device = params[0].device
        # as in the published code: every scalar is a one-element tensor on the device
        scalars = {
            name: torch.tensor([float(value)], device=device)
            for name, value in group.items()
            if name not in ("params", "lr")
        }
        scalars["h"] = torch.tensor([math.sqrt(group["lr"])], device=device)
        for p in params:
            state = self.state[p]
            for name in self.state_names:
                if name not in state:
                    state[name] = torch.zeros_like(p)
        return params, scalars


class PublishedIKFAD(_Published):
    state_names = ("p", "xi")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params, s = self._setup(group)
            h, gamma, alpha, mu = s["h"], s["gamma"], s["alpha"], s["mu"]
            for q in params:  # B
                st = self.state[q]
                st["p"] = st["p"] - h * q.grad
            for q in params:  # A
                q.copy_(q + h * self.state[q]["p"])
            for q in params:  # C
                st = self.state[q]
                st["p"] = st["p"] * torch.exp(-h * st["xi"] / 2)
                decay = torch.exp(-alpha * h)
                st["xi"] = st["xi"] * decay + (1 - decay) * st["p"] * st["p"] / (mu * alpha)
                st["p"] = st["p"] * torch.exp(-h * st["xi"] / 2)
            for q in params:  # D
                st = self.state[q]
                st["p"] = st["p"] * torch.exp(-gamma * h)


class PublishedCD(_Published):
    state_names = ("p",)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params, s = self._setup(group)
            h, gamma, c = s["h"], s["gamma"], s["c"]
            for q in params:  # B
                st = self.state[q]
                st["p"] = st["p"] - h * q.grad
            for q in params:  # A
                q.copy_(q + h * self.state[q]["p"])
            for q in params:  # C
                st = self.state[q]
                st["p"] = st["p"] / torch.sqrt(1 + 2 * c * h * st["p"] * st["p"])
            for q in params:  # D
                st = self.state[q]
                st["p"] = st["p"] * torch.exp(-gamma * h)


class PublishedCADAM(_Published):
    state_names = ("p", "zeta")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params, s = self._setup(group)
            h, gamma, c, alpha, eps = s["h"], s["gamma"], s["c"], s["alpha"], s["eps"]
            for q in params:  # B
                st = self.state[q]
                st["p"] = st["p"] - h * q.grad
            for q in params:  # C
                st = self.state[q]
                decay = torch.exp(-alpha * h)
                st["zeta"] = st["zeta"] * decay + (1 - decay) / alpha * q.grad * q.grad
            for q in params:  # A
                st = self.state[q]
                q.copy_(q + h * st["p"] / (torch.sqrt(st["zeta"]) + eps))
            for q in params:  # D, E
                st = self.state[q]
                st["p"] = st["p"] / torch.sqrt(1 + 2 * c * h * st["p"] * st["p"])
                st["p"] = st["p"] * torch.exp(-gamma * h)
