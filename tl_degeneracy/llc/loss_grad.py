"""One SGLD step's model work: the chain-batched behavioral loss and its gradient in δ.

``LossGrad(target, layout)(δ, b)`` returns L_B,b(θ* + δ_c) for every chain c and ∇_δ Σ_c L_B,b
(each chain's rows of that gradient are its own loss's gradient, the chains being independent):
one chain-batched forward pass and one backward pass (METHODS §1, SGLD).

With ``compile=True`` the loss is traced by ``torch.compile`` (TorchInductor) once per batch shape,
as a function of the batch's tensors (``SamplingTarget.batch_tensors``), and its backward pass is compiled
with it. Inductor fuses the model's elementwise work (normalisations, activations, softmax, the KL)
into a few kernels, which is where an uncompiled chain-batched step on a small model spends half its
time. The first call of each shape pays the compilation (tens of seconds on a CPU the first time;
Inductor's on-disk cache makes later processes much faster), so it pays off on long runs. The
compiled loss equals the uncompiled one up to float rounding (fused kernels sum in another order),
so a compiled run's chains differ from an uncompiled run's with the same seed, but each is
reproducible in its own mode. Where compilation fails (no C++ compiler, a model dynamo cannot
trace, more than ``RECOMPILE_LIMIT`` compilations in one process), the step warns once and runs
uncompiled.
"""

from __future__ import annotations

import time
import warnings

import torch
from jaxtyping import Float
from torch import Tensor

from ..models.chains import OUT_OF_MEMORY
from .layout import ParameterLayout
from .targets import SamplingTarget


#: Compilations of the loss one process may hold (models × selections × batch shapes; dynamo's default is 8).
RECOMPILE_LIMIT = 64


def _recompile_limit() -> dict:
    """Dynamo settings for a raised, enforced recompile limit, under the names this torch has (older
    versions call the limit ``cache_size_limit``, and some cannot make reaching it an error)."""
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    fail = {"fail_on_recompile_limit_hit": True} if hasattr(config, "fail_on_recompile_limit_hit") else {}
    return {limit: RECOMPILE_LIMIT, **fail}


class LossGrad:
    """L_B,b(θ* + δ) per chain and its gradient in δ, uncompiled or compiled (module docstring)."""

    def __init__(self, target: SamplingTarget, layout: ParameterLayout, compile: bool = False):
        self.target, self.layout = target, layout
        self.compiled = bool(compile)
        #: Seconds of the calls that compiled (one per batch shape), each including that step's own work.
        self.compile_s = 0.0
        #: Why compilation was abandoned ("" while it works or was not asked for).
        self.compile_error = ""
        self._shapes: set[tuple] = set()
        self._compiled_loss = None
        if compile and target.compile_obstacle:
            self._give_up(target.compile_obstacle)
        elif compile:
            import torch._dynamo  # noqa: F401  (its config is patched around compiling calls)

            # The loss divides by the data's mean count of positions per batch (targets.py), which is
            # computed (forwards over every batch) and cached here, so the trace reads a constant.
            target.mean_positions  # noqa: B018

            with warnings.catch_warnings():
                # torch.compile's first call imports Inductor, which imports torch.utils.mkldnn, which
                # warns about torch's own use of torch.jit: nothing the caller can act on.
                warnings.filterwarnings("ignore", message="`torch.jit.script_method` is deprecated",
                                        category=DeprecationWarning)
                self._compiled_loss = torch.compile(self._traced_loss, dynamic=False)

    def _give_up(self, why: str) -> None:
        self.compiled = False
        self.compile_error = why
        warnings.warn(
            f"compile=True: the behavioral loss is not compiled ({why[:300]}); sampling runs uncompiled "
            f"(the same estimate, slower)", RuntimeWarning, stacklevel=4,
        )

    def _traced_loss(self, flat: Float[Tensor, "chain D"], inputs: Tensor, reference: Tensor, mask: Tensor | None) -> Tensor:
        return self.target.loss_on(self.layout.unflatten(flat), inputs, reference, mask)

    @staticmethod
    def _value_and_grad(loss_fn, delta: Tensor, tensors: tuple) -> tuple[Tensor, Tensor]:
        d = delta.detach().requires_grad_(True)
        loss = loss_fn(d, *tensors)
        (grad,) = torch.autograd.grad(loss.sum(), d)
        return loss.detach(), grad

    def _eager_loss(self, flat: Float[Tensor, "chain D"], b: int) -> Tensor:
        return self.target.loss(self.layout.unflatten(flat), b)

    def __call__(self, delta: Float[Tensor, "chain D"], b: int) -> tuple[Float[Tensor, " chain"], Float[Tensor, "chain D"]]:
        if not self.compiled:
            # Uncompiled, a target needs only ``loss(deltas, b)`` (the sampler's whole protocol).
            return self._value_and_grad(self._eager_loss, delta, (b,))
        tensors = self.target.batch_tensors(b)
        shape = (tuple(delta.shape), *(None if t is None else tuple(t.shape) for t in tensors))
        if shape in self._shapes:
            return self._value_and_grad(self._compiled_loss, delta, tensors)
        t0 = time.perf_counter()
        try:
            # Dynamo keeps one cache for this method across all calls in the process (every model,
            # selection and batch shape); past its limit it would run the loss uncompiled without a
            # word, so the limit is raised and reaching it is an error (handled below).
            with torch._dynamo.config.patch(_recompile_limit()):
                out = self._value_and_grad(self._compiled_loss, delta, tensors)
        except OUT_OF_MEMORY:
            raise
        except Exception as err:  # noqa: BLE001 - any compiler failure; a real error is re-raised below
            # An error of the model or the data itself is raised by the uncompiled call too, as itself.
            out = self._value_and_grad(self._eager_loss, delta, (b,))
            if isinstance(err, torch._dynamo.exc.FailOnRecompileLimitHit):
                self._give_up(f"this process has compiled the loss for {RECOMPILE_LIMIT} models, selections or batch "
                              f"shapes already, torch._dynamo's recompile limit; run further ones in a new process")
            else:
                first_line = (str(err).strip().splitlines() or [""])[0]
                self._give_up(f"torch.compile failed: {type(err).__name__}: {first_line}; on a CPU, TorchInductor "
                              f"needs a C++ compiler (g++) on the PATH")
            return out
        self.compile_s += time.perf_counter() - t0
        self._shapes.add(shape)
        return out
