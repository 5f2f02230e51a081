"""Small HookedRootModules for the interaction-basis tests: an MLP with a hook at its input, after
every hidden layer and at its output, and an invertible mix R that can be inserted at a hidden node."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint


class HookedMLP(HookedRootModule):
    """x → act(W_1 x + b_1) → … → W_L h + b_L (float64); hooks ``hook_in``, ``hook_h0`` …, ``hook_out``.

    ``mixes[i] = R`` makes hidden node i carry R·act(…) instead of act(…) (set the next weight to
    W R⁻¹ with :meth:`insert_mix` to keep the function)."""

    def __init__(self, widths: list[int], act=torch.tanh, seed: int = 0, bias: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.act = act
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(b, a, generator=g, dtype=torch.float64) / a**0.5) for a, b in zip(widths[:-1], widths[1:])]
        )
        self.biases = nn.ParameterList(
            [nn.Parameter((0.3 if bias else 0.0) * torch.randn(b, generator=g, dtype=torch.float64)) for b in widths[1:]]
        )
        self.mixes: dict[int, Tensor] = {}
        self.hook_in = HookPoint()
        for i in range(len(widths) - 2):
            setattr(self, f"hook_h{i}", HookPoint())
        self.hook_out = HookPoint()
        self.setup()

    def forward(self, x: Tensor) -> Tensor:
        h = self.hook_in(x)
        last = len(self.weights) - 1
        for i, (W, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ W.mT + b
            if i < last:
                h = self.act(h)
                if i in self.mixes:
                    h = h @ self.mixes[i].mT
                h = getattr(self, f"hook_h{i}")(h)
        return self.hook_out(h)

    def insert_mix(self, node: int, R: Tensor) -> None:
        """f → R f at hidden node ``node`` and W_{node+1} → W_{node+1} R⁻¹: the same function."""
        self.mixes[node] = R
        with torch.no_grad():
            self.weights[node + 1].copy_(self.weights[node + 1] @ torch.linalg.inv(R))


def mlp_inputs(n: int, d_in: int, seed: int = 1) -> Tensor:
    """Inputs with unequal variances (so that no Gram eigenvalues are repeated)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.5, 2.0, d_in, dtype=torch.float64)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64) * scales


def random_invertible(d: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.exp(0.5 * torch.randn(d, generator=g, dtype=torch.float64))) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)


def node_acts(model, inputs, names: list[str]) -> dict[str, Tensor]:
    """Activations of ``names`` on ``inputs`` (run_with_cache), flattened per sample."""
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n in names)
    return {n: cache[n] for n in names}


class HookedResidual(HookedRootModule):
    """x (6) → h = tanh(W x) (2) → y = x + U h (6) → V y (4), float64; hooks ``hook_in``, ``hook_h``,
    ``hook_y``. ``hook_h`` is not a cut: the outputs read x around it, through the skip connection."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(2, 6, generator=g, dtype=torch.float64))
        self.U = nn.Parameter(torch.randn(6, 2, generator=g, dtype=torch.float64))
        self.V = nn.Parameter(torch.randn(4, 6, generator=g, dtype=torch.float64))
        self.hook_in, self.hook_h, self.hook_y = HookPoint(), HookPoint(), HookPoint()
        self.setup()

    def forward(self, x: Tensor) -> Tensor:
        x = self.hook_in(x)
        h = self.hook_h(torch.tanh(x @ self.W.mT))
        return self.hook_y(x + h @ self.U.mT) @ self.V.mT
