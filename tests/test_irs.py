"""Incremental randomized smoothing (arq.irs): exactness, soundness, agreement with full certification."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from scipy import stats
from torch import nn

from arq.irs import (
    IRSCache,
    build_cache,
    certify_incremental,
    input_digest,
    resolve_n_p,
)
from arq.smoothing import statistics
from arq.smoothing.core import ABSTAIN, certify
from arq.smoothing.noise import DRAW_ESTIMATE, gaussian_reference, noise_tv_bound

SIGMA = 0.5


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine the threads of small ops mostly wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Threshold(nn.Module):
    """Class 0 iff the first pixel is below ``t`` (class 1 otherwise).

    At x with first pixel 0, ``P(f(x + e) = 0) = Phi(t / sigma)`` exactly, and the smoothed
    classifier's exact radius is ``sigma * Phi^-1(p)`` - a classifier where every bound can be checked.
    """

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold
        self.register_buffer("dummy", torch.zeros(1))
        self.eval()

    def forward(self, x):
        first = x.flatten(1)[:, :1]
        return torch.cat([(first < self.threshold).float(), (first >= self.threshold).float()], dim=1)


def true_p(threshold: float) -> float:
    return float(stats.norm.cdf(threshold / SIGMA))


X = torch.zeros(1, 2, 2)


def test_resolve_n_p_share_and_errors():
    assert resolve_n_p(100_000) == 10_000
    assert resolve_n_p(1000, n_p_share=0.05) == 50
    assert resolve_n_p(1000, n_p=7) == 7
    with pytest.raises(ValueError, match="n_p_share"):
        resolve_n_p(1000, n_p_share=1.5)
    with pytest.raises(ValueError, match="n_p"):
        resolve_n_p(1000, n_p=0)


def test_identical_model_gives_zeta_of_zero_disagreements():
    f = Threshold(0.4)  # p = Phi(0.8) = 0.788 < gamma: IRS branch
    cache = build_cache(f, X, sigma=SIGMA, n=2000, n0=50, alpha=0.001, n_p=300, seed=3, input_index=11)
    entry = cache[11]
    full = certify(f, X, sigma=SIGMA, n=2000, n0=50, alpha=0.001, seed=3, input_index=11)
    assert (entry.prediction, entry.p_lower, entry.count) == (full.prediction, full.p_lower, full.count)
    result = certify_incremental(Threshold(0.4), X, cache, n_p=300, input_index=11)
    zeta = 1.0 - 0.001 ** (1.0 / 300)  # Clopper-Pearson upper bound of 0 out of 300
    assert result.mode == "irs" and result.disagreements == 0
    assert zeta <= result.zeta <= zeta * (1 + 1e-8)  # an upper bound, rounded up (arq.smoothing.statistics)
    assert result.p_lower == statistics.subtract_rounding_down(entry.p_lower, result.zeta, noise_tv_bound(4))
    assert result.radius == pytest.approx(SIGMA * stats.norm.ppf(result.p_lower), rel=1e-12)
    assert result.prediction == 0


def test_disagreements_are_counted_on_the_replayed_samples():
    f, g = Threshold(0.4), Threshold(0.2)
    cache = build_cache(f, X, sigma=SIGMA, n=1000, n0=50, n_p=400, seed=5, input_index=2)
    result = certify_incremental(g, X, cache, n_p=400, input_index=2)
    # disagreement: first noisy pixel in [0.2, 0.4), counted independently from the noise itself
    z = gaussian_reference(4, seed=5, input_index=2, draw=DRAW_ESTIMATE, sample_start=0, count=400)
    first = (z[:, 0] * SIGMA).float()
    expected = int(((first >= 0.2) & (first < 0.4)).sum())
    assert result.disagreements == expected
    assert 0 < expected < 400
    assert result.zeta == pytest.approx(stats.beta.ppf(1 - 0.001, expected + 1, 400 - expected), rel=1e-9)


def test_irs_bound_is_rounded_down_not_to_nearest():
    """``p_A_lower - zeta - delta`` is a lower bound only if its float is never above the real difference;
    round-to-nearest lands half an ulp above it about half the time."""
    inputs = torch.zeros(12, 1, 2, 2)
    indices = list(range(12))
    cache = build_cache(Threshold(0.4), inputs, sigma=SIGMA, n=1000, n0=20, n_p=200, seed=9, input_index=indices)
    results = certify_incremental(Threshold(0.3), inputs, cache, n_p=200, input_index=indices)
    for index, result in zip(indices, results):
        assert result.mode == "irs"
        exact = Fraction(cache[index].p_lower) - Fraction(result.zeta) - Fraction(noise_tv_bound(4))
        assert Fraction(result.p_lower) <= exact < Fraction(math.nextafter(result.p_lower, 1.0))


def test_direct_branch_above_gamma_uses_fresh_samples():
    f = Threshold(1.5)  # p = Phi(3) = 0.99865
    cache = build_cache(f, X, sigma=SIGMA, n=5000, n0=50, n_p=200, seed=1, input_index=0)
    assert cache[0].p_lower >= 0.99
    result = certify_incremental(Threshold(1.4), X, cache, n_p=200, input_index=0)
    assert result.mode == "direct" and math.isnan(result.zeta)
    z = gaussian_reference(4, seed=1, input_index=0, draw=DRAW_ESTIMATE, sample_start=5000, count=200)
    k = int(((z[:, 0] * SIGMA).float() < 1.4).sum())
    expected = stats.beta.ppf(0.001, k, 200 - k + 1) - noise_tv_bound(4)
    assert result.p_lower == pytest.approx(expected, rel=1e-9)
    # forcing the IRS branch (gamma = 1 - tiny) is worse here: zeta >= 1 - 0.001^(1/200) = 0.034
    forced = certify_incremental(Threshold(1.4), X, cache, n_p=200, input_index=0, gamma=0.999999)
    assert forced.mode == "irs" and forced.p_lower < result.p_lower


def test_abstained_input_stays_abstained_without_sampling():
    f = Threshold(0.0)  # p = 1/2: f abstains
    cache = build_cache(f, X, sigma=SIGMA, n=500, n0=20, n_p=50, seed=0, input_index=0)
    result = certify_incremental(f, X, cache, input_index=0)
    assert (result.prediction, result.radius, result.mode, result.n_p) == (ABSTAIN, 0.0, "abstain", 0)


def test_too_large_n_p_needs_the_original_model():
    f = Threshold(0.3)
    cache = build_cache(f, X, sigma=SIGMA, n=400, n0=20, n_p=40, seed=0, input_index=0)
    with pytest.raises(ValueError, match="original=f"):
        certify_incremental(f, X, cache, n_p=80, input_index=0)
    result = certify_incremental(f, X, cache, n_p=80, input_index=0, original=f)
    assert result.disagreements == 0 and result.n_p == 80
    with pytest.raises(ValueError, match="gamma"):
        certify_incremental(f, X, cache, gamma=1.0, input_index=0)
    with pytest.raises(KeyError, match="input_index 9"):
        certify_incremental(f, X, cache, input_index=9)


def test_an_original_other_than_the_cached_model_is_refused():
    """zeta bounds the disagreement between f' and ``original``; p_A_lower is about the cache's f. With
    another model as ``original`` the two bounds are about different models: here f' = g agrees with
    itself on every sample (zeta small), so IRS would certify g at f's p_A_lower (P(f = 0) = Phi(2),
    radius ~0.9 after the bounds) while the smoothed g has P(g = 0) = Phi(0.2) (radius 0.1). The
    recomputed predictions on the cached samples expose it, so the call is refused."""
    certified = torch.zeros(1, 2, 2)
    certified[0, 0, 0] = -1.0
    f, g = Threshold(0.0), Threshold(-0.9)
    cache = build_cache(f, certified, sigma=SIGMA, n=2000, n0=50, n_p=100, input_index=0)
    with pytest.raises(ValueError, match="not the model the cache was built from"):
        certify_incremental(g, certified, cache, n_p=400, gamma=0.999, input_index=0, original=g)
    result = certify_incremental(g, certified, cache, n_p=400, gamma=0.999, input_index=0, original=f)
    assert result.mode == "irs" and result.disagreements > 0  # g differs from f: zeta accounts for it
    assert result.radius < 0.5 * stats.norm.ppf(cache[0].p_lower)


def test_cache_round_trip(tmp_path):
    f = Threshold(0.3)
    cache = build_cache(f, torch.zeros(3, 1, 2, 2), sigma=SIGMA, n=300, n0=20, n_p=30, seed=4, input_index=[5, 6, 9])
    path = tmp_path / "cache.pt"
    cache.save(path)
    loaded = IRSCache.load(path)
    assert sorted(loaded.entries) == [5, 6, 9] and loaded.n == 300 and loaded.seed == 4
    for index in (5, 6, 9):
        assert loaded[index].p_lower == cache[index].p_lower
        assert torch.equal(loaded[index].predictions, cache[index].predictions)
        assert loaded[index].input_digest == cache[index].input_digest is not None


def test_an_input_other_than_the_cached_one_is_refused():
    """The cache entry's p_A_lower and c_A are about one image: with another image under its index, the
    path that recomputes f's predictions (original=f) bounded the disagreement on the new image and
    subtracted it from the old image's p_A_lower. Here that certified radius 0.76 at a point whose smoothed
    classifier has radius 0.1 (P(f(x' + e) = 0) = Phi(0.2)); now such a call is refused."""
    f = Threshold(0.0)
    certified = torch.zeros(1, 2, 2)
    certified[0, 0, 0] = -1.0  # P(f = 0) = Phi(2)
    other = torch.zeros(1, 2, 2)
    other[0, 0, 0] = -0.1  # P(f = 0) = Phi(0.2): the true radius is 0.5 * 0.2 = 0.1
    cache = build_cache(f, certified, sigma=SIGMA, n=2000, n0=50, n_p=10, input_index=0)
    with pytest.raises(ValueError, match="x for input_index 0 is not the input the cache certified"):
        certify_incremental(f, other, cache, n_p=200, input_index=0, original=f)
    # a batch given without its indices is caught the same way (it took entries 0.. for other images)
    pair = torch.stack([certified, other])
    cache = build_cache(f, pair, sigma=SIGMA, n=500, n0=20, n_p=50)
    with pytest.raises(ValueError, match="input_index 0"):
        certify_incremental(f, pair[1:], cache)
    # the same image, on another device or dtype, is accepted
    result = certify_incremental(f, pair[1:].double(), cache, input_index=[1])
    assert result[0].disagreements == 0


def test_caches_saved_without_input_digests_still_load(tmp_path):
    cache = build_cache(Threshold(0.3), torch.zeros(2, 1, 2, 2), sigma=SIGMA, n=300, n0=20, n_p=30, seed=4)
    data = cache.to_dict()
    assert data["input_digest"] == [input_digest(torch.zeros(1, 2, 2))] * 2
    del data["input_digest"]
    data["format_version"] = 1
    legacy = IRSCache.from_dict(data)
    assert legacy[0].input_digest is None and legacy[0].p_lower == cache[0].p_lower
    certify_incremental(Threshold(0.3), torch.ones(1, 2, 2), legacy, input_index=[0])  # nothing to check against


def test_soundness_failure_rate_on_known_classifiers():
    """Many trials at loose alpha = alpha_zeta = 0.1 with exactly known p_A': the IRS bound
    ``p_A_lower - zeta`` may exceed the true ``P(f'(x + e) = c_A)`` in at most alpha + alpha_zeta
    of the trials; a bound that ignores the disagreement (zeta = 0) fails far more often."""
    alpha = alpha_zeta = 0.1
    t_f, t_g = 0.3, 0.2  # f' is f with a perturbed threshold: p_A' = Phi(0.4) < p_A = Phi(0.6)
    p_g = true_p(t_g)
    trials = 300
    inputs = torch.zeros(trials, 1, 2, 2)
    cache = build_cache(Threshold(t_f), inputs, sigma=SIGMA, n=200, n0=20, alpha=alpha, n_p=100, seed=7,
                        input_index=list(range(trials)), batch_size=500)
    results = certify_incremental(Threshold(t_g), inputs, cache, n_p=100, alpha_zeta=alpha_zeta,
                                  input_index=list(range(trials)), batch_size=500)
    failures = sum(1 for r in results if r.prediction not in (ABSTAIN, 0) or (r.prediction == 0 and r.p_lower > p_g))
    certified = sum(1 for r in results if r.prediction == 0)
    naive_failures = sum(1 for i in range(trials) if cache[i].prediction == 0 and cache[i].p_lower > p_g)
    print(f"failures {failures}, certified {certified}, naive failures {naive_failures}")
    assert all(r.mode in ("irs", "abstain") for r in results)
    # binomial(300, 0.2) exceeds 0.2 * 300 + 3 sd = 81 with probability ~1e-3; typically far fewer
    assert failures <= 81
    assert certified >= 100  # not sound by abstaining everywhere
    assert naive_failures >= 150  # the test can tell a bound that ignores zeta


def test_direct_branch_failure_rate_on_known_classifiers(monkeypatch):
    """The branch above gamma: the bound on ``P(f'(x + e) = c_A)`` from n_p fresh samples may exceed the
    true value in at most alpha of the trials (given the branch: the fresh samples are independent of
    f's certificate, which chose it); the point estimate k / n_p exceeds it in about half."""
    alpha = 0.1
    p_g = true_p(0.9)  # f' = Threshold(0.9): P(f'(x + e) = 0) = Phi(1.8) = 0.964; f has Phi(2) = 0.977
    trials = 300
    inputs = torch.zeros(trials, 1, 2, 2)
    indices = list(range(trials))
    cache = build_cache(Threshold(1.0), inputs, sigma=SIGMA, n=200, n0=20, alpha=alpha, n_p=10, seed=8,
                        input_index=indices, batch_size=500)

    def failures():
        results = certify_incremental(Threshold(0.9), inputs, cache, n_p=100, gamma=0.9, input_index=indices,
                                      batch_size=500)
        direct = [r for r in results if r.mode == "direct"]
        assert len(direct) > trials // 2
        return sum(1 for r in direct if r.prediction != 0 or r.p_lower > p_g)

    # binomial(300, 0.1) exceeds 30 + 3 sd = 46 with probability ~1e-3
    assert failures() <= 46
    monkeypatch.setattr(statistics, "clopper_pearson_lower", lambda k, n, alpha: k / n)
    assert failures() > 2 * alpha * trials  # the test can tell an unsound bound


def _train_tiny_mnist(seed: int = 0):
    from arq.data import get_dataset

    torch.manual_seed(seed)
    # test images 5000..6499 train it (loading the 60,000 training images would cost more than the test)
    images, labels = get_dataset("mnist", "test").get_batch(torch.arange(5000, 6500))
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(6):
        for batch in torch.randperm(1500, generator=generator).split(100):
            noisy = images[batch] + SIGMA * torch.randn(images[batch].shape, generator=generator)
            loss = nn.functional.cross_entropy(model(noisy), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    model.arq_metadata = {"sigma": SIGMA, "num_classes": 10, "dataset": "mnist", "arch": "mlp"}
    return model, images


def test_agreement_with_full_certification_on_quantized_mnist():
    from arq.data import get_dataset
    from arq.quant import Policy, quantize

    model, train_images = _train_tiny_mnist()
    test = get_dataset("mnist", "test")
    indices = list(range(0, 400, 20))
    x = torch.stack([test[i][0] for i in indices])
    labels = [int(test[i][1]) for i in indices]
    n, n_p = 2000, 400
    cache = build_cache(model, x, n=n, n0=50, n_p=n_p, seed=0, input_index=indices)
    for bits in (8, 4):
        quantized = quantize(model, Policy.uniform(model, bits, bits), train_images[:256])
        full = certify(quantized, x, n=n, n0=50, seed=0, input_index=indices)
        fast = certify_incremental(quantized, x, cache, n_p=n_p, input_index=indices)
        acr_full = sum(c.radius for c, y in zip(full, labels) if c.prediction == y) / len(indices)
        acr_fast = sum(c.radius for c, y in zip(fast, labels) if c.prediction == y) / len(indices)
        both = [(a, b) for a, b in zip(full, fast) if a.prediction != ABSTAIN and b.prediction != ABSTAIN]
        assert all(a.prediction == b.prediction for a, b in both)
        assert len(both) >= 0.7 * len(indices)
        acc_full = sum(c.prediction == y for c, y in zip(full, labels)) / len(indices)
        acc_fast = sum(c.prediction == y for c, y in zip(fast, labels)) / len(indices)
        assert abs(acc_full - acc_fast) <= 0.15, (bits, acc_full, acc_fast)
        assert 0.6 * acr_full <= acr_fast <= 1.05 * acr_full, (bits, acr_full, acr_fast)
        if bits == 8:
            zetas = [c.zeta for c in fast if c.mode == "irs"]
            assert all(z < 0.05 for z in zetas)  # int8 barely changes the predictions


def test_quantized_f_is_certified_as_the_model_its_predictions_come_from(monkeypatch):
    """A quantized f: ``arq.certify`` alone would run its integer model; the cache's certificate and
    its replayed predictions must come from one model (the inequality of the module docstring), so
    build_cache certifies the fake-quant model itself. With n_p = n the cached predictions are the
    certificate's n estimation samples: its count is their vote for its class, exactly."""
    import arq.irs as irs
    from arq.quant import Policy, quantize

    generator = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 10 * 10, 3)).eval()
    x = torch.rand(3, 1, 12, 12, generator=generator)
    quantized = quantize(model, Policy.uniform(model, 3, 3), torch.rand(64, 1, 12, 12, generator=generator))
    backends = []
    real_certify = irs.certify
    monkeypatch.setattr(irs, "certify", lambda *a, **k: backends.append(k["backend"]) or real_certify(*a, **k))
    n = 400
    cache = build_cache(quantized, x, sigma=SIGMA, n=n, n0=20, n_p=n, seed=4, backend="auto")
    assert backends == ["torch"]
    for index in range(3):
        entry = cache[index]
        if entry.prediction != ABSTAIN:
            assert entry.count == int((entry.predictions == entry.prediction).sum())
    build_cache(model, x, sigma=SIGMA, n=n, n0=20, n_p=10, seed=4, backend="auto")  # a float f: as asked
    assert backends == ["torch", "auto"]


def _integer_engine_available() -> bool:
    from arq._ext import compiled_ops_available

    return compiled_ops_available() and "onednn" in torch.backends.quantized.supported_engines


@pytest.mark.skipif(not _integer_engine_available(), reason="needs arq._C and torch's oneDNN quantized engine")
@pytest.mark.parametrize("backend, execution", [("auto", "auto"), ("auto", "as given"), ("torch", "auto")])
def test_quantized_candidate_runs_as_certify_runs_it(backend, execution):
    """f' runs as ``arq.certify`` runs it: with "auto" on CPU its integer model (entered at its first layer's
    input codes), with "torch" the fake-quant model; ``execution="as given"`` runs the fake-quant model under
    any noise backend. IRS's disagreements and the direct branch's votes are that model's on exactly f's
    samples, recomputed here from the float noisy images (a different sample changes them)."""
    from arq.quant import Policy, quantize
    from arq.quant.execution import IntegerExecutionConfig, to_integer
    from arq.smoothing import engine, statistics
    from arq.smoothing.noise import noisy_batch

    generator = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 5 * 5, 3)).eval()
    x = torch.rand(4, 1, 12, 12, generator=generator)
    quantized = quantize(model, Policy.uniform(model, 3, 3), torch.rand(128, 1, 12, 12, generator=generator))
    n, n_p, seed = 600, 300, 5
    cache = build_cache(model, x, sigma=SIGMA, n=n, n0=30, n_p=n_p, seed=seed)
    integer = backend == "auto" and execution == "auto"
    if integer:
        ran, tag = engine.prepare_model(quantized, "cpp", "cpu")  # cached: the object IRS will call
        assert tag == "+int8" and ran.input_codes is not None  # the codes entry is exercised
        expected_model, expected_backend = to_integer(quantized, IntegerExecutionConfig(compile=False)), "cpp+int8"
    else:
        ran, expected_model = quantized, quantized
        expected_backend = "cpp+fakequant" if backend == "auto" else "torch"
    seen = []  # what the model IRS should run was given: (dtype, samples)
    ran.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].dtype, inputs[0].shape[0])))

    def expected_predictions(one, index, start):
        with torch.inference_mode():
            images = noisy_batch(one, SIGMA, seed=seed, input_index=index, draw=DRAW_ESTIMATE, sample_start=start,
                                 count=n_p, backend="torch")
            return expected_model(images).argmax(dim=1)

    modes = set()
    for gamma in (0.99, 0.5 + 1e-9):  # the IRS branch below 0.99, the direct one for every non-abstained input
        seen.clear()
        results = certify_incremental(quantized, x, cache, n_p=n_p, gamma=gamma, backend=backend, execution=execution)
        assert {dtype for dtype, _ in seen} == {torch.uint8 if integer else torch.float32}
        assert sum(count for _, count in seen) == sum(r.n_p for r in results)
        for index, (one, result) in enumerate(zip(x, results)):
            assert result.backend == expected_backend
            entry = cache[index]
            modes.add(result.mode)
            if result.mode == "irs":
                assert result.disagreements == int((expected_predictions(one, index, 0) != entry.predictions).sum())
            elif result.mode == "direct":
                votes = int((expected_predictions(one, index, n) == entry.prediction).sum())
                bound = statistics.clopper_pearson_lower(votes, n_p, cache.alpha) - noise_tv_bound(one.numel())
                assert result.p_lower == pytest.approx(max(bound, 0.0) if bound < 0.5 else bound, abs=1e-12)
    assert {"irs", "direct"} <= modes
    with pytest.raises(ValueError, match="execution must be one of"):
        certify_incremental(quantized, x, cache, n_p=n_p, execution="integer")
