"""``behavioral_llc``: the behavioral local learning coefficient of a model (METHODS §1).

The method, step by step (each step is its own module):

1. the sampling target (targets.py): θ*, the batches and the chain-batched behavioral loss L_B,b,
   on the model's engine (``model_kind`` decides transformer or plain module);
2. the sampled coordinates (layout.py): the flat layout of δ = θ − θ* and the selection mask;
3. the step size η (stepsize.py): given, or from the top Hessian eigenvalue at θ* and along pilot
   runs, lowered during burn-in where the chains meet stiffer regions;
4. SGLD over all chains at once (sampler.py), checkpointed and resumable (checkpoint.py), the
   burn-in extended while the draws still drift or lag (``burnin="auto"``) and, for ``draws="auto"``,
   blocks of draws added until the verdict holds (``_continue_until_converged``);
5. the estimate λ̂ = nβ · mean post-burn-in L_B,b over healthy chains, and its diagnostics
   (llc_result.py), with the convergence verdict (convergence.py).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import replace

import numpy as np
import torch
from tqdm.auto import tqdm

from ..autograd import gradients_enabled, refuse_inference_mode
from ..data import as_seed
from ..errors import EstimateFailedError, NumericalError
from ..distributed import distributed_context, failing_together, gather_objects, max_over_ranks, warn_once
from ..stats.passes import show_progress
from .checkpoint import Checkpointer
from .config import GAMMA_RELAXATION, SamplerConfig
from .convergence import FLAT_RELAXATION, Convergence, ConvergenceWarning, assess_convergence
from .layout import ParameterLayout, Selection, select_coordinates
from .llc_result import (ChainRecords, LLCResult, bias_size, chain_estimates, estimate_text, larger_stderr,
                         n_eff_beyond_bias, quantity_label, step_biased, stderr_caveat, stop_reasons)
from .loss_grad import LossGrad
from .sampler import NORMS, Dynamics, SamplerState, chain_seed, initial_state, run_chains
from .stepsize import (ADAPT_AT, Curvature, StepSizeChoice, adapted_step_size, bias_bound_of, bias_of_estimate,
                       chain_curvature, initial_step_size, predicted_bias, step_size_for, window_llc)
from .targets import DEFAULT_CACHE_BYTES, SamplingTarget, make_target

#: Default nβ: the tempered posterior probes loss scale ε = 1/nβ = 10⁻³ (nats per sample for kl).
DEFAULT_NBETA = 1000.0


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


def check_memory(target: SamplingTarget, selection: Selection, chains: int) -> None:
    """Refuse (:class:`~tl_degeneracy.memory.MemoryBudgetError`, saying what to lower) a run whose
    chains would need more than the memory budget in force (:func:`~tl_degeneracy.memory.sgld_bytes`)
    on any process, before anything is sampled: on a CPU running out of memory is the kernel killing
    the process without a word (issue 19). Each process is charged the largest share of the
    ``chains``, ⌈chains / ranks⌉, and under torchrun every rank raises where any would not fit (review
    39: a rank refused alone and the others waited in the chains' gather). Transformer targets only:
    a plain module's activations are not known from its shape."""
    from ..memory import MemoryBudgetError, current_budget, format_bytes

    if target.kind != "transformer":
        return
    share = -(-int(chains) // distributed_context().world_size)
    b, t = _largest_batch(target)
    n = selection.layout.numel
    need = chains_memory(target, selection, share)
    budget = current_budget(target.device)
    worst = max(gather_objects((need - budget.bytes, need, str(budget))))
    if worst[0] > 0:
        raise MemoryBudgetError(
            f"the behavioral LLC with {share} chain(s) per process on batches of {b} × {t} tokens, sampling {n:,} "
            f"parameter entries, would need about {format_bytes(worst[1])}, more than the memory budget of {worst[2]}; "
            f"lower chains (now {chains}), the sequences per batch (batch_size; the report's llc_sequences) or their "
            "length (the report's llc_seq_len), or sample fewer parameters (params; the report's llc_params), or raise "
            "the budget (--memory / the report's memory setting / tld.memory.memory_limit) where the machine has more")


def chains_memory(target: SamplingTarget, selection: Selection, chains: int) -> int:
    """:func:`~tl_degeneracy.memory.sgld_bytes` of ``chains`` chains of a transformer ``target`` sampling
    ``selection``, on its largest batch, beside the reference outputs of every batch (cached up to
    ``cache_bytes``) and the float32 copy of a half-precision model's weights (``SamplingTarget.widened``)."""
    from ..memory import sgld_bytes

    b, t = _largest_batch(target)
    adapter, s = target.engine, target.dtype.itemsize
    held = (min(target.cache_bytes, target.n_batches * b * t * adapter.cfg.d_vocab * s)
            + sum(p.numel() * s for p in target.star.values() if p.dtype.itemsize < s))
    return sgld_bytes(adapter, chains, b, t, selection.layout.numel, held,
                      layers=_layers_sampled(selection, adapter.cfg.n_layers))


def _largest_batch(target: SamplingTarget) -> tuple[int, int]:
    """(sequences, tokens) of a transformer target's largest batch, as padded."""
    tb = target.batches
    return min(tb.batch_size, max(1, tb.n_sequences)), tb.max_len


def _layers_sampled(selection: Selection, n_layers: int) -> int:
    """How many of the top layers depend on the sampled parameters (``blocks.<i>.…``; the embeddings
    and any name not of a block: all of them; only the final norm or unembedding: none)."""
    lowest = n_layers
    for name in selection.layout.names:
        m = re.match(r"blocks\.(\d+)\.", name)
        if m:
            lowest = min(lowest, int(m.group(1)))
        elif not name.startswith(("ln_final.", "unembed.")):
            return n_layers
    return n_layers - lowest


def check_finite_at_reference(target: SamplingTarget, layout: ParameterLayout) -> None:
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


def behavioral_llc(
    model,
    data,
    loss: str | None = None,
    nbeta: float | None = None,
    loss_scale: float | None = None,
    step_size: float | None = None,
    gamma: float | str | None = None,
    chains: int | None = None,
    draws: int | str | None = None,
    burnin: int | str | None = None,
    batch_size: int | None = None,
    params=None,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    config: SamplerConfig | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: bool = True,
    _stop_after: int | None = None,
    **options,
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
        step_size: η; default automatic (stepsize.py): the largest η whose predicted relative
            step-size bias of λ̂, η nβ (tr H + 2 nβ S)/(8 λ (1 − b_max)), is ``bias_bound`` (0.05) and
            whose stiffest direction has b_max = η (nβ h_max + γ)/4 ≤ ``stiff_bound`` (0.5), with
            h_max (Lanczos; the stiffest batch's) and tr H (Hutchinson) of the Hessian of L_B, and S
            the minibatch gradients' spread (0 for the full batch; ``batch_size``), at θ* and at the
            end of pilot runs, and λ from the pilots' traces; η is lowered (never raised) after a quarter, half
            and three quarters of the burn-in if the chains reached stiffer regions or their λ̂
            calls for it (:data:`ADAPT_AT`), so the last quarter of the burn-in runs under the final
            η. ``diagnostics["bias_bound"]`` is the predicted relative bias of λ̂ at the final η,
            K/(λ̂ − K) with K = η nβ (tr H + 2 nβ S)/(8 (1 − b_max)) (λ̂ is raised by the K it bounds;
            ``stepsize.bias_of_estimate``): the larger of ``["bias_bound_chosen"]``, with the largest
            curvature, trace and spread measured before sampling (``["h_max"]``,
            ``["trace_hessian"]``, ``["gradient_spread"]``; the pilots' alone: ``["h_max_pilot"]``),
            and ``["bias_bound_end"]``, with those measured at the chains' end points; ``["stiff_bound"]`` is b_max (for a given η, which measures no
            curvature before sampling: at θ* and the chains' end points). A warning is issued when
            the end points' bias exceeds twice ``bias_bound``. On toy:bytelm the predicted bias
            stayed above the measured one, by 1.7–4× (docs/methods.md §1).
        gamma: localization γ of the prior (γ/2)‖θ − θ*‖² (default 1). It is part of the quantity:
            the estimate is λ̂(ε, γ), the LLC of the posterior within reach of the prior, and
            directions whose curvature nβh is far below γ count for ≈ nβh/(2γ) instead of ½. So a
            larger γ gives a smaller, more local value (toy:bytelm: > 530 at γ = 1, 227 at 10³, 70 at
            10⁴, 17 at 10⁵), and values are comparable only at equal ε and γ. Models whose directions
            all have nβh ≫ γ (regular models, the deep linear networks' non-gauge directions at γ = 1)
            hardly depend on it; under ``"auto"`` with an automatic η, γ grows ∝ nβ and holds a share
            γ/(nβh + γ) of every direction at every ε (a regression: 4.57 for d/2 = 5; METHODS §1,
            corrected), so compare with known answers at γ = 1. ``"auto"``: the smallest γ ≥ ``min_gamma`` (default 1) at which the
            chains can equilibrate within the budget, max(min_gamma, 3/(η · burnin))
            (:meth:`SamplerConfig.auto_gamma`; flat directions are free random walks until s·γ ≈ 3,
            s the cumulative step); the pilots run at the floor, and η is re-derived at the chosen
            γ. ``result.gamma`` is the γ used, ``diagnostics["gamma_source"]`` says how it was set.
        chains, draws, burnin: chains run together (default 8); each runs burnin + draws steps
            (default 500 + 2000, the burn-in extended as below); the estimate averages the draws.
            Under torchrun, chains must be at least the number of ranks. ``burnin="auto"`` (the
            default; a given number is used as is): a burn-in of 500 steps that is extended while
            the chains show they have not reached equilibrium: when the verdict below fails on
            drift, split-R̂ or relaxation (the traces still move, or directions are still spreading
            from θ*; more draws would only dilute that), the draws
            so far become burn-in, an automatic η is re-adapted at the chains (those that drift
            reach stiffer regions: on the rank-0 deep linear network h_max grows from 1.5 to 4 and
            at the first η the equilibrium λ̂ is 2.90 instead of 2.48), the chains settle under it
            for a quarter of the first burn-in and draw afresh (the first block for
            ``draws="auto"``). It stops growing at ``max_burnin`` steps (default 20,000) or once the
            burn-in's cumulative step s = Σ η has s·γ ≥ 5, when even the directions only γ holds
            have relaxed (convergence.py, FLAT_RELAXATION), so a model whose draws neither drift
            nor lag pays nothing (regression: 500), the singular deep linear networks of rank 0
            and 1 get 2,625 steps at the defaults (one extension; ≈ 5 s each on one CPU core), and
            the full-rank one, whose GL(2) gauge directions only γ holds, 6,875 (three). ``result.burnin`` is the burn-in used;
            ``diagnostics["burnin_auto"]`` records the first and final burn-in, every extension
            (step, verdict, η), whether the burn-in budget ran out and why, and
            ``diagnostics["burnin_source"]`` (also in ``summary()``) says it in words.
            ``draws="auto"``: a budget instead of a count: after the
            burn-in the chains run blocks of ``draws_block`` draws (default 500), each continuing
            the same chains (in memory; with ``checkpoint_dir``, resumable, also under a larger
            budget), until the convergence verdict below holds, ``max_draws`` draws are reached
            (default 20,000 when no ``time_limit`` is given; the last block is cut to it) or the
            next block would end past ``time_limit`` seconds since the call began (pilots
            included, at the sampling speed so far; the first block always runs; a run resumed
            from ``checkpoint_dir`` counts the time its checkpoint had spent).
            λ̂ averages every post-burn-in draw; k blocks equal one run of as many draws bit for
            bit when the step size is given or ``pilot_steps`` is (the automatic pilots' default
            length scales with burnin + the first block) and the burn-in was not extended. ``diagnostics["budget"]`` records the
            blocks run, the total draws, why the run stopped (``"converged"``, ``"max_draws"``,
            ``"time_limit"``, ``"one_chain"``: fewer than 2 healthy chains, which no draws make
            converge, ``"step_size"``: a step that spreads the chains beyond the posterior, which no
            draws change) and whether the budget ran out, with a ``reason`` that the warning
            and :attr:`LLCResult.convergence_reason` repeat (None for a fixed number of draws).
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
            Each step meets its own batch's loss, so minibatches raise λ̂ beyond the full batch's
            step-size bias: the spread of the batches' gradients adds to the injected noise, and the
            stiffest batch is stiffer than their mean. The rule and ``bias_bound`` include both (S
            and the stiffest batch's h_max, measured on the first batches: stepsize.py; METHODS §1,
            "Step size"), so an automatic η is smaller with small batches; ragged batches' weights
            are part of S.
        params: restrict sampling to a selection (``select_parameters`` spellings for TL models and
            toys, e.g. ``"blocks.0.attn.head1"``; parameter names or name → mask for plain modules).
            The mask multiplies gradient, prior and noise.
        seed: chain c uses the generator seeded by ``chain_seed(seed, c)``.
        checkpoint_dir: write the sampler state there every ``checkpoint_every`` steps (atomically)
            and resume from it when it exists; a checkpoint from other settings is refused, and so
            is one from another model or other data (θ*, data, dtype and device type are hashed
            into the checkpoint's settings). One directory holds one run. Under torchrun each rank
            writes its own file and the ranks resume only together: checkpoints on some ranks
            only, or inconsistent ones, are refused on every rank, and so is a run resumed with
            another number of processes. Files are read with ``torch.load(weights_only=True)``:
            one that is not such a checkpoint (or from before 0.4.7) is refused, never unpickled
            in full. ``result.diagnostics["resumed_at_step"]`` says where a resumed run took up
            its chains (None: sampled in one go).
        config: a :class:`SamplerConfig` holding the sampler's knobs (chains, draws, burnin,
            step_size, gamma and the options below); the keywords above, and the options below
            given as keywords, override its fields. The remaining arguments are options of the
            sampler (fields of :class:`SamplerConfig`, defaults there):
        sampler: ``"sgld"`` or ``"rmsprop"`` (RMSProp-preconditioned SGLD; the automatic η is
            multiplied by ``rms_eps`` so that the largest preconditioned step keeps the bias bound).
            On toy:bytelm RMSProp was slower to converge than plain SGLD (an automatic η ≈ 9×
            smaller, ≈ 20 % more time per step), and its chains mix slowly; it is kept for
            comparison with devinterp's ``rmsprop_sgld`` (below), not as a faster sampler. Its
            preconditioner adapts during the first half of the burn-in only (METHODS §1, corrected).
        bias_bound: target of the predicted relative step-size bias of λ̂ (automatic step size).
        stiff_bound: largest η (nβ h_max + γ)/4 of the automatic step size (stability).
        min_gamma: the floor of ``gamma="auto"``.
        max_burnin: the longest burn-in of ``burnin="auto"`` (refused with a given burn-in).
        pilot_steps: length of each pilot run of the automatic step size (stepsize.py); default
            scaled to the budget, min(200, max(20, (burnin + draws)//10)); a given value is used as is.
        checkpoint_every: steps between checkpoints (default 512).
        compile: compile the sampling steps' loss and gradient with ``torch.compile`` (loss_grad.py):
            about 2× faster per chain-step on small transformers on a CPU (BENCHMARKS.md), after a
            one-off compilation (``diagnostics["compile_s"]``: tens of seconds on a CPU the first
            time, a few once Inductor's cache holds it), so for long runs. Same estimate up to
            rounding (the chains' paths differ in the last bits from an uncompiled run's). Step-size
            calibration (Hessian-vector products) stays uncompiled. Falls back to uncompiled, with
            a warning, where compilation fails.
        cache_bytes: memory budget for cached reference outputs (beyond it they are recomputed).
        progress: tqdm bars (rank 0 only; the TQDM_DISABLE environment variable turns them off) over
            the pilot runs' steps and the sampling steps, with the time left.

    Convergence (METHODS §1, convergence.py): ``result.converged`` is True only when the split-R̂
    of the healthy chains' post-burn-in traces is ≤ 1.05, their bulk effective sample size ≥ 100,
    the last half of the draws is within 2 standard errors of the first half, at most a quarter
    of the chains diverged, the chains have relaxed (mean δ·∇U ≥ 95 % of the d sampled
    coordinates, METHODS (1.9)) and the step does not spread them far beyond the posterior (that
    mean ≤ 150 %) (judged after any extension of ``burnin="auto"``); ``diagnostics``
    holds ``rhat``, ``ess``, ``drift``, ``relaxation`` (and ``relaxation_mcse``), ``n_diverged``,
    ``diverged_chains`` and ``convergence`` (each failed criterion in words, the suggested budget).
    A run that is not converged issues one :class:`ConvergenceWarning` saying what failed, with the
    numbers, and the budget that would fix it; its λ̂ reads as a lower bound where the chains were
    still rising or many diverged, as too high where the step failed, else as uncertain both ways.

    Standard error (METHODS §1): ``result.llc_stderr`` is the larger of the chain means' spread over
    √C (``diagnostics["llc_chain_stderr"]``) and ArviZ's sd/√ESS of all draws (``["llc_mcse"]``);
    with fewer than 4 healthy chains ``["stderr_caveat"]`` says that it is itself uncertain.

    Under ``torchrun`` (an initialised ``torch.distributed`` process group) the chains are split
    round-robin across ranks and gathered; every rank returns the full result.

    Relation to devinterp (2.0.1; docs/methods.md §1, tests/test_devinterp_agreement.py): the same
    posterior and the same plain SGLD update w ← w − (η/2)[nβ ∇L_b(w) + γ(w − w*)] + √η ξ, with L_b
    the *mean* loss of the minibatch in both. So ``nbeta`` is its ``n_beta`` (no default there; it
    suggests m/ln m for batch size m), ``gamma`` its ``localization`` (default 0 there) and
    ``step_size`` its ``lr``. devinterp averages every step, burn-in included, and subtracts an
    ``init_loss`` estimated on 32 batches; here the post-burn-in draws are averaged and L_B(θ*) = 0
    needs no baseline. With ``burnin=0`` and devinterp's ``loss_fn`` = this behavioral loss the two
    estimators are the same; they agree within their combined standard errors on reduced-rank
    regression and a normal crossing. ``sampler="rmsprop"`` with (η, ``rms_eps`` e) has the
    parameters of its ``rmsprop_sgld`` with ``lr`` = η/nβ and ``rmsprop_eps`` = e/nβ, but not its
    law: ``rmsprop_sgld`` adapts the preconditioner at every step, which samples another
    distribution than the posterior (review 42), while here it is held fixed from halfway through
    the burn-in (so with ``burnin=0`` this is plain SGLD at step η/e).

    Raises:
        ValueError: an argument out of range (chains/draws ≥ 1, burnin ≥ 0, step_size, bias_bound
            (< 1), rms_eps, nbeta/loss_scale finite and > 0, 0 ≤ rms_alpha < 1, gamma ≥ 0), more
            ranks than chains, a checkpoint from other settings, another model or other data, a
            minibatch run's checkpoint whose automatic η a version before 0.4.1 chose, or
            (torchrun) checkpoints missing on some ranks or inconsistent between ranks.
        TypeError: an option that is no field of :class:`SamplerConfig`.
        NumericalError: L_B at θ* is not finite (non-finite reference outputs), or every chain
            diverged (the message says what to change).
        MemoryBudgetError: a transformer's chains would need more than the memory budget in force
            (:func:`check_memory`; ``tld.memory_limit``), before anything is sampled.
    """
    started = time.perf_counter()
    refuse_inference_mode("behavioral_llc")
    seed = as_seed(seed)  # numpy integers too (torch's generators take Python ints only)
    config = SamplerConfig.merged(config, step_size=step_size, gamma=gamma, chains=chains, draws=draws, burnin=burnin,
                                  **options)
    nb = resolve_nbeta(nbeta, loss_scale)
    ctx = distributed_context()
    if ctx.world_size > config.chains:
        raise ValueError(
            f"{ctx.world_size} ranks but only {config.chains} chains: chains are split across ranks and a rank without a "
            f"chain has nothing to sample; pass chains ≥ {ctx.world_size} or run with fewer processes"
        )
    target = make_target(model, data, loss, batch_size, cache_bytes)
    # One forward scope for the whole run: every forward inside it (checks, curvature, pilots, each
    # SGLD step) is then free of the per-forward bookkeeping, and the model is given back as found
    # (modes, no cached attention patterns holding the chains' graphs) when the run ends or fails.
    # The sampler and the curvature differentiate in the perturbations, also when the caller runs
    # under torch.no_grad(), as TransformerLens notebooks do.
    # failing_together: an error in one rank's chains raises on every rank (none waits in a gather for good).
    with failing_together("behavioral_llc"), gradients_enabled(target.engine.model), target.engine.eval_mode():
        selection = select_coordinates(target, params)
        # No posterior at nβ reaches nβ L_B far above d/2 (λ ≤ d/2); 20× that plus slack is a divergence.
        # The test reads one batch's loss, nβ L_B,b ≈ ½ tr(H_b H⁻¹) at equilibrium, up to B times the
        # whole data's where only that batch constrains a direction (audit 14a F2: healthy chains on a
        # stiff batch of 100 reached 218 > 200, were dropped as diverged, and λ̂ read 4.80 for 5.00).
        explode_at = (10.0 * selection.n_params + 100.0) * target.n_batches
        my_chains = list(range(ctx.rank, config.chains, ctx.world_size))
        check_memory(target, selection, config.chains)
        check_finite_at_reference(target, selection.layout)
        checkpointer = None if checkpoint_dir is None else Checkpointer(
            checkpoint_dir, ctx.rank, ctx.world_size, config.checkpoint_every, config.steps, _stop_after)
        saved = None if checkpointer is None else checkpointer.resume_extra()

        show = show_progress(progress, ctx.rank)
        choice, source = initial_step_size(target, selection, config, nbeta=nb, gamma=config.gamma_floor,
                                           explode_at=explode_at, seed=seed,
                                           saved=None if saved is None else saved.get("step_size_choice"), progress=show)
        gamma, choice = _localization(config, choice, source, nb)
        eta = choice.step_size * (config.rms_factor if config.step_size is None else 1.0)
        dynamics = Dynamics(nbeta=nb, step_size=eta, gamma=gamma, steps=config.steps, rmsprop=config.rmsprop,
                            rms_alpha=config.rms_alpha, rms_eps=config.rms_eps, explode_at=explode_at)
        state = initial_state(target, selection.layout, [chain_seed(seed, c) for c in my_chains], dynamics)
        state.extra["step_size_choice"] = choice.to_dict()
        resumed_at = None
        if checkpointer is not None:
            key = {**_run_key(target, config, nb, selection, seed, my_chains), "step_size": eta}
            state = checkpointer.restore(state, key, resume=saved is not None)
            resumed_at = state.step if saved is not None else None
            # time_limit counts the run's time over every call: a resumed run starts with what the
            # checkpoint had spent (audit 10b: a run that had stopped on its budget was extended by a
            # fresh one, 1,900 → 3,700 draws, and a rerun report read another λ̂ and verdict).
            started -= state.extra.get("elapsed_s", 0.0)
            checkpointer.started = started
        loss_grad = LossGrad(target, selection.layout, compile=config.compile)
        # The run as sampled so far, with a fixed burn-in and number of draws (burnin="auto": the
        # first burn-in, or as far as a resumed checkpoint had extended it; draws="auto": the first
        # block, or as far as a resumed checkpoint had extended the chains).
        burnin_now = state.extra.get("burnin", config.initial_burnin)
        run = config.fixed(max(config.first_draws, len(state.trace) - burnin_now), burnin_now)
        state.grow(run.steps)  # a checkpoint written with a smaller first block of draws (audit 8a)
        dynamics = replace(dynamics, steps=run.steps, adapt_until=_metric_frozen_at(config))
        if checkpointer is not None:
            checkpointer.steps = run.steps
        # The burn-in checks of an automatic η: fractions of the first burn-in (an extension adapts at its own start).
        checks = sorted({int(config.initial_burnin * f) for f in ADAPT_AT} - {0}) if config.step_size is None else []
        eta0 = eta
        burn = f"{config.initial_burnin}{'+' if config.auto_burnin else ''}"
        # draws="auto": the bar's total is the block under way; it grows with each block, which the
        # description says beforehand and the postfix (the last verdict) explains as it happens.
        draws = f"blocks of {config.first_draws} draws until converged" if config.auto else f"{config.draws} draws"
        with tqdm(total=run.steps, initial=state.step, unit="step", disable=not show,
                  desc=f"LLC: SGLD, {config.chains} chains × ({burn} burn-in + {draws})") as bar:
            state, dynamics = _sample_with_burnin_adaptation(target, selection, run, dynamics, state, loss_grad,
                                                             checkpointer, seed, my_chains, _stop_after, bar, checks)
            budget = burnin_record = None
            if config.auto or config.auto_burnin:
                state, dynamics, run, budget, burnin_record = _continue_until_converged(
                    target, selection, config, run, dynamics, state, loss_grad, checkpointer, seed, my_chains,
                    _stop_after, bar, ctx.world_size, started, checks, eta0)
        # The bias bound where the chains ended: reported, and a warning when far above the target.
        end = (chain_curvature(target, selection, state, _point_seeds(seed, my_chains))
               if state.step == run.steps else Curvature(float("nan"), float("nan"), float("nan")))
        records = ChainRecords.gather(state, my_chains, loss_grad.compile_s)
        result = _result(target, selection, run, nb, choice, source, dynamics, state.extra["adaptations"],
                         end, records, loss_grad, ctx.world_size, _gamma_source(config, eta), budget,
                         burnin_record)
        # where an interrupted run took up its chains (None: sampled in one go), audit 16b F11
        result.diagnostics["resumed_at_step"] = resumed_at
        return result


def _localization(config: SamplerConfig, choice: StepSizeChoice, source: str, nbeta: float) -> tuple[float, StepSizeChoice]:
    """The γ to sample at, and the step size re-derived for it.

    A given γ is used as given. ``gamma="auto"`` (:meth:`SamplerConfig.auto_gamma`): γ = max(floor,
    3/(η·burnin)); an automatic η depends on γ through the stiffest direction's a = nβ h_max + γ
    (the predicted bias does not: γ cancels from it, stepsize.py), so the pair is iterated to its
    fixed point from the pilots' measurements (η only falls as γ rises, so it converges; no new
    pilots run). A resumed run reads the fixed point's η from its checkpoint, so it finds the same γ."""
    gamma = config.auto_gamma(choice.step_size)
    # A given η is not re-derived, and a checkpoint's saved choice already holds the fixed point
    # (re-iterating it could move η in the last bit, and the checkpoint would refuse the run).
    if not config.auto_gamma_on or source != "automatic":
        return gamma, choice
    eta = choice.step_size
    for _ in range(20):
        eta_new = min(eta, step_size_for(choice.h_max, nbeta, gamma, config.bias_bound, trace=choice.trace,
                                         llc=choice.llc_pilot, spread=choice.gradient_spread,
                                         stiff_bound=config.stiff_bound))
        gamma_new = config.auto_gamma(eta_new)
        done = eta_new == eta and gamma_new == gamma
        eta, gamma = eta_new, gamma_new
        if done:
            break
    choice = replace(choice, step_size=eta, bias_bound=predicted_bias(eta, choice.h_max, choice.trace, choice.llc_pilot,
                                                                      nbeta, gamma, choice.gradient_spread),
                     stiff_bound=bias_bound_of(eta, choice.h_max, nbeta, gamma))
    return gamma, choice


def _run_key(target: SamplingTarget, config: SamplerConfig, nbeta: float, selection: Selection, seed: int,
             my_chains: list[int]) -> dict:
    """What a checkpoint must have been written under to be resumed (checkpoint.py; η is added)."""
    return {
        # The fingerprint (θ*, data, dtype, device type) ties a checkpoint to this model on this data:
        # class and sizes alone would let another model of the same shape resume this one's chains.
        # Hashing reads every parameter on the CPU, so it is done only when checkpointing.
        "target": target.description, "fingerprint": target.fingerprint(),
        "loss": target.loss_name, "nbeta": nbeta, "gamma": config.gamma if config.auto_gamma_on else float(config.gamma),
        "min_gamma": config.min_gamma, "stiff_bound": config.stiff_bound, "chains": config.chains,
        # draws="auto" runs differ only in how far they go (max_draws, time_limit, block size), not
        # in the chains, so a checkpoint of one resumes under a larger budget.
        "draws": config.draws, "burnin": config.burnin, "seed": seed, "sampler": config.sampler,
        "bias_bound": config.bias_bound, "selection": selection.spec, "n_params": selection.n_params,
        "step_size_given": config.step_size, "my_chains": my_chains,
        # the automatic step size's pilots chose η (audit 21a F1: a checkpoint of 3-step pilots, η 144×
        # too small, was resumed by a run asking for 200 and reported as theirs)
        "pilot_steps": config.pilot_length if config.step_size is None else None,
        # where the preconditioner stops adapting: a checkpoint of one that adapted on (before 0.4.9) is another run
        "rms": (config.rms_alpha, config.rms_eps, _metric_frozen_at(config)) if config.rmsprop else None,
    }


def _point_seeds(seed: int, my_chains: list[int]) -> list[int]:
    """Seeds of the Lanczos start vectors at the chains' points (one per chain, apart from the chains' own)."""
    return [chain_seed(seed + 17, c) for c in my_chains]


def _sample_with_burnin_adaptation(
    target: SamplingTarget, selection: Selection, config: SamplerConfig, dynamics: Dynamics, state: SamplerState,
    loss_grad: LossGrad, checkpointer: Checkpointer | None, seed: int, my_chains: list[int], stop_after: int | None,
    bar=None, checks: list[int] = (),
) -> tuple[SamplerState, Dynamics]:
    """Run the chains to the end (or to ``stop_after``), re-adapting an automatic η during burn-in.

    The chains reach regions the pilots did not (flat directions spread slowly), so the curvature is
    re-measured at the chains themselves at the steps ``checks`` (the first burn-in's fractions
    :data:`ADAPT_AT`; none for a given η) and η is lowered (never raised) to keep the bias bound
    (:func:`_adapt_step_size`). Burn-in steps do not enter the estimate, so changing η there is
    harmless; the last change leaves a quarter of the burn-in for the chains to settle under the
    final η. Checks already behind the chains are skipped; a resumed run continues under the η it
    had reached (``state.extra``).
    """
    if "step_size" in state.extra:
        dynamics = replace(dynamics, step_size=state.extra["step_size"])
    adaptations = state.extra.setdefault("adaptations", [])
    on_block = None if checkpointer is None else checkpointer.on_block
    previous = 0
    for check in list(checks) + [dynamics.steps]:
        stop = check if stop_after is None else min(check, stop_after)
        if state.step < stop:
            state = run_chains(target, selection.layout, selection.mask, dynamics, state, on_block=on_block, stop_after=stop,
                               loss_grad=loss_grad, bar=bar)
        since, previous = previous, check
        if check == dynamics.steps or state.step != check or any(a["step"] == check for a in adaptations):
            continue
        dynamics = _adapt_step_size(target, selection, config, dynamics, state, seed, my_chains, since)
        if checkpointer is not None:
            checkpointer.save(state)
        if stop_after is not None and state.step >= stop_after:
            break
    return state, dynamics


def _adapt_step_size(target: SamplingTarget, selection: Selection, config: SamplerConfig, dynamics: Dynamics,
                     state: SamplerState, seed: int, my_chains: list[int], since: int) -> Dynamics:
    """Re-measure h_max, tr H and S at the chains now and λ̂ over steps [``since``, now), lower an
    automatic η to what they call for (:func:`adapted_step_size`; never raise it) and record the
    check in ``state.extra["adaptations"]`` (checkpointed by the caller)."""
    check = state.step
    now = chain_curvature(target, selection, state, _point_seeds(seed, my_chains))
    # λ̂ so far: the chains' mean nβ L_B since the last check (every rank's chains: gathered).
    records = ChainRecords.gather(state, my_chains, 0.0)
    llc_now = window_llc(records.losses, records.failed_at < 0, dynamics.nbeta, since, check)
    eta_new = adapted_step_size(now, llc_now, dynamics.step_size, dynamics.nbeta, dynamics.gamma, config)
    state.extra["adaptations"].append({"step": check, "h_max": now.h_max, "trace_hessian": now.trace,
                                       "gradient_spread": now.spread, "llc": llc_now,
                                       "step_size": min(eta_new, dynamics.step_size)})
    if eta_new < dynamics.step_size:
        dynamics = replace(dynamics, step_size=eta_new)
        state.extra["step_size"] = eta_new
    return dynamics


def _continue_until_converged(
    target: SamplingTarget, selection: Selection, config: SamplerConfig, run: SamplerConfig, dynamics: Dynamics,
    state: SamplerState, loss_grad: LossGrad, checkpointer: Checkpointer | None, seed: int, my_chains: list[int],
    stop_after: int | None, bar, world: int, started: float, checks: list[int], eta0: float,
) -> tuple[SamplerState, Dynamics, SamplerConfig, dict | None, dict | None]:
    """``burnin="auto"`` and ``draws="auto"``: continue the same chains until the verdict of METHODS
    §1 (convergence.py) holds or the budgets are spent; returns the state, the dynamics, the run
    (its burn-in and draws so far), what the draws budget did (``diagnostics["budget"]``; None for a
    fixed number of draws) and what the burn-in did (``diagnostics["burnin_auto"]``; None for a
    given burn-in).

    Burn-in (``burnin="auto"``): a verdict that fails on drift, split-R̂ or relaxation says the
    traces are still moving, i.e. the chains had not reached equilibrium when the draws began, which
    more draws only dilute. Then the draws so far become burn-in (:func:`_extend_burnin`): η is re-adapted at
    the chains (they may have reached stiffer regions), a quarter of the first burn-in settles them
    under it, and a fresh first block of draws follows. The burn-in stops growing at ``max_burnin``
    steps, or once its cumulative step s has s·γ ≥ :data:`FLAT_RELAXATION` (every direction,
    down to those only γ holds, has then relaxed, so what still moves is no transient a longer
    burn-in removes); the run then draws on (``draws="auto"``) or stops. A step too large (criterion
    (vi)) extends it only where η is automatic and its re-adaptation lowers η (or the traces still
    move too): otherwise the run stops, too high (``stopped="step_size"``).

    Draws (``draws="auto"``): blocks of draws are added; each only advances the chains' steps
    (their state, RMSProp state and generators carry over, and checkpoints written on the way
    resume), so a run that stops after k blocks without extending its burn-in equals one fixed run
    of as many draws bit for bit. A block (or an extension) is not started when ``max_draws`` is
    reached (the last block is shortened to it) or when, at the sampling speed so far, it would end
    past ``time_limit`` seconds since the call began (pilots included); the first block always
    runs. Every rank sees the same gathered traces and the slowest rank's clock, so all take the
    same decision under torchrun.
    """
    block, max_draws, time_limit = config.first_draws, config.draw_budget, config.time_limit
    nb = dynamics.nbeta
    extensions = state.extra.setdefault("burnin_extensions", [])
    burnin_refused, burnin_spent = "", False
    while True:
        if stop_after is not None and state.step >= stop_after:
            stopped = "interrupted"
            break
        records = ChainRecords.gather(state, my_chains, 0.0)
        failed = records.failed()
        if len(failed) == config.chains:
            stopped = "diverged"  # _result raises, with advice
            break
        verdict = assess_convergence(nb * records.losses[run.burnin:].T, failed, virial=records.virial[run.burnin:].T,
                                     n_coordinates=selection.n_params)
        bar.set_postfix_str("converged" if verdict.converged else f"after {run.draws:,} draws: {verdict.brief}")
        if verdict.converged:
            stopped = "converged"
            break
        moving = _still_moving(config, verdict)
        burnin_refused = _burnin_refusal(config, run, dynamics, state, eta0) if moving else ""
        burnin_spent = bool(burnin_refused) and _burnin_budget_spent(config, state)
        if moving and not burnin_refused:
            if _past_time_limit(config, records, _settle_steps(config) + block, started, world):
                stopped = "time_limit"
                break
            eta_before = dynamics.step_size
            if config.step_size is None and not any(a["step"] == state.step for a in state.extra["adaptations"]):
                # an automatic η is re-adapted at the chains now (over the draws' window; once: resumed runs)
                dynamics = _adapt_step_size(target, selection, config, dynamics, state, seed, my_chains, run.burnin)
            if dynamics.step_size == eta_before and not _traces_moving(config, verdict):
                # Only the step failed (vi), and the chains call for the same η: an extension would
                # change nothing (review 43 F3: three of them at one η, 2.9× the steps, one verdict).
                stopped = "step_size"
                burnin_refused = (f"the step size fails criterion (vi), and re-adapted at the chains (step "
                                  f"{state.step:,}) the automatic η stays {dynamics.step_size:.3g}: a longer burn-in "
                                  "would not change it")
                break
            state, dynamics, run = _extend_burnin(target, selection, config, run, dynamics, state, verdict, loss_grad,
                                                  checkpointer, seed, my_chains, stop_after, bar, checks)
            continue
        if "step_size" in verdict.failed:
            stopped = "step_size"  # criterion (vi): more draws do not shrink the step's excess
            break
        if not config.auto:
            stopped = "fixed"
            break
        if config.chains - len(failed) < 2:
            stopped = "one_chain"  # split-R̂ compares chains: no draws make it defined (review 36)
            break
        if max_draws is not None and run.draws >= max_draws:
            stopped = "max_draws"
            break
        more = block if max_draws is None else min(block, max_draws - run.draws)
        if _past_time_limit(config, records, more, started, world):
            stopped = "time_limit"
            break
        run = config.fixed(run.draws + more, run.burnin)
        state, dynamics = _run_further(target, selection, run, dynamics, state, more, loss_grad, checkpointer, seed,
                                       my_chains, stop_after, bar, checks)
    if stopped == "time_limit" and checkpointer is not None:
        # The time spent up to this decision, so that a resumed call (whose clock starts there) takes it again.
        checkpointer.save(state)
    elapsed = time.perf_counter() - started
    # Only the reason that applies is formatted: max_draws is None under a time_limit alone (audit 14a F1).
    if stopped == "max_draws":
        reason = f"budget spent: max_draws = {max_draws:,}" + (
            f" (the run resumed had drawn {run.draws:,} already)" if run.draws > max_draws else "")
    elif stopped == "one_chain":
        reason = "stopped drawing: split-R̂ needs ≥ 2 healthy chains, which more draws cannot give"
    elif stopped == "step_size":
        reason = ("stopped drawing: the step size spreads the chains beyond the posterior, which more draws cannot "
                  "change" + ("" if config.step_size is not None else
                              ", and re-adapted at the chains it stays as it is: a smaller bias_bound or stiff_bound "
                              "lowers it"))
    elif stopped == "time_limit":
        reason = (f"budget spent: time_limit = {time_limit:g} s (elapsed {elapsed:.3g} s; another block of "
                  f"{block:,} draws would pass it)")
    else:
        reason = ""
    budget = None if not config.auto else {
        "draws": "auto", "draws_block": block, "max_draws": max_draws, "time_limit": time_limit,
        "blocks": 1 + math.ceil(max(run.draws - block, 0) / block), "total_draws": run.draws, "elapsed_s": elapsed,
        "stopped": stopped, "budget_exhausted": stopped in ("max_draws", "time_limit", "one_chain"), "reason": reason,
    }
    burnin_record = None if not config.auto_burnin else {
        "burnin": "auto", "initial": config.initial_burnin, "used": run.burnin, "max_burnin": config.burnin_budget,
        "extensions": list(extensions), "budget_exhausted": burnin_spent and stopped != "converged",
        "reason": burnin_refused if stopped != "converged" else "",
    }
    return state, dynamics, run, budget, burnin_record


def _still_moving(config: SamplerConfig, verdict: Convergence) -> bool:
    """Whether ``burnin="auto"`` reads a failed verdict as traces still moving, so that the draws so far
    become burn-in: drift or unfinished relaxation, or a finite split-R̂ above its bound (an undefined
    one, from one healthy chain or too few draws, is no sign of it: audit 14a F8). Not R̂ alone where η
    is given and more draws may follow: an extension then changes nothing but the burn-in's length,
    and a block whose R̂ fails by chance was thrown away again and again (audit 17b F3: burn-ins of
    1,750 to 19,875 steps over 16 seeds of one run); its draws are kept and more added instead. A
    step too large (criterion (vi)) only where η is automatic: the extension re-adapts it at the
    chains, which a given η does not change."""
    if not config.auto_burnin:
        return False
    if "step_size" in verdict.failed:  # only an automatic η changes: the extension re-adapts it (review 42)
        return config.step_size is None
    return _traces_moving(config, verdict)


def _traces_moving(config: SamplerConfig, verdict: Convergence) -> bool:
    """:func:`_still_moving`'s reading of the traces alone: drift, relaxation or a finite split-R̂."""
    if verdict.failed.keys() & {"drift", "relaxation"}:
        return True
    rhat = "rhat" in verdict.failed and math.isfinite(verdict.rhat)
    return rhat and not (config.step_size is not None and config.auto)


def _metric_frozen_at(config: SamplerConfig) -> int:
    """The step from which the RMSProp preconditioner stays as it is: halfway through the first
    burn-in, whose second half settles the chains under the final metric (and the η checks there
    need none: the automatic η bounds the largest preconditioned step, 1/rms_eps), and an extended
    burn-in settles them further. Review 43 F1 (λ = 5, 16 chains, burn-in 20k, 40k draws): frozen at
    the first draw, the chains began the draws in the law the adapting metric had led them to
    (≈ |∂U|·e^{−U}) and the first 5k draws read λ̂ 7.71 ± 0.63; frozen at 3/4 of the burn-in, 5.81 ±
    0.52 (all draws 5.09 ± 0.22); frozen halfway, 4.91 ± 0.45 (all 4.95 ± 0.26)."""
    return config.initial_burnin // 2


def _settle_steps(config: SamplerConfig) -> int:
    """Steps an extended burn-in runs after its η check: as many as the first burn-in ran under its final η."""
    return config.initial_burnin - int(config.initial_burnin * ADAPT_AT[-1])


def _burnin_refusal(config: SamplerConfig, run: SamplerConfig, dynamics: Dynamics, state: SamplerState,
                    eta0: float) -> str:
    """Why ``burnin="auto"`` extends the burn-in no further ("" when it may): its budget, or a burn-in
    whose cumulative step s already has s·γ ≥ FLAT_RELAXATION (nothing left that it could relax)."""
    s_burnin = _cumulative_step(eta0, state.extra.get("adaptations", []), run.burnin)
    if dynamics.gamma > 0 and s_burnin * dynamics.gamma >= FLAT_RELAXATION:
        return (f"burn-in not extended further: its cumulative step s = {s_burnin:.3g} has s·γ = "
                f"{s_burnin * dynamics.gamma:.3g} ≥ {FLAT_RELAXATION:g}, so even the directions only γ holds have relaxed")
    if _burnin_budget_spent(config, state):
        return f"burn-in budget spent: max_burnin = {config.burnin_budget:,} steps (burn-in {run.burnin:,})"
    return ""


def _burnin_budget_spent(config: SamplerConfig, state: SamplerState) -> bool:
    """Whether another extension of the burn-in would pass ``max_burnin``."""
    return state.step + _settle_steps(config) > config.burnin_budget


def _past_time_limit(config: SamplerConfig, records: ChainRecords, steps: int, started: float, world: int) -> bool:
    """Whether ``steps`` more steps, at the sampling speed so far, would end past ``time_limit``."""
    if config.time_limit is None:
        return False
    elapsed = time.perf_counter() - started
    elapsed = max_over_ranks(elapsed) if world > 1 else elapsed
    return elapsed + steps * records.wall_s / max(records.steps_done, 1) > config.time_limit


def _run_further(
    target: SamplingTarget, selection: Selection, run: SamplerConfig, dynamics: Dynamics, state: SamplerState,
    more: int, loss_grad: LossGrad, checkpointer: Checkpointer | None, seed: int, my_chains: list[int],
    stop_after: int | None, bar, checks: list[int], save: bool = False,
) -> tuple[SamplerState, Dynamics]:
    """Continue the chains by ``more`` steps, to the end of ``run`` (its trace grown to hold them);
    ``save``: checkpoint the grown state first (it holds a decision a resumed run must find)."""
    state.grow(len(state.trace) + more)
    dynamics = replace(dynamics, steps=run.steps)
    if checkpointer is not None:
        checkpointer.steps = run.steps  # it writes at the end of the run
        if save:
            checkpointer.save(state)
    bar.total = run.steps
    bar.refresh()
    return _sample_with_burnin_adaptation(target, selection, run, dynamics, state, loss_grad, checkpointer, seed,
                                          my_chains, stop_after, bar, checks)


def _extend_burnin(
    target: SamplingTarget, selection: Selection, config: SamplerConfig, run: SamplerConfig, dynamics: Dynamics,
    state: SamplerState, verdict: Convergence, loss_grad: LossGrad, checkpointer: Checkpointer | None, seed: int,
    my_chains: list[int], stop_after: int | None, bar, checks: list[int],
) -> tuple[SamplerState, Dynamics, SamplerConfig]:
    """``burnin="auto"``: the draws so far become burn-in (an automatic η re-adapted at the chains by
    the caller), the chains settle under it for :func:`_settle_steps` steps, and a first block of
    draws follows. The extension is recorded in ``state.extra`` (``"burnin"``, the
    burn-in now; ``"burnin_extensions"``) and checkpointed, so a resumed run continues from it."""
    at = state.step
    burnin = at + _settle_steps(config)
    state.extra["burnin"] = burnin
    state.extra["burnin_extensions"].append({
        "step": at, "burnin": burnin, "failed": sorted(verdict.failed), "drift": verdict.drift, "rhat": verdict.rhat,
        "step_size": dynamics.step_size})
    run = config.fixed(config.first_draws, burnin)
    state, dynamics = _run_further(target, selection, run, dynamics, state, run.steps - at, loss_grad, checkpointer,
                                   seed, my_chains, stop_after, bar, checks, save=True)
    return state, dynamics, run


def _result(
    target: SamplingTarget, selection: Selection, config: SamplerConfig, nb: float, choice: StepSizeChoice, source: str,
    dynamics: Dynamics, adaptations: list[dict], end: Curvature, records: ChainRecords, loss_grad: LossGrad,
    world: int, gamma_source: str, budget: dict | None = None, burnin_record: dict | None = None,
) -> LLCResult:
    """λ̂ from the gathered chains (llc_result.py), the warnings its diagnostics call for, and the result.

    ``config`` has the run's burn-in (for ``burnin="auto"``: as extended) and draws (for
    ``draws="auto"``: all blocks'); ``dynamics`` the final η and the γ sampled at; ``end`` the top
    curvature, Hessian trace and minibatch gradients' spread at the chains' end points; ``gamma_source`` how γ was set;
    ``budget`` is what the ``draws="auto"`` budget did (None for a fixed number of draws) and
    ``burnin_record`` what ``burnin="auto"`` did (None for a given burn-in)."""
    chains, bias_target = config.chains, config.bias_bound
    eta, gamma, rms_factor = dynamics.step_size, dynamics.gamma, config.rms_factor
    h_end, trace_end, spread_end = end.h_max, end.trace, end.spread
    steps_done = records.steps_done
    # Interrupted on purpose (_stop_after): report what was sampled so far.
    burnin_used = config.burnin if steps_done >= config.steps else min(config.burnin, max(steps_done - 1, 0))
    per_chain, mean, std, chain_stderr = chain_estimates(records.losses, nb, burnin_used, records.failed_at)
    failed = records.failed()
    # bias_bound sets only an automatic η (audit 14a F11: it was named beside a given step_size too).
    step = f"step_size (now {eta:.3g})" if source == "given" else f"step_size (now {eta:.3g}) or bias_bound (now {bias_target})"
    advice = f"reduce {step}, increase gamma (now {gamma:.4g}), or use a larger loss_scale (smaller nbeta, now {nb:g})"
    # Every warning names its quantity: a sweep or a component table gives one per run (audit 13b).
    quantity = quantity_label(1.0 / nb, gamma, selection.spec)

    def warn(text: str, category: type[Warning]) -> None:
        warn_once(f"{quantity}: {text}", category, stacklevel=4)  # at the caller of behavioral_llc

    if len(failed) == chains:
        raise EstimateFailedError(
            f"{quantity}: all {chains} chains diverged (steps {sorted(failed.values())}); {advice}",
            dict(chains=chains, gamma=gamma, gamma_source=gamma_source, loss=target.loss_name, n_params=selection.n_params,
                 selection=None if selection.spec is None else ", ".join(selection.spec)))
    verdict = assess_convergence(nb * records.losses[burnin_used:].T, failed, virial=records.virial[burnin_used:].T,
                                 n_coordinates=selection.n_params, step_size=eta, gamma=gamma, burnin=config.burnin,
                                 divergence_advice=advice, automatic_step=config.step_size is None)
    # The ± quoted everywhere: the chain means' spread alone covered 32 of 40 exact values at 2σ where
    # about 38 should be (audit 11b), and a few chains can agree by chance where their draws do not.
    stderr = float(larger_stderr(chain_stderr, verdict.mcse))
    caveat = stderr_caveat(chains - len(failed))
    if caveat:
        warn_once(f"{quantity} = {estimate_text(mean, stderr, chains - len(failed))}: {caveat}", RuntimeWarning,
                  stacklevel=3)
    # The predicted bias (stepsize.py) with the run's own λ̂: at the chains' end points, and with the
    # largest curvature and trace measured before sampling (pilots and burn-in checks), the ones the
    # final η was chosen for (the pilots' h_max alone would under-state it).
    bias_end = bias_of_estimate(eta / rms_factor, h_end, trace_end, mean, nb, gamma, spread_end)
    stiff_end = bias_bound_of(eta / rms_factor, h_end, nb, gamma)
    if bias_end > 2 * bias_target:
        # Beyond 100 % the first-order K/(λ̂ − K) no longer sizes the bias (audit 14a F9: 35,710 % printed
        # for +207 %), nor the step that would meet the target.
        smaller = eta * bias_target / min(bias_end, 1.0) if math.isfinite(bias_end) else eta / 10
        size = bias_size(bias_end) or (
            "without bound (the stiffest direction is past the stability limit there)" if stiff_end >= 1 else
            "without bound (the predicted excess K is as large as λ̂ itself)")
        noise = (f"(tr H + 2 nβ S)/(8 (1 − b_max)), with tr H = {trace_end:.3g}, the minibatch gradients' spread S = "
                 f"{spread_end:.3g}" if target.n_batches > 1 else f"tr(H)/(8 (1 − b_max)), with tr H = {trace_end:.3g}")
        warn(
            f"at the end of sampling the chains sit where the step size over-estimates λ̂ {size}: predicted "
            f"K/(λ̂ − K), K = η nβ {noise} and h_max = {h_end:.3g} measured at "
            f"the chains' end points (b_max = η(nβ h_max + γ)/4 = {stiff_end:.2g}), above the {bias_target:.2g} aimed for; "
            + (f"pass a smaller step_size (e.g. {smaller:.2g})" if source == "given" else
               f"pass a smaller step_size (e.g. {smaller:.2g}) or a larger burnin, so that the burn-in's step-size "
               "adaptation sees these regions"),
            RuntimeWarning,
        )
    wall, compile_s = records.wall_s, records.compile_s
    dynamics_eta0 = choice.step_size * (rms_factor if source != "given" else 1.0)
    measured = [a for a in adaptations if math.isfinite(a["h_max"])]
    h_max = max([choice.h_max] + [a["h_max"] for a in measured])
    traces = [t for t in [choice.trace] + [a.get("trace_hessian", float("nan")) for a in measured] if math.isfinite(t)]
    spread = max([choice.gradient_spread] + [a.get("gradient_spread", 0.0) for a in measured])
    if not traces and math.isfinite(trace_end):
        # A given η measures no tr H before sampling: (1.8) where the chains ended, since the
        # stiffest direction's b/(1 − b) alone over-states the bias of a wide spectrum many times.
        traces, h_max, spread = [trace_end], max(h_max, h_end), max(spread, spread_end)
    trace = max(traces) if traces else float("nan")
    bound_chosen = bias_of_estimate(eta / rms_factor, h_max, trace, mean, nb, gamma, spread)
    # The run's bias is the larger of the two: the chains may sit where the curvature is larger than
    # where η was chosen (audit 8a: 4 % at the pilots' curvature, 27 % where a deep linear network's
    # chains ended, the run 13 % high).
    bound = max((b for b in (bound_chosen, bias_end) if not math.isnan(b)), default=float("nan"))
    # One warning for a run that is not converged (it names diverged chains too); diverged chains of
    # a converged run still get their own. A step size that raises λ̂ makes a low-reading failure no lower bound.
    if not verdict.converged:
        spent = "".join(f" ({reason})" for reason in stop_reasons(budget, burnin_record))
        warn_once(verdict.message(mean, quantity, step_biased(bound)) + spent, ConvergenceWarning, stacklevel=3)
    elif failed:
        warn(f"{verdict.divergence}; {advice}", RuntimeWarning)
    stiff = bias_bound_of(eta / rms_factor, h_max, nb, gamma)
    if source != "given" and math.isfinite(trace) and mean > 0 and nb * h_max + gamma > 0:
        # The rule read λ from the pilots, which start at θ* where the loss is smallest: short pilots
        # under-state λ and so η, up to 360× on a regression with pilot_steps = 3 (audit 8a), and the
        # chains then relax that much slower. Said here, where the run's own λ̂ tells.
        allowed = step_size_for(h_max, nb, gamma, bias_target, trace=trace, llc=mean, spread=spread,
                                stiff_bound=config.stiff_bound)
        if eta / rms_factor < allowed / 4:
            warn(f"the step size {eta:.3g} is {allowed * rms_factor / eta:.0f}× below the {allowed * rms_factor:.3g} "
                 f"that the bias target {bias_target:g} allows at the run's λ̂ = {mean:.4g}: the pilots' λ (from "
                 f"{config.pilot_length} steps) was far below it, and the chains relax that much slower; raise "
                 "pilot_steps, or pass that step_size", RuntimeWarning)
    # λ ≤ d/2 for every model: only the sampler's bias (and noise) can put λ̂ above it. A regular model
    # sits at d/2, so the predicted bias and ± are allowed for (audit 14a F10: every default run warned).
    if n_eff_beyond_bias(2 * mean, selection.n_params, bound, 2 * stderr):
        allowed = f"{bound:.0%}" if bound < 1 else "at most 100 % counted: beyond it the prediction sizes nothing"
        warn(f"N_eff = 2λ̂ = {2 * mean:.4g} ± {2 * stderr:.2g} exceeds the {selection.n_params:,} sampled parameters by "
             f"more than the predicted step-size bias ({allowed}) explains, which no model's λ allows (λ ≤ d/2): "
             "the step size biases λ̂ up more than predicted; pass a smaller step_size", RuntimeWarning)
    diagnostics = {
        **choice.to_dict(), "step_size_source": source, "step_size": eta, "step_size_initial": dynamics_eta0,
        "gamma": gamma, "gamma_source": gamma_source, "min_gamma": config.gamma_floor if config.auto_gamma_on else None,
        "h_max_pilot": choice.h_max, "h_max": h_max, "trace_hessian": trace, "gradient_spread": spread,
        "bias_bound": bound, "bias_bound_chosen": bound_chosen, "stiff_bound": stiff,
        "predicted_bias_factor": 1.0 + bound,
        "h_max_end": h_end, "trace_hessian_end": trace_end, "gradient_spread_end": spread_end, "bias_bound_end": bias_end,
        "stiff_bound_end": stiff_end,
        "adaptations": list(adaptations),
        "norms": records.norms, "norm_names": NORMS, "failed_at": records.failed_at, "wall_s": wall,
        # Per chain-step of sampling, without the one-off compilation (its seconds are compile_s).
        "s_per_chain_step": (wall - compile_s) * world / max(chains * steps_done, 1), "n_batches": target.n_batches,
        "compiled": loss_grad.compiled, "compile_s": compile_s, "compile_error": loss_grad.compile_error,
        "n_samples": target.n_samples, "mean_positions_per_batch": target.mean_positions, "world_size": world,
        "steps_done": steps_done, "pilot_steps": 0 if source == "given" else config.pilot_length,
        "cumulative_step": _cumulative_step(dynamics_eta0, adaptations, steps_done),
        "rhat": verdict.rhat, "ess": verdict.ess, "drift": verdict.drift, "n_diverged": verdict.n_diverged,
        "llc_chain_stderr": chain_stderr, "llc_mcse": verdict.mcse, "stderr_caveat": caveat, "relaxation": verdict.relaxation,
        "relaxation_mcse": verdict.relaxation_mcse,
        "diverged_chains": list(verdict.diverged_chains), "convergence": verdict.to_dict(), "budget": budget,
        "burnin_auto": burnin_record, "burnin_source": _burnin_source(burnin_record),
        "estimate_uses": "minibatch loss at θ_t used for its gradient (weighted by the batch's counted positions), "
                         "averaged over post-burn-in steps",
    }
    return LLCResult(
        llc=mean, llc_std=std, llc_stderr=stderr, llc_per_chain=per_chain, trace=(nb * records.losses).T, nbeta=nb,
        step_size=eta, gamma=float(gamma), chains=chains, draws=config.draws, burnin=config.burnin,
        n_params=selection.n_params, loss=target.loss_name, sampler=config.sampler, failed=failed,
        diagnostics=diagnostics, selection=selection.spec, converged=verdict.converged,
    )


def _gamma_source(config: SamplerConfig, eta: float) -> str:
    """How γ was set, in words (``diagnostics["gamma_source"]``)."""
    if not config.auto_gamma_on:
        return "given"
    window = config.initial_burnin or config.first_draws
    return (f"auto: max(min_gamma = {config.gamma_floor:g}, {GAMMA_RELAXATION:g}/(η · {window:,} steps)) with the "
            f"η chosen for it")


#: What each failed criterion that extends a burn-in says of the draws (``_burnin_source``).
_EXTENDED_FOR = {"drift": "drifted", "relaxation": "had not relaxed", "rhat": "disagreed between chains (R̂)",
                 "step_size": "spread too far for the step (η re-adapted)"}


def _burnin_source(record: dict | None) -> str:
    """How the burn-in was set, in words (``diagnostics["burnin_source"]``)."""
    if record is None:
        return "given"
    n = len(record["extensions"])
    causes = {cause for e in record["extensions"] for cause in e.get("failed", ()) if cause in _EXTENDED_FOR}
    why = " and ".join(_EXTENDED_FOR[c] for c in sorted(causes)) or "still moved"
    grown = (f", extended {n}× to {record['used']:,} while the draws {why}" if n else
             f", not extended ({record['reason']})" if record.get("reason") else ", not extended: the draws did not drift")
    return f"auto: {record['initial']:,} steps{grown} (max_burnin {record['max_burnin']:,})"


def _cumulative_step(eta0: float, adaptations: list[dict], steps_done: int) -> float:
    """s = Σ η over the steps run: the burn-in's pieces at the η each ran with (``eta0`` until the
    first check, then each check's), the rest at the last: the relaxation clock of the directions
    only the prior holds (METHODS §1; s·γ ≳ 3 equilibrates them)."""
    s, start, eta = 0.0, 0, eta0
    for a in adaptations:
        step = min(a["step"], steps_done)
        s += eta * (step - start)
        start, eta = step, a["step_size"]
    return s + eta * max(steps_done - start, 0)
