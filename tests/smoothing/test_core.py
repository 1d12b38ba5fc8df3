import json
import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from scipy import stats

import arq
from arq._ext import compiled_ops_available
from arq.smoothing import core, statistics
from arq.smoothing.noise import noise_tv_bound

BACKENDS = ["torch"] + (["cpp"] if compiled_ops_available() else [])


class LinearThreshold(torch.nn.Module):
    """f(x) = 1 if <w, x> > b else 0, ||w|| = 1.

    Under x + e, e ~ N(0, sigma^2 I): P(f = 1) = Phi((<w, x> - b) / sigma), and the
    smoothed classifier's exact robust radius at x is the distance |<w, x> - b| to the
    hyperplane: the closed form the soundness test checks against.
    """

    def __init__(self, dim, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, generator=generator, dtype=torch.float64)
        self.register_buffer("w", (w / w.norm()).float())
        self.b = 0.1

    def margin(self, x):
        return float((x.double().flatten() @ self.w.double()) - self.b)

    def forward(self, x):
        score = x.flatten(1) @ self.w - self.b
        return torch.stack([-score, score], dim=1)


def _input_with_margin(model, margin, shape, generator):
    x = torch.rand(shape, generator=generator, dtype=torch.float64)
    x = x + (margin - model.margin(x)) * model.w.double().reshape(shape)
    return x.float()


@pytest.mark.parametrize("backend", BACKENDS[-1:])
def test_certify_is_sound_on_a_classifier_with_known_p_a(backend):
    alpha, sigma, shape = 0.1, 0.5, (2, 4, 4)
    model = LinearThreshold(32).eval()
    generator = torch.Generator().manual_seed(7)
    failures = optimistic_failures = certified = 0
    trials = 500
    for trial in range(trials):
        # p_A between 0.55 and 0.99, where bounds are tight and mistakes would show
        p_a = 0.55 + 0.44 * float(torch.rand(1, generator=generator))
        margin = sigma * stats.norm.ppf(p_a) * (1 if trial % 2 else -1)
        x = _input_with_margin(model, margin, shape, generator)
        true_class, true_radius = (1 if model.margin(x) > 0 else 0), abs(model.margin(x))
        cert = arq.certify(model, x, sigma=sigma, n=300, n0=20, alpha=alpha, batch_size=300,
                           input_index=trial, backend=backend)
        if cert.prediction != arq.ABSTAIN:
            certified += 1
            if cert.prediction != true_class or cert.radius > true_radius:
                failures += 1
            # the same counts with the point estimate instead of the bound: must be caught as unsound
            point = min(cert.count / cert.n, 1 - 1e-9)
            if sigma * stats.norm.ppf(point) > true_radius:
                optimistic_failures += 1
    assert certified > trials // 2
    assert failures / trials < alpha
    assert optimistic_failures / trials > 2 * alpha  # the test has the power to see an unsound bound


def test_predict_errs_at_most_alpha_of_the_time_near_a_tie(monkeypatch):
    """PREDICT's guarantee (Cohen et al., Theorem 1): P(returns a class other than g(x)) <= alpha. Worst
    near a tie: here P(f(x + e) = 1) = 0.51, so g(x) = 1, and many trials count how often PREDICT says 0.
    An unsound PREDICT that skips the binomial test (returns the argmax) says 0 in about 40 % of them."""
    alpha, sigma, trials = 0.1, 0.5, 400
    model = LinearThreshold(32).eval()
    x = _input_with_margin(model, sigma * stats.norm.ppf(0.51), (2, 4, 4), torch.Generator().manual_seed(3))
    assert stats.norm.cdf(model.margin(x) / sigma) == pytest.approx(0.51, abs=1e-6)
    batch = x.expand(trials, *x.shape).contiguous()

    def wrong_answers():
        predictions = arq.predict(model, batch, sigma=sigma, n=200, alpha=alpha, batch_size=200,
                                  input_index=list(range(trials)))
        return sum(1 for prediction in predictions if prediction == 0)

    # binomial(400, 0.1) exceeds 40 + 3 sd = 58 with probability ~1e-3; the expected count is about 11
    assert wrong_answers() <= 58
    monkeypatch.setattr(statistics, "binomial_test_pvalue", lambda k, n: 0.0)
    assert wrong_answers() > 2 * alpha * trials  # the test can tell an unsound PREDICT


def test_certificate_fields_follow_the_statistics():
    model = LinearThreshold(32).eval()
    x = _input_with_margin(model, 0.4, (2, 4, 4), torch.Generator().manual_seed(1))
    cert = arq.certify(model, x, sigma=0.5, n=2000, n0=50, alpha=0.01, batch_size=512)
    expected_p = statistics.subtract_rounding_down(statistics.clopper_pearson_lower(cert.count, 2000, 0.01),
                                                   noise_tv_bound(32))
    assert cert.prediction == 1 and cert.p_lower == expected_p
    assert cert.radius == pytest.approx(0.5 * stats.norm.ppf(expected_p), rel=1e-12)
    # true p_A = Phi(0.8) = 0.788: the estimate is close
    assert abs(cert.count / 2000 - stats.norm.cdf(0.8)) < 0.04
    assert (cert.n, cert.n0, cert.sigma, cert.alpha) == (2000, 50, 0.5, 0.01)


def test_abstains_when_the_classes_are_balanced():
    model = LinearThreshold(32).eval()
    x = _input_with_margin(model, 0.0, (2, 4, 4), torch.Generator().manual_seed(2))
    cert = arq.certify(model, x, sigma=0.5, n=1000, n0=50, alpha=0.001)
    assert cert.prediction == arq.ABSTAIN and cert.radius == 0.0 and cert.p_lower < 0.5
    assert arq.predict(model, x, sigma=0.5, n=1000, alpha=0.001) == arq.ABSTAIN


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_do_not_depend_on_batch_size(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5)).eval()
    x = torch.rand(2, 3, 4, 4)
    runs = [arq.certify(model, x, sigma=0.4, n=999, n0=37, batch_size=b, backend=backend) for b in (1000, 64, 7)]
    assert runs[0] == runs[1] == runs[2]
    predictions = [arq.predict(model, x, sigma=0.4, n=500, batch_size=b, backend=backend) for b in (500, 33)]
    assert predictions[0] == predictions[1]


def test_backends_agree():
    if len(BACKENDS) < 2:
        pytest.skip("arq._C not built")
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5)).eval()
    x = torch.rand(3, 4, 4)
    by_backend = [arq.certify(model, x, sigma=0.3, n=700, n0=30, backend=b)._replace(backend="") for b in BACKENDS]
    assert all(c == by_backend[0] for c in by_backend)


def test_batch_gives_a_list_in_order_and_input_index_selects_the_noise():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5)).eval()
    x = torch.rand(3, 3, 4, 4)
    batch = arq.certify(model, x, sigma=0.3, n=400, n0=30, input_index=[5, 9, 2])
    singles = [arq.certify(model, x[i], sigma=0.3, n=400, n0=30, input_index=j) for i, j in enumerate([5, 9, 2])]
    assert isinstance(batch, list) and batch == singles


def test_smooth_is_a_drop_in_that_agrees_with_certify():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 4)).eval()
    x = torch.rand(3, 4, 4)
    smooth = arq.Smooth(model, 4, 0.25)
    prediction, radius = smooth.certify(x, 50, 600, 0.001, 128)
    cert = arq.certify(model, x, sigma=0.25, n=600, n0=50, alpha=0.001, batch_size=128, input_index=0)
    assert (prediction, radius) == (cert.prediction, cert.radius)
    assert smooth.predict(x, 600, 0.001, 128) == arq.predict(model, x, sigma=0.25, n=600, alpha=0.001, input_index=1)
    assert arq.Smooth.ABSTAIN == -1


def test_sigma_defaults_to_the_models_stored_noise_level():
    model = LinearThreshold(32).eval()
    model.arq_metadata = {"sigma": 0.5, "num_classes": 2}
    x = _input_with_margin(model, 0.4, (2, 4, 4), torch.Generator().manual_seed(1))
    assert arq.certify(model, x, n=300, n0=20) == arq.certify(model, x, sigma=0.5, n=300, n0=20)
    with pytest.raises(ValueError, match="sigma is required"):
        arq.certify(LinearThreshold(32).eval(), x, n=10, n0=10)


def test_sample_predictions_replay_the_estimation_samples():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 6)).eval()
    x = torch.rand(3, 4, 4)
    predictions = core.sample_predictions(model, x, sigma=0.5, num=333, draw=1, seed=5, input_index=3,
                                          batch_size=50)
    counts = core.sample_counts(model, x, sigma=0.5, num=333, draw=1, seed=5, input_index=3, batch_size=100,
                                num_classes=6)
    assert torch.equal(torch.bincount(predictions, minlength=6), counts)


def _finite_model():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3)).eval()


@pytest.mark.parametrize("kwargs, message", [
    (dict(sigma=0.0), "sigma"), (dict(sigma=-1.0), "sigma"), (dict(sigma=math.nan), "sigma"),
    (dict(n0=0), "n0"), (dict(n=0), "n must"), (dict(alpha=0.0), "alpha"), (dict(alpha=1.5), "alpha"),
    (dict(batch_size=0), "batch_size"), (dict(num_classes=10), "num_classes=10 disagrees"),
    (dict(seed=-3), "seed"), (dict(backend="fastest"), "backend"),
])
def test_bad_parameters_get_named_errors(kwargs, message):
    arguments = dict(sigma=0.5, n=10, n0=10) | kwargs
    with pytest.raises(ValueError, match=message):
        arq.certify(_finite_model(), torch.rand(3, 4, 4), **arguments)


@pytest.mark.parametrize("x, message", [
    (torch.full((3, 4, 4), math.nan), "NaN or inf"), (torch.full((3, 4, 4), math.inf), "NaN or inf"),
    (torch.rand(4, 4), "shape"), (torch.rand(1, 1, 3, 4, 4), "shape"),
])
def test_bad_inputs_get_named_errors(x, message):
    with pytest.raises(ValueError, match=message):
        arq.certify(_finite_model(), x, sigma=0.5, n=10, n0=10)
    with pytest.raises(ValueError, match=message):
        arq.predict(_finite_model(), x, sigma=0.5, n=10)


def test_the_class_check_runs_once_per_model_version():
    """certify runs the model on one clean input to learn its classes; again only when a parameter
    changes (or the input's shape), and a model whose output no longer fits fails in the votes."""
    model = _finite_model()
    single_calls = []
    model.register_forward_hook(lambda m, args, out: single_calls.append(1) if args[0].shape[0] == 1 else None)
    x = torch.rand(3, 4, 4)
    first = arq.certify(model, x, sigma=0.5, n=50, n0=10, batch_size=25)
    assert arq.certify(model, x, sigma=0.5, n=50, n0=10, batch_size=25) == first
    arq.predict(model, x, sigma=0.5, n=50, batch_size=25)
    assert len(single_calls) == 1
    arq.certify(model, torch.rand(3, 4, 4, dtype=torch.float64).float(), sigma=0.5, n=50, n0=10, batch_size=25)
    assert len(single_calls) == 1  # same shape, dtype and device
    with torch.no_grad():
        model[1].bias.add_(1.0)
    arq.certify(model, x, sigma=0.5, n=50, n0=10, batch_size=25)
    assert len(single_calls) == 2
    model[1] = torch.nn.Linear(48, 5)  # a new parameter: checked again, and named
    with pytest.raises(ValueError, match="num_classes=3 disagrees"):
        arq.certify(model, x, sigma=0.5, n=50, n0=10, num_classes=3)


class _TwoRowsPerSample(torch.nn.Module):
    """A test-time-augmentation wrapper that stacks the logits of x and of its flip: two rows per input."""

    def __init__(self):
        super().__init__()
        self.inner = _finite_model()

    def forward(self, x):
        return torch.cat([self.inner(x), self.inner(x.flip(-1))])


class _OneLogit(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1).sum(1, keepdim=True)


class _TupleOutput(torch.nn.Module):
    def forward(self, x):
        return _finite_model()(x), x


class _NaNOnNoise(torch.nn.Module):
    """Finite on the clean input (the class check passes), NaN on noisy samples."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 3)
        return torch.where((x < 0).flatten(1).any(1, keepdim=True), torch.nan, logits)


@pytest.mark.parametrize("model, error, message", [
    (_TwoRowsPerSample(), ValueError, "rows of logits for"),
    (_OneLogit(), ValueError, "1 logit per input"),
    (_TupleOutput(), TypeError, "got tuple"),
    (_NaNOnNoise(), ValueError, "NaN logits"),
])
def test_a_model_whose_outputs_are_not_one_vote_per_sample_is_refused(model, error, message):
    """Each would otherwise count votes that are not f's (extra rows, a single class, NaN rows counted as
    the first class) and certify a class at a radius its votes do not support."""
    x = torch.rand(3, 4, 4) * 0.5 + 0.25
    with pytest.raises(error, match=message):
        arq.certify(model, x, sigma=0.5, n=200, n0=10)
    with pytest.raises(error, match=message):
        arq.predict(model, x, sigma=0.5, n=200)


def test_numpy_scalars_are_accepted_as_the_numbers_they_hold():
    import numpy as np

    x, model = torch.rand(3, 4, 4), _finite_model()
    plain = arq.certify(model, x, sigma=0.5, n=100, n0=10, alpha=0.01, seed=3, batch_size=50)
    numpy = arq.certify(model, x, sigma=np.float32(0.5), n=np.int64(100), n0=np.int32(10),
                        alpha=np.float64(0.01), seed=np.uint8(3), batch_size=np.int64(50))
    assert numpy == plain._replace(sigma=float(np.float32(0.5)))
    with pytest.raises(ValueError, match="n must be an integer"):
        arq.certify(_finite_model(), x, sigma=0.5, n=np.float64(100.0), n0=10)


def test_an_empty_batch_is_named():
    with pytest.raises(ValueError, match="x holds no input"):
        arq.certify(_finite_model(), torch.rand(0, 3, 4, 4), sigma=0.5, n=10, n0=10)


def test_predict_refuses_an_alpha_it_could_only_abstain_at():
    """PREDICT tests at alpha - n * delta (the sampler's deviation over n samples): at or below 0 it
    would abstain on every input, so the call is refused, naming alpha and n."""
    x = torch.rand(3, 4, 4)
    limit = 1000 * noise_tv_bound(x.numel())
    with pytest.raises(ValueError, match=r"alpha=1e-12 is not above n \* delta"):
        arq.predict(_finite_model(), x, sigma=0.5, n=1000, alpha=1e-12)
    assert limit < 1e-9  # and just above it, PREDICT runs
    arq.predict(_finite_model(), x, sigma=0.5, n=1000, alpha=1e-9)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        arq.certify(_finite_model(), torch.zeros(3, 4, 4, dtype=torch.uint8), sigma=0.5, n=10, n0=10)


def test_training_mode_warns_evaluates_in_eval_and_restores():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.9), torch.nn.Linear(48, 3))
    model.train()
    x = torch.rand(3, 4, 4)
    with pytest.warns(UserWarning, match="training mode"):
        cert = arq.certify(model, x, sigma=0.5, n=200, n0=20)
    assert model.training
    model.eval()
    assert arq.certify(model, x, sigma=0.5, n=200, n0=20) == cert  # dropout was off


PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch, arq
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    x = torch.rand(1, 8, 8)
    arq.certify(model, x, sigma=0.5, n=1000, n0=10, batch_size=1000)  # warm up allocator and libraries
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    arq.certify(model, x, sigma=0.5, n=int(sys.argv[1]), n0=100, batch_size=1000)
    print(json.dumps({"before": before, "after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


@pytest.mark.slow
def test_peak_memory_is_bounded_by_batch_size_not_n(tmp_path):
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)
    peaks = {}
    for n in (10_000, 1_000_000):
        result = subprocess.run([sys.executable, str(script), str(n)], capture_output=True, text=True, check=True)
        peaks[n] = json.loads(result.stdout.strip().splitlines()[-1])["after"]
    # ru_maxrss is in KiB; n = 1e6 would need > 256 MB if samples were kept
    assert peaks[1_000_000] <= peaks[10_000] + 4 * 1024


def test_input_index_takes_numpy_and_tensor_integers():
    import numpy as np

    model, x = _finite_model(), torch.rand(2, 3, 4, 4)
    expected = arq.certify(model, x, sigma=0.5, n=50, n0=10, input_index=[7, 8])
    for index in (np.int64(7), torch.tensor(7), np.array([7, 8]), torch.tensor([7, 8])):
        assert arq.certify(model, x, sigma=0.5, n=50, n0=10, input_index=index) == expected


def test_certificates_hold_python_numbers_whatever_the_arguments_were():
    import json

    import numpy as np

    certificate = arq.certify(_finite_model(), torch.rand(3, 4, 4), sigma=0.5, n=np.int64(50), n0=np.int32(10),
                              batch_size=np.int64(25))
    assert type(certificate.n) is int and type(certificate.n0) is int
    json.dumps(certificate._asdict())
