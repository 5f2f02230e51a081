"""Vector-Jacobian products of one forward pass: probe cotangents, seeded generators, batched or
looped backward calls, and the hook that makes an activation differentiable (METHODS §4, "Estimating
Jacobian Gram matrices without V backward passes").

Shared by :func:`~tl_degeneracy.stats.jacobian_stats` and the interaction basis (METHODS §5), whose
Jacobian Grams and edges are built from the same VJPs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


__all__ = ["Backward", "cotangents", "differentiable_capture", "probe_generator"]


def probe_generator(seed: int, unit: int, probe: int, device: torch.device,
                    stream: tuple[int, ...] = ()) -> torch.Generator:
    """Generator of probe ``probe`` of ``unit`` (a sequence's number in the data, for Jacobian
    probes and edge sources alike, so that neither depends on how the data are batched; METHODS
    §5); ``stream`` separates independent uses (e.g. edge sources from Jacobian probes) without
    changing the default streams."""
    # SeedSequence mixes the integers into well-separated streams (no seed + index collisions).
    keys = [int(seed), int(unit), int(probe), *(int(s) for s in stream)]
    state = np.random.SeedSequence(keys).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


class Backward:
    """Vector-Jacobian products of one forward pass for a chunk of cotangents, batched or looped.

    ``method``: ``"batched"`` (one vmapped ``autograd.grad`` call, ``is_grads_batched=True``),
    ``"loop"`` (one call per cotangent, graph retained) or ``"auto"`` (batched until an operation
    without a vmap rule is met, then the loop from there on).
    """

    def __init__(self, method: str):
        self.method = method
        self.batched_works: bool | None = None if method == "auto" else method == "batched"

    def __call__(self, out: Tensor, inputs: list[Tensor], cot: Tensor) -> list[Tensor | None]:
        if self.batched_works is not False:
            try:
                grads = torch.autograd.grad(out, inputs, grad_outputs=cot, retain_graph=True,
                                            is_grads_batched=True, allow_unused=True)
                self.batched_works = True
                return list(grads)
            except RuntimeError:
                if self.method == "batched" or self.batched_works:
                    raise
                self.batched_works = False  # e.g. an op without a vmap rule: loop from now on
        per_probe = [torch.autograd.grad(out, inputs, grad_outputs=c, retain_graph=True, allow_unused=True) for c in cot]
        return [None if per_probe[0][i] is None else torch.stack([g[i] for g in per_probe]) for i in range(len(inputs))]


def cotangents(
    objective: str,
    out: Float[Tensor, "batch pos out"],
    out_mask: Bool[Tensor, "batch pos"],
    n_probes: int,
    exact: bool,
    seed: int,
    sequences: Int[Tensor, " batch"],
    chunk: int,
) -> Iterator[tuple[Float[Tensor, "chunk batch pos out"], float]]:
    """Chunks of cotangents [J, batch, pos, out_dim] on the output, each with its weight.

    ``mse``: Gaussian probes u ~ N(0, I) (weight 1/k), or one-hot e_v per output entry (exact).
    ``kl``: e_y − p with y ~ softmax(out) at every output position (weight 1/k), or the columns
    √p_v (e_v − p) of a square root of the softmax Fisher (exact). Zero at outputs that do not count.

    Probe j of a sequence is drawn from a generator keyed by (seed, the sequence's number in the
    data ``sequences[i]``, j), at its counted output positions only: each sequence gets the same
    probes whichever batch (or process) it falls in, so cutting the data into batches differently
    changes a probe estimate only by rounding (METHODS §5).
    """
    b, P, V = out.shape
    m = out_mask.to(out.dtype)[:, :, None]
    if objective == "kl":
        p = torch.softmax(out.detach().to(torch.float64), dim=-1)
    if exact:
        # Output entries (t, v), t-major: one cotangent each, built a chunk at a time by indexing.
        positions = out_mask.any(0).nonzero().flatten()
        ts, vs = positions.repeat_interleave(V), torch.arange(V, device=out.device).repeat(len(positions))
        for start in range(0, len(ts), chunk):
            t, v = ts[start : start + chunk], vs[start : start + chunk]
            j = torch.arange(len(t), device=out.device)
            # Built in the output's dtype, zero but at (j, ·, t_j): the mask (0 or 1) multiplies only there.
            cot = torch.zeros(len(t), b, P, V, dtype=out.dtype, device=out.device)
            m_t = m[:, t, 0].transpose(0, 1)  # [J, batch]
            if objective == "mse":
                cot[j, :, t, v] = m_t
            else:  # s_v = √p_v (e_v − p): Σ_v s_v s_vᵀ = diag(p) − p pᵀ
                p_t = p[:, t, :].transpose(0, 1)  # [J, batch, V]
                root = p_t.gather(2, v[:, None, None].expand(-1, b, 1)).sqrt()  # √p_v [J, batch, 1]
                s = (-p_t * root).scatter_add_(2, v[:, None, None].expand(-1, b, 1), root)
                cot[j, :, t, :] = s.to(out.dtype) * m_t[:, :, None]
            yield cot, 1.0
        return
    counted = [row.nonzero().flatten() for row in out_mask]
    ids = sequences.tolist()
    for start in range(0, n_probes, chunk):
        probes = range(start, min(start + chunk, n_probes))
        if objective == "mse":
            # Drawn in float64 whatever the model's dtype (as kl's uniforms), so that a float32 and a
            # float64 copy of one model get the same probes up to their rounding (audit 11a F6).
            cot = torch.zeros(len(probes), b, P, V, dtype=torch.float64, device=out.device)
        else:
            cot = -p.expand(len(probes), b, P, V).clone()
        for i, (pos, seq) in enumerate(zip(counted, ids)):
            if not len(pos):
                continue
            for j, probe in enumerate(probes):
                g = probe_generator(seed, seq, probe, out.device)
                if objective == "mse":
                    cot[j, i, pos] = torch.randn(len(pos), V, generator=g, device=out.device, dtype=torch.float64)
                else:
                    # y ~ p by inverse CDF (one uniform per output position): far cheaper than multinomial.
                    cdf = p[i, pos].cumsum(-1)  # [n_i, V]
                    u = torch.rand(len(pos), 1, generator=g, device=out.device, dtype=torch.float64) * cdf[:, -1:]
                    y = torch.searchsorted(cdf, u, right=True).clamp_(max=V - 1)  # [n_i, 1]
                    cot[j, i, pos] = cot[j, i, pos].scatter_add(1, y, torch.ones_like(y, dtype=cot.dtype))
        yield cot.mul_(m).to(out.dtype), 1.0 / n_probes


def differentiable_capture(store: dict[str, Tensor], name: str):
    """A forward hook that stores the activation under ``name`` as a tensor gradients can be taken
    at, and hands that same tensor on to the rest of the forward pass."""

    def hook(act: Tensor, hook=None) -> Tensor:
        if name in store:
            raise RuntimeError(f"hook {name!r} fired twice in one forward pass")
        # Return a fresh tensor and differentiate with respect to it: the TransformerBridge hands
        # some hooks (e.g. hook_v) a reshaped view that the forward only continues from when the
        # hook returns a replacement, so the untouched view gets no gradient.
        if act.requires_grad:
            act = act.view_as(act)
        else:
            # Frozen parameters upstream: make the activation a leaf so the gradient reaches it.
            act = act.detach().requires_grad_(True)
        store[name] = act
        return act

    return hook
