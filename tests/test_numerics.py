"""The package's one rank rule and compute-dtype rule (tl_degeneracy/numerics.py, METHODS §2)."""

import pytest
import torch

from tl_degeneracy.numerics import compute_dtype, numerical_rank, rank_rtol


def test_rank_rule_is_max_dim_times_eps_on_singular_values_and_its_square_on_gram_eigenvalues():
    eps = torch.finfo(torch.float64).eps
    assert rank_rtol(768) == 768 * eps
    assert rank_rtol((768, 64)) == 768 * eps
    # Gram eigenvalues: the square of the precision's cut-off, floored by the float64 eigensolver's error.
    assert rank_rtol(64, gram=True) == 64 * eps
    eps32 = torch.finfo(torch.float32).eps
    assert rank_rtol(10, precision=torch.float32) == 10 * eps32
    assert rank_rtol(768, precision=torch.float32, gram=True) == (768 * eps32) ** 2
    with pytest.raises(ValueError, match="non-negative"):
        rank_rtol((-1,))


def test_rank_of_an_exact_low_rank_product_in_float64_whatever_the_storage_dtype():
    # A rank-5 product of bfloat16 factors: the factors are exact float64 numbers, so the product
    # formed in float64 has exactly 5 singular values above the float64 cut-off.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(768, 5, generator=g).to(torch.bfloat16).double()
    b = torch.randn(5, 768, generator=g).to(torch.bfloat16).double()
    s = torch.linalg.svdvals(a @ b)
    assert int(numerical_rank(s, dims=(768, 768))) == 5
    # The Gram of the same matrix (eigenvalues σ²) gives the same rank with gram=True.
    lam = torch.linalg.eigvalsh((a @ b) @ (a @ b).T).flip(-1)
    assert int(numerical_rank(lam, dims=768, gram=True)) == 5


def test_rank_per_group_overrides_and_edge_cases():
    spectra = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1e-20, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert numerical_rank(spectra).tolist() == [2, 1, 0]
    assert numerical_rank(spectra, rtol=0.5).tolist() == [1, 1, 0]
    assert numerical_rank(spectra, atol=2.0).tolist() == [1, 0, 0]
    assert numerical_rank(torch.zeros(4, 0)).tolist() == [0, 0, 0, 0]


def test_compute_dtype_is_float64_only_when_an_input_is():
    assert compute_dtype(torch.bfloat16) == torch.float32
    assert compute_dtype(torch.float16, torch.float32) == torch.float32
    assert compute_dtype([torch.float32, torch.float64]) == torch.float64
    assert compute_dtype() == torch.float32


def test_half_precision_activations_are_ranked_at_float32_with_a_warning():
    from tl_degeneracy.numerics import HalfPrecisionWarning, activation_precision

    with pytest.warns(HalfPrecisionWarning, match="upper bounds.*float32"):
        assert activation_precision(torch.bfloat16) == torch.float32
    assert activation_precision(torch.float64) == torch.float64


def test_activation_stats_of_a_bfloat16_model_warn_and_record_their_dtype():
    import tl_degeneracy as tld
    from tests.fixtures.toys import make_tiny_toy_transformer
    from tl_degeneracy.numerics import HalfPrecisionWarning

    model = make_tiny_toy_transformer().to(torch.bfloat16)
    stats = tld.activation_stats(model, torch.randint(0, 20, (4, 8)), hooks=["resid_pre"], progress=False)
    s = stats["blocks.0.hook_resid_pre"]
    assert s.dtype == torch.bfloat16
    with pytest.warns(HalfPrecisionWarning):
        assert s.precision == torch.float32


def test_rank_band_spreads_only_without_a_gap():
    """Audit 4: a spectrum with a gap around the rule's cut-off has one rank whatever the cut-off
    within CUTOFF_BAND; one that decays smoothly through it (toy:modadd's float32 MLP input: 84 of
    128 directions above the float32 rule, 128 resolved in float64) gives the spread that the rank's
    choice of cut-off decides."""
    from tl_degeneracy.numerics import CUTOFF_BAND, rank_band, rank_rtol

    cut = rank_rtol(64, torch.float32, gram=True)
    gap = torch.cat([torch.ones(40, dtype=torch.float64), torch.full((24,), cut * 1e-6, dtype=torch.float64)])
    assert rank_band(gap, precision=torch.float32, gram=True) == (40, 40, 40)
    smooth = torch.logspace(0, -16, 64, dtype=torch.float64)  # a decade every 4 eigenvalues
    low, mid, high = rank_band(smooth, precision=torch.float32, gram=True)
    assert low < mid < high and mid == int((smooth > cut).sum())
    assert low == int((smooth > cut * CUTOFF_BAND).sum()) and high == int((smooth > cut / CUTOFF_BAND).sum())


def test_rank_band_never_counts_below_the_float64_floor():
    """Audit 5: in a float64 model the band's lower cut-off (the rule's / 100) fell below the float64
    eigensolver's own error, so kfac_max counted exact zeros (LayerNorm's mean direction: a W_O's
    rank_K 15 → 16). Below float64's rule nothing is resolved: the band stops there."""
    from tl_degeneracy.numerics import rank_band, rank_rtol

    floor = rank_rtol(16, torch.float64, gram=True)  # 16·eps64
    spectrum = torch.cat([torch.ones(15, dtype=torch.float64), torch.tensor([floor / 10], dtype=torch.float64)])
    assert rank_band(spectrum, precision=torch.float64, gram=True) == (15, 15, 15)
    # in float32 the rule's cut-off is far above the floor, and the band moves it both ways
    cut = rank_rtol(16, torch.float32, gram=True)
    weak = torch.cat([torch.ones(15, dtype=torch.float64), torch.tensor([cut / 10], dtype=torch.float64)])
    assert rank_band(weak, precision=torch.float32, gram=True) == (15, 15, 16)


def test_a_covariance_s_rounding_band_is_set_by_its_mean():
    """Audit 17a F1: activations 32 + a rank-3 spread of order 1, rounded to bfloat16 (eps·32 each):
    their covariance's rounding sits near eps²·E[f²], ~500× above eps²·λ₁(covariance), which left the
    whole band at the rounded rank 24. With the second moment as the noise scale (rank_band, and the
    interaction basis's whitening) the band's fewest directions are the true 3."""
    from tl_degeneracy.interaction.basis import whiten
    from tl_degeneracy.numerics import rank_band, rounding_rtol

    g = torch.Generator().manual_seed(0)
    x = (32 + torch.randn(2000, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 24, generator=g, dtype=torch.float64))
    x = x.to(torch.bfloat16).double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / len(x)
    spectrum = torch.linalg.eigvalsh(cov).flip(0)
    noise = rounding_rtol(torch.bfloat16, gram=True)
    rtol = rank_rtol(24, torch.float32, gram=True)
    assert rank_band(spectrum, 24, precision=torch.float32, gram=True, noise_rtol=noise) == (24, 24, 24)
    second = float((x * x).mean(0).max())
    assert rank_band(spectrum, 24, precision=torch.float32, gram=True, noise_rtol=noise, noise_scale=second)[0] == 3
    # never below the spectrum's own scale: an uncentred Gram's band is unchanged
    gram = x.T @ x / len(x)
    top = torch.linalg.eigvalsh(gram).flip(0)
    assert rank_band(top, 24, precision=torch.float32, gram=True, noise_rtol=noise, noise_scale=second) == \
        rank_band(top, 24, precision=torch.float32, gram=True, noise_rtol=noise)
    assert whiten(cov, mean, rtol, 0.0, noise).band[0] == 3


@pytest.mark.parametrize("offset", [0.0, 4000.0])
def test_a_float32_covariance_is_ranked_above_its_rounding_mean_included(offset):
    """Audit 21b F1: activations 4000 + a rank-3 spread of order 5, rounded to float32 (eps·4000 each):
    their covariance's rounding eigenvalues, 5.6·10⁻⁹, lie far above float32's cut-off relative to
    λ₁(covariance), (24·eps)²·λ₁ ≈ 3·10⁻¹⁰, and counted as 21 more directions. Above the most that
    rounding can add, eps²·Σ E[f_i²] (numerics.covariance_floor), the rank is the true 3, as it is
    without the mean; the activation statistics and the interaction basis rank so."""
    from tl_degeneracy.interaction.basis import whiten
    from tl_degeneracy.numerics import covariance_floor, rank_band
    from tl_degeneracy.stats.gram_stats import HookStats

    g = torch.Generator().manual_seed(0)
    x = offset + torch.randn(4000, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 24, generator=g, dtype=torch.float64)
    x = x.to(torch.float32).double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / len(x)
    spectrum = torch.linalg.eigvalsh(cov).flip(0)
    floor = covariance_floor(torch.float32, cov.diagonal() + mean**2)
    assert floor == pytest.approx(torch.finfo(torch.float32).eps ** 2 * float((x * x).mean(0).sum()), rel=1e-9)
    assert rank_band(spectrum, 24, precision=torch.float32, gram=True)[1] == (24 if offset else 3)
    assert rank_band(spectrum, 24, precision=torch.float32, gram=True, rounding=floor) == (3, 3, 3)
    assert whiten(cov, mean, rank_rtol(24, torch.float32, gram=True), 0.0, rounding=floor).rank == 3
    stats = HookStats(name="h", kind="resid", layer=0, count=len(x), distinct=len(x), unit="position",
                      feature_shape=(24,), mean=mean, centered=True, cov=cov, dtype=torch.float32)
    assert stats.rank() == 3 and stats.rank(centered=False) == 4 - int(offset == 0)
    assert stats.rank(rtol=rank_rtol(24, torch.float32, gram=True)) == (24 if offset else 3)  # a cut-off given is kept


def test_a_float64_covariance_keeps_directions_far_below_its_mean():
    """The floor is float64's where the forward is: a direction 10⁻⁹ of a mean's size, far above
    float64's rounding, still counts (the relative rule's λ₁ stays the covariance's)."""
    from tl_degeneracy.stats.gram_stats import HookStats

    g = torch.Generator().manual_seed(1)
    x = 1e3 + torch.randn(500, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 8, generator=g, dtype=torch.float64)
    x[:, 0] += 1e-6 * torch.randn(500, generator=g, dtype=torch.float64)
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / len(x)
    stats = HookStats(name="h", kind="resid", layer=0, count=len(x), distinct=len(x), unit="position",
                      feature_shape=(8,), mean=mean, centered=True, cov=cov, dtype=torch.float64)
    assert stats.rank() == 3


@pytest.mark.parametrize("m", [0.0, 10.0, 30.0])
def test_a_moderate_mean_cuts_no_direction_that_float32_resolves(m):
    """Review 51 #1: a first floor, (D·eps)²·max E[f_i²], cut float32 directions 10²–10⁵ times above
    their rounding wherever the mean exceeded the spread (h = W x + b, D = 64, W's singular values
    1 … 10⁻⁵: rank 52 of 64 at a mean of 10, 46 at 30, the band 34–59 leaving 64 out). The floor is now
    the most rounding can add, eps²·Σ E[f_i²]: at a mean of 10 the rank is float64's 64, and where the
    smallest direction nears that bound (a mean of 30) the band still holds it."""
    from tl_degeneracy.numerics import covariance_floor, rank_band

    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0]
    W = ((U * torch.logspace(0, -5, 64, dtype=torch.float64)) @ V.T).float()
    direction = torch.randn(64, generator=g, dtype=torch.float64)
    b = (m * direction / direction.abs().max()).float()
    h = (torch.randn(4000, 64, generator=g).float() @ W.T + b).double()  # the float32 forward
    mean = h.mean(0)
    cov = (h - mean).T @ (h - mean) / len(h)
    spectrum = torch.linalg.eigvalsh(cov).flip(0)
    floor = covariance_floor(torch.float32, cov.diagonal() + mean**2)
    low, rank, high = rank_band(spectrum, 64, precision=torch.float32, gram=True, rounding=floor)
    assert rank == (64 if m <= 10 else rank) and high == 64 and rank >= 60
