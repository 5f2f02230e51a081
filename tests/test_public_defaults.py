"""The public analyses agree on the defaults a notebook user sees first (audit 13b F16)."""

import inspect

import tl_degeneracy as tld


def test_every_public_analysis_that_streams_data_shows_progress_by_default():
    functions = {name: getattr(tld, name) for name in tld.__all__ if inspect.isfunction(getattr(tld, name))}
    takes_progress = {name: f for name, f in functions.items() if "progress" in inspect.signature(f).parameters}
    # the passes over data and the sampler (llc_sweep and llc_by_component pass theirs on to behavioral_llc)
    assert {"activation_stats", "jacobian_stats", "degeneracy_counts", "interaction_basis", "head_synchronization",
            "neuron_synchronization", "sparsify", "behavioral_llc"} <= set(takes_progress)
    defaults = {name: inspect.signature(f).parameters["progress"].default for name, f in takes_progress.items()}
    assert defaults == {name: True for name in takes_progress}
