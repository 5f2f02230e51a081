"""Two independent modular additions: the modularity experiment of paper §5 (tutorial 07).

Task (:func:`twotask_data`): every input (a₁, b₁, a₂, b₂) ∈ {0..p−1}⁴, given one-hot as a float
vector [4p] (a₁, b₁, a₂, b₂ in that order); two labels, y_k = (a_k + b_k) mod p. Sub-task k reads only
(a_k, b_k), and over the whole product set the two sub-tasks' inputs are exactly independent.

Model (:class:`TwoTaskMLP`): two towers, one per sub-task, that differ only in which hidden units
are mean-centred together. Tower k maps its 2p inputs to h ReLU units and then to its p logits:

    pre_k = x_k W_in[k] + b_in[k],   post_k = ReLU(pre_k),   logits_k = n_k W_out[k] + b_out[k]

with n the centred hidden units (the mean-subtraction half of LayerNorm):

- ``norm="module"``: each tower's h units are centred on their own, n_k = post_k − mean(post_k). No
  activation of one tower depends on the other tower's inputs or parameters: the network *is*
  (M₁(θ₁, x₁), M₂(θ₂, x₂)), paper §5.2.1's non-interacting modules.
- ``norm="joint"``: all 2h units are centred together, n = post − mean(post₁, post₂), as a
  transformer's LayerNorm centres its whole residual stream. The towers now interact through one
  mediating variable, the mean over all 2h units (paper §5.2.2): a change in tower 1 shifts tower 2's
  centred units. The architecture forces the interaction: no parameter setting removes it.

The division by the standard deviation of a full LayerNorm is left out on purpose: it makes each
tower's input scale a flat direction whose curvature grows like 1/σ² on inputs where few units fire,
and SGLD at one step size could not sample the resulting posterior (tutorial 07).

Both have the same parameter tensors (module axis first: ``W_in [2, 2p, h]``, ``b_in [2, h]``,
``W_out [2, h, p]``, ``b_out [2, p]``), the same count, the same init for a seed, and the same
training recipe, so their effective parameter counts compare directly ("all else equal", §5).
The free directions the exact symmetries give differ by 2p − 1 (tutorial 07 derives them): with
``norm="module"`` each tower's scale (W_in[k], b_in[k], W_out[k]) → (c W_in[k], c b_in[k], W_out[k]/c)
is free, and so is adding one vector u ∈ R^p to every row of W_out[k] (each tower's centred units sum
to zero); with ``norm="joint"`` only the joint scale of both towers is free, and the W_out shift is not.

Hook points (flattened over the towers, tower 0's units first): ``hook_in`` [n, 4p], ``hook_pre``,
``hook_post``, ``hook_normalized`` [n, 2h], ``hook_logits`` [n, 2p]. ``forward`` returns logits
[n, 2, p]: one row of p logits per sub-task, so a ``kl`` behavioral loss is one KL per (input,
sub-task) sample.

Trainer (:func:`train_twotask`): full-batch Adam on the mean cross-entropy of the two sub-tasks over
all p⁴ inputs, in float64, until the loss reaches a target (about 800 steps, seconds on one CPU thread).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from torch.func import functional_call, jacrev
from transformer_lens import HookedRootModule  # TL 4 removed it from hook_points; the top level has it in 3.9 and 4.x
from transformer_lens.hook_points import HookPoint

from . import training

__all__ = ["NORMS", "TwoTaskMLP", "TwoTaskRun", "direction_towers", "evaluate_twotask", "fisher_spectrum", "module_masks",
           "train_twotask", "twotask_data"]

#: Which hidden units are centred together: per tower (non-interacting modules) or all of them.
NORMS = ("module", "joint")

# The recipe tutorial 07 uses; train_twotask's defaults.
P = 5
D_HIDDEN = 16
MAX_STEPS = 5000
TARGET_LOSS = 1e-3
LR = 1e-2


def twotask_data(p: int = P) -> tuple[Float[Tensor, "n four_p"], Int[Tensor, "n 2"]]:
    """All p⁴ inputs (a₁, b₁, a₂, b₂) in lexicographic order, one-hot [p⁴, 4p] (float64), and their
    labels [p⁴, 2] = ((a₁ + b₁) mod p, (a₂ + b₂) mod p)."""
    if not (isinstance(p, int) and p >= 2):
        raise ValueError(f"p={p!r}: the task needs an integer modulus p ≥ 2")
    digits = torch.cartesian_prod(*[torch.arange(p, device="cpu")] * 4)  # [p⁴, 4]: a₁, b₁, a₂, b₂
    x = F.one_hot(digits, p).to(torch.float64).flatten(1)
    y = torch.stack([(digits[:, 0] + digits[:, 1]) % p, (digits[:, 2] + digits[:, 3]) % p], dim=1)
    return x, y


class TwoTaskMLP(HookedRootModule):
    """Two ReLU towers, one per sub-task, whose hidden units are mean-centred per tower
    (``norm="module"``) or jointly (``norm="joint"``) (module docstring).

    Args:
        p: modulus of both sub-tasks (inputs [n, 4p], logits [n, 2, p]).
        d_hidden: ReLU units per tower (h).
        norm: ``"module"`` or ``"joint"``.
        seed: seeds the initialisation (a private generator): the same seed gives the same weights
            for both norms.
    """

    def __init__(self, p: int = P, d_hidden: int = D_HIDDEN, norm: str = "module", seed: int = 0):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
        if not (isinstance(p, int) and p >= 2 and isinstance(d_hidden, int) and d_hidden >= 2):
            raise ValueError(f"need integers p ≥ 2 and d_hidden ≥ 2; got p={p!r}, d_hidden={d_hidden!r}")
        self.p, self.d_hidden, self.norm, self.seed = p, d_hidden, norm, int(seed)
        g = torch.Generator().manual_seed(self.seed)  # built on the CPU (same weights on every device); .to() moves it
        # PyTorch's nn.Linear scale (uniform ±1/√fan_in) for the weights; biases start at zero.
        def uniform(*shape: int, fan_in: int) -> nn.Parameter:
            bound = 1.0 / math.sqrt(fan_in)
            return nn.Parameter((2 * torch.rand(*shape, generator=g, dtype=torch.float64, device="cpu") - 1) * bound)

        self.W_in = uniform(2, 2 * p, d_hidden, fan_in=2 * p)
        self.b_in = nn.Parameter(torch.zeros(2, d_hidden, dtype=torch.float64, device="cpu"))
        self.W_out = uniform(2, d_hidden, p, fan_in=d_hidden)
        self.b_out = nn.Parameter(torch.zeros(2, p, dtype=torch.float64, device="cpu"))
        self.hook_in = HookPoint()
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()
        self.hook_normalized = HookPoint()
        self.hook_logits = HookPoint()
        self.setup()

    def forward(self, x: Float[Tensor, "n four_p"]) -> Float[Tensor, "n 2 p"]:
        """Logits of both sub-tasks: row k of the result is tower k's p logits."""
        if x.ndim != 2 or x.shape[1] != 4 * self.p:
            raise ValueError(f"inputs must be [n, 4p] = [n, {4 * self.p}] one-hot rows; got shape {tuple(x.shape)}")
        n, h = x.shape[0], self.d_hidden
        x = self.hook_in(x).view(n, 2, 2 * self.p)  # tower k reads (a_k, b_k)
        pre = self.hook_pre((torch.einsum("nki,kih->nkh", x, self.W_in) + self.b_in).flatten(1))
        post = self.hook_post(F.relu(pre))
        # The only difference between the two architectures: which units share one mean.
        grouped = post.view(n, 2, h) if self.norm == "module" else post
        normalized = self.hook_normalized((grouped - grouped.mean(-1, keepdim=True)).reshape(n, 2 * h))
        logits = torch.einsum("nkh,khp->nkp", normalized.view(n, 2, h), self.W_out) + self.b_out
        return self.hook_logits(logits.flatten(1)).view(n, 2, self.p)

    def init_kwargs(self) -> dict:
        return dict(p=self.p, d_hidden=self.d_hidden, norm=self.norm, seed=self.seed)


def module_masks(model: TwoTaskMLP, tower: int) -> dict[str, Bool[Tensor, "..."]]:
    """Parameter masks (name → bool mask, what ``behavioral_llc(params=...)`` takes for a plain
    module) of tower ``tower``'s own parameters: index ``tower`` of every tensor's module axis."""
    if tower not in (0, 1):
        raise ValueError(f"tower must be 0 or 1; got {tower!r}")
    masks = {}
    for name, param in model.named_parameters():
        mask = torch.zeros_like(param, dtype=torch.bool)
        mask[tower] = True
        masks[name] = mask
    return masks


@dataclass(frozen=True)
class TwoTaskMetrics:
    """Mean cross-entropy over both sub-tasks and the accuracy of each."""

    loss: float
    acc_1: float
    acc_2: float


def twotask_loss(logits: Float[Tensor, "n 2 p"], labels: Int[Tensor, "n 2"]) -> Tensor:
    """Cross-entropy averaged over inputs and both sub-tasks."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


@torch.no_grad()
def evaluate_twotask(model: TwoTaskMLP, x: Float[Tensor, "n four_p"], labels: Int[Tensor, "n 2"]) -> TwoTaskMetrics:
    """:class:`TwoTaskMetrics` of ``model`` on a labelled set."""
    logits = model(x)
    acc = (logits.argmax(-1) == labels).double().mean(0)
    return TwoTaskMetrics(loss=float(twotask_loss(logits, labels)), acc_1=float(acc[0]), acc_2=float(acc[1]))


@dataclass
class TwoTaskRun:
    """What :func:`train_twotask` returns: the trained model (eval mode), its history, and the step
    at which it stopped (``reached``: whether the loss reached the target by then)."""

    model: TwoTaskMLP
    history: pd.DataFrame
    steps: int
    reached: bool


def train_twotask(
    norm: str,
    seed: int = 0,
    p: int = P,
    d_hidden: int = D_HIDDEN,
    target_loss: float = TARGET_LOSS,
    max_steps: int = MAX_STEPS,
    lr: float = LR,
    eval_every: int = 100,
    *,
    num_threads: int | None = None,
) -> TwoTaskRun:
    """Train :class:`TwoTaskMLP` ``(p, d_hidden, norm, seed)`` on all p⁴ inputs of :func:`twotask_data`
    until its loss is at most ``target_loss`` (or ``max_steps`` steps).

    Full-batch ``torch.optim.Adam(lr)`` on :func:`twotask_loss`. Training stops at the first step
    whose loss (before its update) is ≤ ``target_loss``, so models of both architectures end equally
    well fitted: the behavioral KL of a more confident model is flatter, and a fixed number of steps
    would leave the faster-training architecture more confident, i.e. with a lower LLC for a reason
    that is not modularity. ``history`` has a row at step 0, every ``eval_every`` steps and where
    training stopped: ``step``, ``loss``, ``acc_1``, ``acc_2``, ``wall_s``. There is no test set:
    the experiment compares how two architectures implement the same function on the whole input
    space. Deterministic for a given seed, thread count and torch build (``num_threads`` sets
    torch's intra-op threads for the run only).
    """
    if not (target_loss > 0 and max_steps >= 0 and eval_every >= 1 and lr > 0):
        raise ValueError(f"need target_loss > 0, max_steps ≥ 0, eval_every ≥ 1 and lr > 0; got target_loss={target_loss}, "
                         f"max_steps={max_steps}, eval_every={eval_every}, lr={lr}")
    x, y = twotask_data(p)
    model = TwoTaskMLP(p, d_hidden, norm, seed)
    rows: list[dict] = []
    start = time.perf_counter()

    def record(step: int) -> None:
        m = evaluate_twotask(model, x, y)
        rows.append(dict(step=step, loss=m.loss, acc_1=m.acc_1, acc_2=m.acc_2, wall_s=time.perf_counter() - start))

    step, reached = 0, False
    with training.num_threads(num_threads):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        record(0)
        while True:
            opt.zero_grad(set_to_none=True)
            loss = twotask_loss(model(x), y)
            reached = float(loss.detach()) <= target_loss
            if reached or step == max_steps:
                break
            loss.backward()
            opt.step()
            step += 1
            if step % eval_every == 0:
                record(step)
        if rows[-1]["step"] != step:
            record(step)
    return TwoTaskRun(model=model.eval(), history=pd.DataFrame(rows), steps=step, reached=reached)


def fisher_spectrum(model: TwoTaskMLP, x: Float[Tensor, "n four_p"]) -> Float[np.ndarray, " D"]:
    """Eigenvalues (descending, float64) of the Hessian of the ``kl`` behavioral loss at θ* over all
    parameters: L_B(θ*) = 0 and ∇L_B(θ*) = 0, so the Hessian is the Fisher information
    (1/N) Σ_samples Jᵀ (diag p − p pᵀ) J, J = ∂logits/∂θ of one (input, sub-task) sample (METHODS §1).

    Its rank is the quadratic (Laplace) effective parameter count at ε → 0; with the prior γ of the
    SGLD posterior, the quadratic λ at nβ is ½ Σ_i nβ h_i / (nβ h_i + γ). Exact: one Jacobian of all
    p⁴ · 2p logits, affordable for this model's few hundred parameters only.
    """
    star = {name: param.detach() for name, param in model.named_parameters()}
    names = list(star)
    shapes = [star[n].shape for n in names]
    sizes = [star[n].numel() for n in names]

    def logits(flat: Tensor) -> Tensor:
        parts = torch.split(flat, sizes)
        return functional_call(model, {n: t.view(s) for n, t, s in zip(names, parts, shapes)}, (x,))

    flat = torch.cat([star[n].flatten() for n in names]).to(torch.float64)
    jac = jacrev(logits)(flat).flatten(0, 1)  # [samples, p, D]
    prob = logits(flat).detach().softmax(-1).flatten(0, 1)  # [samples, p]
    mean_jac = torch.einsum("sk,skd->sd", prob, jac)  # pᵀJ per sample
    fisher = (torch.einsum("sk,skd,ske->de", prob, jac, jac) - mean_jac.T @ mean_jac) / jac.shape[0]
    return torch.linalg.eigvalsh(fisher).flip(0).numpy()


def direction_towers(ib) -> pd.DataFrame:
    """Which tower each interaction-basis direction reads: one row per (node, direction) of ``ib``
    (an :class:`~tl_degeneracy.interaction.InteractionBasis` of a :class:`TwoTaskMLP`) with
    ``share_tower_0`` = ‖C_i restricted to tower 0's coordinates‖² / ‖C_i‖² (every hook is laid out
    tower 0 first, in two equal halves) and ``tower`` = 0, 1, or "both" where neither tower holds
    more than 99 % of the direction's weight."""
    rows = []
    for node in ib.nodes:
        C = ib.basis[node].detach().double().cpu()
        half = C.shape[1] // 2
        share = (C[:, :half].square().sum(1) / C.square().sum(1)).numpy()
        for d, s in enumerate(share):
            rows.append({"node": node, "direction": d, "share_tower_0": float(s),
                         "tower": 0 if s > 0.99 else 1 if s < 0.01 else "both"})
    return pd.DataFrame(rows)
