"""``behavioral_llc``: the behavioral local learning coefficient of a model (METHODS §1)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import NumericalError
from ..models.adapter import forward_scope
from ..stats.distributed import broadcast_float, distributed_context, max_over_ranks
from .loss_grad import LossGrad
from .result import LLCResult, estimate
from .sampler import (
    NORMS,
    FlatLayout,
    SamplerSettings,
    chain_seed,
    initial_state,
    load_checkpoint,
    run_chains,
    save_checkpoint,
)
from .stepsize import StepSizeChoice, bias_bound_of, choose_step_size, step_size_for, top_hessian_eigenvalue
from .targets import DEFAULT_CACHE_BYTES, AdapterTarget, ModuleTarget, Target

#: Default nβ: the tempered posterior probes loss scale ε = 1/nβ = 10⁻³ (nats per sample for kl).
DEFAULT_NBETA = 1000.0
SAMPLERS = ("sgld", "rmsprop")
#: Fractions of the burn-in after which the automatic η is re-adapted to the chains' curvature. The
#: last one leaves a quarter of the burn-in to run under the final η, so the chains re-equilibrate
#: to it before any draw counts (an adaptation at the very end of burn-in would let the first draws
#: carry the transient of the η change). At the bias bound b the stiffest direction contracts by
#: 1 − 2b per step (10 steps' relaxation time at b = 0.05), so the default burn-in's last 125 steps
#: are ≈ 12 relaxation times.
ADAPT_AT = (0.25, 0.5, 0.75)


def _is_adaptable(model) -> bool:
    """TransformerLens models, adapters and bundled toys go through the adapter; the rest are plain modules.

    Decided by type, without importing transformer_lens for plain modules (that import takes seconds).
    """
    from ..models.adapter import ModelAdapter
    from ..models.toys.base import ToyModel

    if isinstance(model, (ModelAdapter, ToyModel)):
        return True
    return type(model).__module__.startswith("transformer_lens")


def make_target(model, data, loss: str | None, batch_size: int | None, cache_bytes: int = DEFAULT_CACHE_BYTES) -> Target:
    """The sampling target for ``model`` on ``data`` (see targets.py)."""
    if _is_adaptable(model):
        from ..models.adapt import adapt

        return AdapterTarget(adapt(model), data, loss or "kl", batch_size, cache_bytes)
    if isinstance(model, nn.Module):
        return ModuleTarget(model, data, loss or "mse", batch_size, cache_bytes)
    raise TypeError(f"behavioral_llc needs a TransformerLens model, a bundled toy, an adapter or an nn.Module; got {type(model).__name__}")


def resolve_selection(model, target: Target, params) -> tuple[tuple[str, ...] | None, dict[str, Tensor]]:
    """Masks (bool, parameter-shaped) of the sampled entries; all parameters for ``params=None``.

    Adapters take every ``select_parameters`` spelling; plain modules take parameter names (or a list
    of them), or a mapping name → bool mask. A ``ParameterSelection`` is accepted for both.
    """
    from ..models.selection import ParameterSelection, select_parameters

    star = target.star
    if params is None:
        return None, {n: torch.ones_like(t, dtype=torch.bool) for n, t in star.items()}
    if isinstance(params, ParameterSelection):
        return params.spec, {n: m.to(target.device) for n, m in params.masks.items()}
    if isinstance(target, AdapterTarget):
        sel = select_parameters(target.adapter, params)
        return sel.spec, {n: m.to(target.device) for n, m in sel.masks.items()}
    if isinstance(params, Mapping):
        masks = {}
        for n, m in params.items():
            if n not in star:
                raise ValueError(f"no trainable parameter named {n!r}; parameters: {list(star)}")
            m = torch.as_tensor(m, dtype=torch.bool, device=target.device)
            if m.shape != star[n].shape:
                raise ValueError(f"mask for {n!r} has shape {tuple(m.shape)}; the parameter has {tuple(star[n].shape)}")
            masks[n] = m
        return tuple(params), masks
    names = (params,) if isinstance(params, str) else tuple(params)
    unknown = [n for n in names if n not in star]
    if unknown:
        raise ValueError(f"unknown parameter name(s) {unknown}; a plain module's selections are parameter names: {list(star)}")
    return names, {n: torch.ones_like(star[n], dtype=torch.bool) for n in names}


def resolve_nbeta(nbeta: float | None, loss_scale: float | None) -> float:
    """nβ = 1/loss_scale; default :data:`DEFAULT_NBETA`."""
    if nbeta is not None and loss_scale is not None and not np.isclose(nbeta * loss_scale, 1.0):
        raise ValueError(f"nbeta = {nbeta} and loss_scale = {loss_scale} disagree (nbeta must be 1/loss_scale); pass one of them")
    if loss_scale is not None:
        if not (math.isfinite(loss_scale) and loss_scale > 0):
            raise ValueError(f"loss_scale must be finite and > 0; got {loss_scale}")
        return 1.0 / float(loss_scale)
    value = DEFAULT_NBETA if nbeta is None else float(nbeta)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"nbeta must be finite and > 0; got {value}")
    return value


def _positive_finite(name: str, value) -> None:
    if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


def _check_arguments(*, sampler, chains, draws, burnin, gamma, step_size, bias_bound, rms_alpha, rms_eps,
                     checkpoint_every, pilot_steps) -> None:
    """Refuse arguments the sampler cannot run with, before any work (each with its own message)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}; got {sampler!r}")
    for name, value, low in (("chains", chains, 1), ("draws", draws, 1), ("burnin", burnin, 0),
                             ("checkpoint_every", checkpoint_every, 1), ("pilot_steps", pilot_steps, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer ≥ {low}; got {value!r}")
    if not (isinstance(gamma, (int, float, np.floating, np.integer)) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number ≥ 0; got {gamma!r}")
    if step_size is not None:
        _positive_finite("step_size", step_size)
    _positive_finite("bias_bound", bias_bound)
    if not bias_bound < 1:
        # η(nβ h + γ)/4 ≥ 1 is past the stability limit of the stiffest direction (λ̂ ∝ 1/(1 − b)).
        raise ValueError(f"bias_bound must be < 1 (the predicted bias factor is 1/(1 − bias_bound)); got {bias_bound!r}")
    if not (isinstance(rms_alpha, (int, float, np.floating)) and 0 <= rms_alpha < 1):
        raise ValueError(f"rms_alpha must satisfy 0 ≤ rms_alpha < 1; got {rms_alpha!r}")
    _positive_finite("rms_eps", rms_eps)


def _check_finite_at_reference(target: Target, layout: FlatLayout) -> None:
    """L_B(θ*) must be finite (it is 0 for finite reference outputs) on every batch.

    Non-finite reference outputs (NaN/inf logits, all −inf rows) would make every chain "diverge"
    at its first step and the advice would wrongly point at the step size.
    """
    dtype = target.dtype
    zero = layout.unflatten(torch.zeros(1, layout.numel, device=target.device, dtype=dtype))
    with torch.no_grad():
        for b in range(target.n_batches):
            value = float(target.loss(zero, b)[0])
            if not math.isfinite(value):
                raise NumericalError(
                    f"the behavioral loss at the model's own parameters (θ*, δ = 0) is {value} on batch {b}: the "
                    f"model's reference outputs are not finite there (NaN/inf outputs, or logits that are −inf "
                    f"everywhere in a row). Fix the model or the data; changing the step size cannot help"
                )


def _round_down(x: float, digits: int = 3) -> float:
    """``x`` > 0 rounded *down* to ``digits`` significant figures (a readable η that never exceeds
    the one the bias bound allows)."""
    exponent = math.floor(math.log10(x)) - digits + 1
    # Written back through its decimal form, so that 8e-05 is not 7.999999999999999e-05.
    return float(f"{math.floor(x / 10.0**exponent)}e{exponent}")


def _agree_on_resume(path: str, world: int) -> dict | None:
    """Whether this run resumes from its checkpoints, decided by all ranks together.

    Returns this rank's checkpoint ``extra`` (step-size choice, adaptations) to resume from, or None
    to start afresh. Under torchrun every rank reads its own file and the ranks exchange what they
    found, so that all take the same decision: a rank that resumes skips the step-size calibration
    and burn-in adaptations that a fresh rank runs, and their collectives would wait for each other
    forever. Checkpoints on some ranks only, or written by different runs (settings) or at different
    points of the burn-in adaptation, are refused on every rank with the same message.
    """
    mine = None
    if os.path.exists(path):
        payload = torch.load(path, map_location="cpu", weights_only=False)
        extra = payload["extra"]
        settings = {k: v for k, v in payload["settings"].items() if k != "my_chains"}
        mine = {"extra": extra, "settings": settings, "step": int(payload["step"]),
                "adapted": (extra.get("step_size"), [a["step"] for a in extra.get("adaptations", [])])}
    if world == 1:
        return None if mine is None else mine["extra"]
    found = [None] * world
    torch.distributed.all_gather_object(found, mine)
    have = [r for r, f in enumerate(found) if f is not None]
    where = os.path.dirname(path)
    if not have:
        return None
    if len(have) < world:
        raise ValueError(
            f"checkpoint_dir {where} holds checkpoints for ranks {have} only, of {world}: the ranks cannot resume "
            f"together (a rank would start afresh while the others resume). Delete the directory's llc-rank*.pt "
            f"files to start afresh, or restore the missing ones"
        )
    first = found[have[0]]
    if any(f["settings"] != first["settings"] for f in found):
        raise ValueError(f"checkpoint_dir {where}: the ranks' checkpoints were written by different runs (settings differ); "
                         f"delete its llc-rank*.pt files to start afresh")
    if any(f["adapted"] != first["adapted"] for f in found):
        steps = {r: f["step"] for r, f in enumerate(found)}
        raise ValueError(
            f"checkpoint_dir {where}: the ranks' checkpoints stopped at different points of the burn-in step-size "
            f"adaptation (steps per rank {steps}), so they cannot resume together; delete its llc-rank*.pt files "
            f"to start afresh"
        )
    return mine["extra"]


def behavioral_llc(
    model,
    data,
    loss: str | None = None,
    nbeta: float | None = None,
    loss_scale: float | None = None,
    step_size: float | None = None,
    gamma: float = 1.0,
    chains: int = 8,
    draws: int = 2000,
    burnin: int = 500,
    batch_size: int | None = None,
    params=None,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    sampler: str = "sgld",
    bias_bound: float = 0.05,
    rms_alpha: float = 0.99,
    rms_eps: float = 0.1,
    checkpoint_every: int = 512,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    pilot_steps: int = 200,
    compile: bool = False,
    _stop_after: int | None = None,
) -> LLCResult:
    """Behavioral LLC λ̂_B = nβ · E[L_B(θ)] under the tempered, localized posterior (METHODS §1)

        p(θ) ∝ exp(−nβ L_B(θ) − γ/2 ‖θ − θ*‖²),

    sampled by SGLD with all chains in one batched computation; θ* = the model's parameters, which
    are never modified. L_B(θ*) = 0 exactly, so no baseline is estimated.

    Args:
        model: a TransformerLens model, a bundled toy (``load_model("toy:…")``), an adapter, or any
            ``nn.Module`` mapping an input tensor to an output tensor.
        data: token data (anything ``token_batches`` takes) for TransformerLens models and toys; a
            tensor of inputs (samples on the first axis) for a plain module.
        loss: ``"kl"`` (default for TransformerLens models and toys: outputs are logits) or
            ``"mse"`` (default for plain modules: ½‖f_θ − f_θ*‖², the KL of unit Gaussians).
        nbeta, loss_scale: nβ = 1/loss_scale (give at most one). Default nβ = 1000: the estimate
            is λ_B at loss scale 10⁻³ (nats per sample for kl), where E[L_B] = λ/nβ.
        step_size: η; default automatic: η (nβ h_max + γ)/4 = ``bias_bound`` with h_max the top
            Hessian eigenvalue of L_B at θ* and along pilot runs (stepsize.py), so that the
            step-size bias λ̂ ≈ λ/(1 − η nβ h/4) stays below ≈ ``bias_bound``; η is lowered (never
            raised) after a quarter, half and three quarters of the burn-in if the chains reached
            stiffer regions (:data:`ADAPT_AT`), so the last quarter of the burn-in runs under the
            final η.
            ``diagnostics["h_max"]``/``["bias_bound"]`` use the largest curvature measured before
            sampling (pilots and burn-in checks; the pilots' alone is ``["h_max_pilot"]``). The
            bound where the chains end is reported (``diagnostics["bias_bound_end"]``) and a warning
            is issued when it exceeds twice ``bias_bound``.
        gamma: localization γ (prior centred at θ*); it also keeps flat directions bounded.
        chains, draws, burnin: chains run together; each runs burnin + draws steps; the estimate
            averages the draws. Under torchrun, chains must be at least the number of ranks.
        batch_size: samples (sequences, for token data) per minibatch; default all (full batch).
            Minibatches are visited in a fixed cycle, the same batch for all chains at each step.
            L_B is a mean over every counted position of the whole data (METHODS §1), so each
            step's minibatch loss L_B,b (whose gradient drives the step and whose value enters the
            estimate and the trace) is batch b's sum over its n_b counted positions divided by the
            mean count per batch N/n_batches, not by n_b (targets.py): over a cycle these losses
            and their gradients average to the dataset's L_B and ∇L_B however ragged the batches
            (sequences of different lengths, a short last batch); with equal counts L_B,b is the
            batch mean. λ̂ = nβ · the mean of L_B,b over the draws is therefore the position-weighted
            estimate (exactly so for draws spanning whole cycles). ``diagnostics["n_samples"]``
            is N, the counted positions of the data; ``["mean_positions_per_batch"]`` is N/n_batches.
        params: restrict sampling to a selection (``select_parameters`` spellings for TL models and
            toys, e.g. ``"blocks.0.attn.head1"``; parameter names or name → mask for plain modules).
            The mask multiplies gradient, prior and noise.
        seed: chain c uses the generator seeded by ``chain_seed(seed, c)``.
        checkpoint_dir: write the sampler state there every ``checkpoint_every`` steps (atomically)
            and resume from it when it exists; a checkpoint from other settings is refused, and so
            is one from another model or other data (θ*, data, dtype and device type are hashed
            into the checkpoint's settings). One directory holds one run. Under torchrun each rank
            writes its own file and the ranks resume only together: checkpoints on some ranks
            only, or inconsistent ones, are refused on every rank.
        sampler: ``"sgld"`` or ``"rmsprop"`` (RMSProp-preconditioned SGLD; the automatic η is
            multiplied by ``rms_eps`` so that the largest preconditioned step keeps the bias bound).
        bias_bound: target of η (nβ h_max + γ)/4 for the automatic step size.
        pilot_steps: length of each pilot run of the automatic step size (stepsize.py).
        cache_bytes: memory budget for cached reference outputs (beyond it they are recomputed).
        compile: compile the sampling steps' loss and gradient with ``torch.compile`` (loss_grad.py):
            about 2× faster per chain-step on small transformers on a CPU (BENCHMARKS.md), after a
            one-off compilation (``diagnostics["compile_s"]``: tens of seconds on a CPU the first
            time, a few once Inductor's cache holds it), so for long runs. Same estimate up to
            rounding (the chains' paths differ in the last bits from an uncompiled run's). Step-size
            calibration (Hessian-vector products) stays uncompiled. Falls back to uncompiled, with
            a warning, where compilation fails.

    Under ``torchrun`` (an initialised ``torch.distributed`` process group) the chains are split
    round-robin across ranks and gathered; every rank returns the full result.

    Raises:
        ValueError: an argument out of range (chains/draws ≥ 1, burnin ≥ 0, step_size, bias_bound
            (< 1), rms_eps, nbeta/loss_scale finite and > 0, 0 ≤ rms_alpha < 1, gamma ≥ 0), more
            ranks than chains, a checkpoint from other settings, another model or other data, or
            (torchrun) checkpoints missing on some ranks or inconsistent between ranks.
        NumericalError: L_B at θ* is not finite (non-finite reference outputs), or every chain
            diverged (the message says what to change).
    """
    _check_arguments(sampler=sampler, chains=chains, draws=draws, burnin=burnin, gamma=gamma, step_size=step_size,
                     bias_bound=bias_bound, rms_alpha=rms_alpha, rms_eps=rms_eps, checkpoint_every=checkpoint_every,
                     pilot_steps=pilot_steps)
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False; got {compile!r}")
    nb = resolve_nbeta(nbeta, loss_scale)
    ctx = distributed_context()
    rank, world = ctx.rank, ctx.world_size
    if world > chains:
        raise ValueError(
            f"{world} ranks but only {chains} chains: chains are split across ranks and a rank without a chain "
            f"has nothing to sample; pass chains ≥ {world} or run with fewer processes"
        )
    target = make_target(model, data, loss, batch_size, cache_bytes)
    # One forward scope for the whole run: every forward inside it (checks, curvature, pilots, each
    # SGLD step) is then free of the per-forward bookkeeping, and the model is given back as found
    # (modes, no cached attention patterns holding the chains' graphs) when the run ends or fails.
    with forward_scope(target.module):
        spec, masks = resolve_selection(model, target, params)
        layout = FlatLayout(tuple(masks), tuple(tuple(target.star[n].shape) for n in masks))
        mask = layout.flatten(masks)
        n_params = int(mask.sum())
        if n_params == 0:
            raise ValueError("the parameter selection is empty")
        # No posterior at nβ reaches nβ L_B far above d/2 (λ ≤ d/2); 20× that plus slack is a divergence.
        explode_at = 10.0 * n_params + 100.0
        _check_finite_at_reference(target, layout)
        my_chains = list(range(rank, chains, world))
        settings_key = {
            # The fingerprint (θ*, data, dtype, device type) ties a checkpoint to this model on this data:
            # class and sizes alone would let another model of the same shape resume this one's chains.
            # Hashing reads every parameter on the CPU, so it is done only when checkpointing.
            "target": target.description, "fingerprint": target.fingerprint() if checkpoint_dir is not None else None,
            "loss": target.loss_name, "nbeta": nb, "gamma": float(gamma), "chains": chains,
            "draws": draws, "burnin": burnin, "seed": seed, "sampler": sampler, "bias_bound": bias_bound,
            "selection": spec, "n_params": n_params, "step_size_given": step_size, "my_chains": my_chains,
            "rms": (rms_alpha, rms_eps) if sampler == "rmsprop" else None,
        }
        ckpt_path = None
        saved_choice = None
        resume = False
        if checkpoint_dir is not None:
            os.makedirs(checkpoint_dir, exist_ok=True)
            ckpt_path = os.path.join(os.fspath(checkpoint_dir), f"llc-rank{rank}.pt")
            saved_extra = _agree_on_resume(ckpt_path, world)
            resume = saved_extra is not None
            if resume:
                saved_choice = saved_extra.get("step_size_choice")

        # ---- step size
        if step_size is not None:
            dtype = target.dtype
            origin = torch.zeros(1, layout.numel, device=target.device, dtype=dtype)
            h_ref = float(top_hessian_eigenvalue(target, layout, mask, origin, seed=seed)[0])
            eta = float(step_size)
            choice = StepSizeChoice(eta, h_ref, h_ref, bias_bound_of(eta, h_ref, nb, gamma), [])
            source = "given"
        elif saved_choice is not None:
            choice = StepSizeChoice(**{k: saved_choice[k] for k in ("step_size", "h_max", "h_max_at_reference", "bias_bound")},
                                    history=saved_choice["calibration"])
            source = "automatic (from checkpoint)"
        else:
            choice = choose_step_size(target, layout, mask, nbeta=nb, gamma=gamma, bias_bound=bias_bound,
                                      explode_at=explode_at, pilot_steps=pilot_steps, seed=seed)
            # Every rank computes the same η (same seeds); broadcasting rules out last-bit differences.
            choice.step_size = broadcast_float(choice.step_size)
            source = "automatic"
        eta = choice.step_size * (rms_eps if sampler == "rmsprop" and step_size is None else 1.0)

        # ---- sampling
        settings = SamplerSettings(nbeta=nb, step_size=eta, gamma=gamma, steps=burnin + draws, rmsprop=sampler == "rmsprop",
                                   rms_alpha=rms_alpha, rms_eps=rms_eps, explode_at=explode_at)
        state = initial_state(target, layout, [chain_seed(seed, c) for c in my_chains], settings)
        state.extra["step_size_choice"] = choice.to_dict()
        on_block = None
        if ckpt_path is not None:
            key = {**settings_key, "step_size": eta}
            if resume:
                state = load_checkpoint(ckpt_path, key, state)
            last = [state.step]

            def on_block(s):
                if s.step - last[0] >= checkpoint_every or s.step == settings.steps or s.step == _stop_after:
                    save_checkpoint(ckpt_path, s, key)
                    last[0] = s.step

        rms_factor = rms_eps if sampler == "rmsprop" else 1.0
        loss_grad = LossGrad(target, layout, compile=compile)
        point_seeds = [chain_seed(seed + 17, c) for c in my_chains]

        def chain_curvature(st) -> float:
            """Largest top-Hessian eigenvalue (Lanczos upper estimate) over the healthy chains (all ranks), at their current points."""
            alive = st.alive.cpu()
            h = 0.0
            if bool(alive.any()):
                pts = st.delta[st.alive]
                seeds_alive = [s for s, a in zip(point_seeds, alive.tolist()) if a]
                h = float(top_hessian_eigenvalue(target, layout, mask, pts, iters=20, point_seeds=seeds_alive).max())
            return max_over_ranks(h)

        # Burn-in adaptation (automatic step size only): the chains reach regions the pilots did not
        # (flat directions spread slowly), so the curvature is re-measured at the chains themselves
        # during burn-in (ADAPT_AT) and η is lowered (never raised) to keep the bias bound. Burn-in steps
        # do not enter the estimate, so changing η there is harmless; the last change leaves a quarter
        # of the burn-in for the chains to settle under the final η.
        checks = sorted({int(burnin * f) for f in ADAPT_AT} - {0}) if step_size is None else []
        if "step_size" in state.extra:
            settings = replace(settings, step_size=state.extra["step_size"])
        adaptations = state.extra.setdefault("adaptations", [])
        for check in checks + [settings.steps]:
            stop = check if _stop_after is None else min(check, _stop_after)
            if state.step < stop:
                state = run_chains(target, layout, mask, settings, state, on_block=on_block, stop_after=stop,
                                   loss_grad=loss_grad)
            if check == settings.steps or state.step != check or any(a["step"] == check for a in adaptations):
                continue
            h_now = chain_curvature(state)
            eta_new = _round_down(step_size_for(h_now, nb, gamma, bias_bound) * rms_factor) if nb * h_now + gamma > 0 else settings.step_size
            adaptations.append({"step": check, "h_max": h_now, "step_size": min(eta_new, settings.step_size)})
            if eta_new < settings.step_size:
                settings = replace(settings, step_size=eta_new)
                state.extra["step_size"] = eta_new
            if ckpt_path is not None:
                save_checkpoint(ckpt_path, state, key)
            if _stop_after is not None and state.step >= _stop_after:
                break
        eta = settings.step_size
        # The bias bound where the chains ended: reported, and a warning when far above the target.
        h_end = chain_curvature(state) if state.step == settings.steps else float("nan")
        bias_end = bias_bound_of(eta / rms_factor, h_end, nb, gamma)
        local = {
            "chains": my_chains, "trace": state.trace, "failed_at": state.failed_at.cpu().numpy(),
            "norms": (state.norms.cpu().numpy() / max(state.step, 1)), "wall_s": state.wall_s, "step": state.step,
            "compile_s": loss_grad.compile_s,
        }
        parts = [local]
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, local)
        order = np.argsort(np.concatenate([p["chains"] for p in parts]))
        losses = np.concatenate([p["trace"] for p in parts], axis=1)[:, order]
        failed_at = np.concatenate([p["failed_at"] for p in parts])[order]
        norms = np.concatenate([p["norms"] for p in parts])[order]
        steps_done = min(p["step"] for p in parts)
        losses = losses[:steps_done]
        if steps_done < settings.steps:
            # Interrupted on purpose (_stop_after): report what was sampled so far.
            burnin_used = min(burnin, max(steps_done - 1, 0))
        else:
            burnin_used = burnin
        per_chain, mean, std, stderr = estimate(losses, nb, burnin_used, failed_at)
        failed = {int(c): int(failed_at[c]) for c in range(chains) if failed_at[c] >= 0}
        advice = (
            f"reduce step_size (now {eta:.3g}) or bias_bound (now {bias_bound}), increase gamma (now {gamma}), or use a "
            f"larger loss_scale (smaller nbeta, now {nb:g})"
        )
        if len(failed) == chains:
            raise NumericalError(f"all {chains} chains diverged (steps {sorted(failed.values())}); {advice}")
        if failed:
            warnings.warn(
                f"{len(failed)} of {chains} chains diverged and are excluded (chain: step {failed}); {advice}",
                RuntimeWarning, stacklevel=2,
            )
        if bias_end > 2 * bias_bound:
            warnings.warn(
                f"at the end of sampling the chains sit where the step-size bias bound η(nβ h_max + γ)/4 is {bias_end:.2g} "
                f"(h_max {h_end:.3g}), above the {bias_bound:.2g} aimed for: λ̂ may be over-estimated by "
                f"up to {bias_end / (1 - min(bias_end, 0.99)):.0%}; pass a smaller step_size (e.g. {eta * bias_bound / bias_end:.2g}) "
                f"or a larger burnin so that the burn-in adaptation sees these regions",
                RuntimeWarning, stacklevel=2,
            )
        wall = max(p["wall_s"] for p in parts)
        compile_s = max(p["compile_s"] for p in parts)
        # The reported bound uses the largest curvature measured before sampling: the pilots' h_max and
        # every burn-in re-measurement (which may have lowered η because the chains found stiffer regions);
        # the pilot value alone would under-state the bound the final η was chosen for.
        h_max = max([choice.h_max] + [a["h_max"] for a in adaptations if math.isfinite(a["h_max"])])
        bound = bias_bound_of(eta / rms_factor, h_max, nb, gamma)
        diagnostics = {
            **choice.to_dict(), "step_size_source": source, "step_size": eta,
            "h_max_pilot": choice.h_max, "h_max": h_max, "bias_bound": bound,
            "predicted_bias_factor": 1.0 / (1.0 - bound) if bound < 1 else float("inf"),
            "h_max_end": h_end, "bias_bound_end": bias_end, "adaptations": list(adaptations),
            "norms": norms, "norm_names": NORMS, "failed_at": failed_at, "wall_s": wall,
            # Per chain-step of sampling, without the one-off compilation (its seconds are compile_s).
            "s_per_chain_step": (wall - compile_s) * world / max(chains * steps_done, 1), "n_batches": target.n_batches,
            "compiled": loss_grad.compiled, "compile_s": compile_s, "compile_error": loss_grad.compile_error,
            "n_samples": target.n_samples, "mean_positions_per_batch": target.mean_positions, "world_size": world,
            "steps_done": steps_done,
            "estimate_uses": "minibatch loss at θ_t used for its gradient (weighted by the batch's counted positions), "
                             "averaged over post-burn-in steps",
        }
        return LLCResult(
            llc=mean, llc_std=std, llc_stderr=stderr, llc_per_chain=per_chain, trace=(nb * losses).T, nbeta=nb,
            step_size=eta, gamma=float(gamma), chains=chains, draws=draws, burnin=burnin, n_params=n_params,
            loss=target.loss_name, sampler=sampler, failed=failed, diagnostics=diagnostics, selection=spec,
        )
