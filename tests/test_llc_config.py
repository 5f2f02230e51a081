"""``SamplerConfig``: the sampler's knobs as one object, equivalent to the keywords it groups."""

import dataclasses

import numpy as np
import pytest

from tl_degeneracy.llc import SamplerConfig, behavioral_llc

from .test_llc import linear_regression


def test_a_config_samples_exactly_what_the_keywords_sample():
    model, x = linear_regression(d=3, n=40)
    knobs = dict(chains=3, draws=30, burnin=10, step_size=1e-3, gamma=2.0, sampler="rmsprop", rms_alpha=0.9)
    by_keywords = behavioral_llc(model, x, seed=4, **knobs)
    by_config = behavioral_llc(model, x, seed=4, config=SamplerConfig(**knobs))
    np.testing.assert_array_equal(by_config.trace, by_keywords.trace)
    a, b = by_config.summary(), by_keywords.summary()
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a), (a, b)  # NaN (not measured) on both


def test_keywords_override_the_config_and_bad_knobs_are_refused():
    model, x = linear_regression(d=3, n=40)
    config = SamplerConfig(chains=4, draws=20, burnin=5, step_size=1e-3)
    res = behavioral_llc(model, x, chains=2, config=config)
    assert (res.chains, res.draws, res.burnin) == (2, 20, 5)
    with pytest.raises(TypeError, match="unknown sampler option"):
        behavioral_llc(model, x, config=config, chain=3)
    with pytest.raises(ValueError, match="bias_bound"):
        SamplerConfig(bias_bound=1.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.chains = 3
