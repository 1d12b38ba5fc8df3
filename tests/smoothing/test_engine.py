"""arq.certify on quantized models: the integer CPU path (arq.smoothing.engine) against the fake-quant reference."""
import copy

import pytest
import torch
from torch import nn

import arq
from arq._ext import compiled_ops_available
from arq.smoothing import engine

pytestmark = pytest.mark.skipif(
    "onednn" not in torch.backends.quantized.supported_engines, reason="needs torch's oneDNN quantized engine"
)

N, N0 = 600, 50
IMAGES = 4


class Plain(nn.Module):
    """Hides arq_quant: certify then runs the wrapped fake-quant model as an ordinary float model."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.arq_metadata = model.arq_metadata
        self.train(model.training)

    def forward(self, x):
        return self.inner(x)


@pytest.fixture(scope="module")
def mnist():
    from arq.data import get_dataset

    test_set = get_dataset("mnist", "test")
    images = torch.stack([test_set[i][0] for i in range(IMAGES + 256)])
    return images[:IMAGES], images[IMAGES:]


@pytest.fixture(scope="module")
def float_model():
    return arq.zoo.load("mnist-lenet-sigma0.25").eval()


@pytest.fixture(scope="module", params=[(8, 8), (4, 4)], ids=["W8A8", "W4A4"])
def qmodel(request, float_model, mnist):
    policy = arq.quant.Policy.uniform(float_model, *request.param)
    return arq.quantize(float_model, policy, mnist[1])


def test_reference_backend_is_exactly_the_fake_quant_certificate(qmodel, mnist):
    images = mnist[0][:2]
    ours = arq.certify(qmodel, images, n=N, n0=N0, batch_size=256, backend="torch")
    reference = arq.certify(Plain(qmodel), images, n=N, n0=N0, batch_size=256, backend="torch")
    assert ours == reference
    assert all(c.backend == "torch" for c in ours)


@pytest.mark.skipif(not compiled_ops_available(), reason="needs arq._C")
def test_integer_path_agrees_with_fake_quant(qmodel, mnist):
    images = mnist[0]
    integer = arq.certify(qmodel, images, sigma=0.6, n=N, n0=N0, batch_size=256, backend="auto")
    # the same (bit-identical) noise through the fake-quant model
    fake = arq.certify(Plain(qmodel), images, sigma=0.6, n=N, n0=N0, batch_size=256, backend="cpp")
    for ours, ref in zip(integer, fake):
        assert ours.backend == "cpp+int8" and ref.backend == "cpp"
        assert ours.prediction == ref.prediction
        # execution.py's tolerance: a few samples near a rounding boundary may vote differently
        assert abs(ours.count - ref.count) <= 0.01 * N
        assert abs(ours.radius - ref.radius) <= 0.05 * ref.sigma
    assert arq.predict(qmodel, images[0], n=N, batch_size=256) == arq.predict(
        Plain(qmodel), images[0], n=N, batch_size=256
    )


@pytest.mark.skipif(not compiled_ops_available(), reason="needs arq._C")
def test_integer_votes_are_the_integer_models(qmodel, mnist):
    """cpp+int8 certifies exactly arq.quant.to_integer(qmodel) (what is deployed)."""
    image = mnist[0][0]
    integer_model = arq.quant.to_integer(qmodel)
    integer_model.arq_metadata = qmodel.arq_metadata
    ours = arq.certify(qmodel, image, n=N, n0=N0, batch_size=256, backend="cpp")
    direct = arq.certify(integer_model, image, n=N, n0=N0, batch_size=256, backend="cpp")
    assert ours._replace(backend="cpp") == direct


@pytest.mark.skipif(not compiled_ops_available(), reason="needs arq._C")
def test_cache_keeps_one_integer_model_per_conv_kernel(float_model, mnist, monkeypatch):
    """ARQ_CONV_KERNEL is read when the integer model is built: changing it between calls builds
    (and then reuses) the model of the kernel asked for, instead of the first one built."""
    from arq.ops import _has_kernel
    from arq.quant.execution import IntegerConv2d

    if not _has_kernel("lowbit_conv2d", "CPU"):
        pytest.skip("needs arq::lowbit_conv2d")
    qmodel = arq.quantize(float_model, arq.quant.Policy.uniform(float_model, 4, 4), mnist[1][:64])
    lowbit = lambda model: [m.lowbit for m in model.modules() if isinstance(m, IntegerConv2d)]  # noqa: E731
    monkeypatch.setenv("ARQ_CONV_KERNEL", "onednn")
    onednn, _ = engine.prepare_model(qmodel, "cpp", "cpu")
    monkeypatch.setenv("ARQ_CONV_KERNEL", "arq")
    ours, _ = engine.prepare_model(qmodel, "cpp", "cpu")
    assert ours is not onednn and not any(lowbit(onednn)) and any(lowbit(ours))
    assert engine.prepare_model(qmodel, "cpp", "cpu")[0] is ours
    monkeypatch.setenv("ARQ_CONV_KERNEL", "onednn")
    assert engine.prepare_model(qmodel, "cpp", "cpu")[0] is onednn


def test_arq_cpu_isa_set_mid_session_takes_effect(float_model, mnist, monkeypatch):
    """ARQ_CPU_ISA=avx2 changes the host-dependent routing of the convolutions: a model prepared
    before it was set is prepared again, not reused."""
    qmodel = arq.quantize(float_model, arq.quant.Policy.uniform(float_model, 4, 4), mnist[1][:64])
    monkeypatch.delenv("ARQ_CPU_ISA", raising=False)
    monkeypatch.delenv("ARQ_CONV_KERNEL", raising=False)
    native, _ = engine.prepare_model(qmodel, "cpp", "cpu")
    monkeypatch.setenv("ARQ_CPU_ISA", "avx2")
    emulated, _ = engine.prepare_model(qmodel, "cpp", "cpu")
    assert emulated is not native and engine.prepare_model(qmodel, "cpp", "cpu")[0] is emulated


@pytest.mark.skipif(not compiled_ops_available(), reason="needs arq._C")
def test_cache_reuse_and_invalidation(float_model, mnist):
    qmodel = arq.quantize(float_model, arq.quant.Policy.uniform(float_model, 8, 8), mnist[1][:64])
    first, tag = engine.prepare_model(qmodel, "cpp", "cpu")
    assert tag == "+int8" and isinstance(first, nn.Module) and first is not qmodel
    again, _ = engine.prepare_model(qmodel, "auto", "cpu")
    assert again is first
    copy.deepcopy(qmodel)  # the cache does not live on the model: deepcopy still works
    with torch.no_grad():
        next(qmodel.parameters()).mul_(1.0)  # an in-place update (fine-tuning) invalidates
    rebuilt, _ = engine.prepare_model(qmodel, "cpp", "cpu")
    assert rebuilt is not first
    assert engine.prepare_model(qmodel, "torch", "cpu") == (qmodel, "")
    engine.clear_cache(qmodel)
    assert engine.prepare_model(qmodel, "cpp", "cpu")[0] is not rebuilt


def _favour_class_3(bias):
    values = torch.zeros_like(bias)
    values[3] = 100.0
    return values


@pytest.mark.parametrize("write", [
    lambda b: b.data.add_(_favour_class_3(b)),     # old-style training loops, EMA, clipping
    lambda b: b.data.copy_(b.data + _favour_class_3(b)),
    lambda b: torch.from_numpy(b.detach().numpy()).add_(_favour_class_3(b)),  # a numpy view of the storage
])
def test_writes_that_bypass_version_counters_rebuild_the_integer_model(float_model, mnist, write):
    """Writes through .data or numpy leave the version counters alone: the cached integer model then
    certified the old weights. Their values are compared with the snapshot taken at build time."""
    qmodel = arq.quantize(float_model, arq.quant.Policy.uniform(float_model, 8, 8), mnist[1][:64])
    image = mnist[0][0]
    before = arq.certify(qmodel, image, n=N, n0=N0)
    first, _ = engine.prepare_model(qmodel, "cpp", "cpu")
    assert engine.prepare_model(qmodel, "cpp", "cpu")[0] is first  # unchanged values: reused
    write(qmodel.get_submodule("1.fc3").bias)
    after = arq.certify(qmodel, image, n=N, n0=N0)
    fresh = arq.certify(copy.deepcopy(qmodel), image, n=N, n0=N0)  # converted from scratch
    assert after == fresh and after.backend == "cpp+int8"
    assert before.prediction != 3 and after.prediction == 3
    assert engine.prepare_model(qmodel, "cpp", "cpu")[0] is not first


def test_float_and_integer_models_pass_through(float_model, mnist):
    assert engine.prepare_model(float_model, "cpp", "cpu") == (float_model, "")
    assert engine.prepare_model(float_model, "torch", "cpu") == (float_model, "")
    qmodel = arq.quantize(float_model, arq.quant.Policy.uniform(float_model, 8, 8), mnist[1][:64])
    integer_model = arq.quant.to_integer(qmodel)
    assert not engine.is_quantized(integer_model) and engine.is_quantized(qmodel)
    assert engine.prepare_model(integer_model, "cpp", "cpu") == (integer_model, "")
    if compiled_ops_available():
        assert arq.certify(float_model, mnist[0][0], n=100, n0=10).backend == "cpp"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_path_agrees_with_fake_quant(qmodel, mnist):
    gpu_model = copy.deepcopy(qmodel).cuda()
    images = mnist[0].cuda()
    ours = arq.certify(gpu_model, images, sigma=0.6, n=N, n0=N0, batch_size=256, backend="auto")
    reference = arq.certify(Plain(gpu_model), images, sigma=0.6, n=N, n0=N0, batch_size=256, backend="auto")
    for mine, ref in zip(ours, reference):
        assert mine.backend in (ref.backend + "+packed+graphs", ref.backend + "+packed", ref.backend + "+fakequant")
        assert mine.prediction == ref.prediction
        assert abs(mine.count - ref.count) <= 0.01 * N


def test_a_packed_kernel_model_is_not_converted_again():
    import arq
    from arq.quant import Policy, to_kernels
    from arq.smoothing.engine import is_quantized

    model = arq.zoo.load("mnist-lenet-sigma0.25")
    policy = Policy.uniform(model, 8, 8)
    policy = Policy({**{name: bits.to_list() for name, bits in policy.items()}, "1.fc3": [32, 32]})
    qmodel = arq.quantize(model, policy, torch.rand(16, 1, 28, 28))
    assert is_quantized(qmodel)
    assert not is_quantized(to_kernels(qmodel, backend="torch"))


# ------------------------------------------------------------------------------------------- CUDA graphs


def test_a_failed_packed_conversion_is_retried_once_the_model_changes(monkeypatch, float_model, mnist):
    """A model whose packed GPU conversion failed runs as fake-quant (one warning), and is not
    converted again while unchanged; once a parameter changes it is tried again (no GPU touched:
    Triton's availability and the conversion are stood in for)."""
    import arq.quant.kernels as kernels
    import arq.smoothing.noise as noise

    model = arq.quantize(float_model, arq.quant.Policy.uniform(float_model, 8, 8), mnist[1])
    calls = []

    def failing_to_kernels(m, backend):
        calls.append(m)
        raise RuntimeError("no kernel for this layer")

    monkeypatch.setattr(noise, "triton_usable", lambda device: True)
    monkeypatch.setattr(kernels, "to_kernels", failing_to_kernels)
    monkeypatch.setenv("ARQ_INPUT_CODES", "0")
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="no kernel for this layer"):
        assert engine._prepare_packed_gpu(model, "auto", cuda) == (model, "+fakequant")
    assert engine._prepare_packed_gpu(model, "auto", cuda) == (model, "+fakequant")
    assert len(calls) == 1
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    with pytest.warns(RuntimeWarning):
        assert engine._prepare_packed_gpu(model, "auto", cuda) == (model, "+fakequant")
    assert len(calls) == 2


def test_cuda_graphs_are_the_packed_models_default_and_opt_in_for_others(monkeypatch, qmodel):
    monkeypatch.delenv("ARQ_CUDA_GRAPHS", raising=False)
    assert not engine._cuda_graphs_wanted(None, prepared=False)
    assert engine._cuda_graphs_wanted(None, prepared=True)  # an entry prepared with graphs is reused
    assert engine._cuda_graphs_wanted(None, prepared=False, default=True)
    assert engine._cuda_graphs_wanted(True, prepared=False) and not engine._cuda_graphs_wanted(False, prepared=True)
    assert not engine._cuda_graphs_wanted(False, prepared=False, default=True)
    monkeypatch.setenv("ARQ_CUDA_GRAPHS", "1")
    assert engine._cuda_graphs_wanted(None, prepared=False)
    monkeypatch.setenv("ARQ_CUDA_GRAPHS", "0")
    assert not engine._cuda_graphs_wanted(None, prepared=True)
    assert not engine._cuda_graphs_wanted(None, prepared=False, default=True)
    # which entries default to graphs (building an entry touches no GPU; capture is lazy)
    monkeypatch.delenv("ARQ_CUDA_GRAPHS")
    cuda = torch.device("cuda")
    packed_inner, float_inner = nn.Identity(), nn.Identity()
    graphed, tag = engine._graphed(qmodel, packed_inner, "+packed", cuda, cuda_graphs=None)
    assert isinstance(graphed, engine.CudaGraphForward) and tag == "+packed+graphs"
    assert engine._graphed(qmodel, float_inner, "+fakequant", cuda, cuda_graphs=None) == (float_inner, "+fakequant")
    other = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    assert engine._graphed(other, other, "", cuda, cuda_graphs=None) == (other, "")
    # on the CPU there is nothing to graph, whatever is asked
    float_model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    assert engine.prepare_model(float_model, "torch", "cpu", cuda_graphs=True) == (float_model, "")


def _fake_capture(monkeypatch, forward, run):
    """Replaces ``forward``'s capture (no GPU): a "graph" whose replay writes ``run(static input)`` into
    the same output tensor, as torch.cuda.CUDAGraph.replay does. Returns the captured batch sizes."""
    captured = []

    class Graph:
        def __init__(self, static_input, static_output):
            self.static_input, self.static_output = static_input, static_output

        def replay(self):
            self.static_output.copy_(run(self.static_input))

    def capture(x):
        captured.append(x.shape[0])
        static_input, static_output = torch.empty_like(x), torch.empty(x.shape[0], 3)
        return Graph(static_input, static_output), static_input, static_output

    monkeypatch.setattr(forward, "_capture", capture)
    return captured


def test_graph_replay_returns_a_copy_and_keeps_the_most_recent_shapes(monkeypatch):
    """The logits of one call survive the next (a replay overwrites the graph's output), and at most
    MAX_GRAPHS shapes keep a graph, the least recently used dropped first (capture faked: no GPU)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    forward = engine.CudaGraphForward(model)
    captured = _fake_capture(monkeypatch, forward, lambda batch: model(batch))
    first_batch, second_batch = torch.rand(2, 1, 2, 2), torch.rand(2, 1, 2, 2)
    with torch.no_grad():
        first = forward(first_batch)
        second = forward(second_batch)
        assert torch.equal(first, model(first_batch)) and torch.equal(second, model(second_batch))
        assert captured == [2]
        limit = engine.CudaGraphForward.MAX_GRAPHS
        for rows in range(3, 2 + limit):  # fills the table: shapes 2 .. limit + 1
            forward(torch.rand(rows, 1, 2, 2))
        forward(torch.rand(2, 1, 2, 2))  # shape 2 used again: now the most recent
        forward(torch.rand(limit + 2, 1, 2, 2))  # one more: shape 3, the least recently used, goes
        kept = sorted(key[0][0] for key in forward._graphs)
        assert kept == [2] + list(range(4, limit + 3)) and len(kept) == limit
        forward(torch.rand(3, 1, 2, 2))  # captured again
        assert captured == list(range(2, limit + 3)) + [3]


def test_graph_replays_from_two_threads_each_get_their_own_logits(monkeypatch):
    """Two certifications of one model at once (capture faked, a replay that takes time): each call's
    logits are those of its own batch, never of the batch another thread copied in meanwhile."""
    import threading
    import time

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    forward = engine.CudaGraphForward(model)

    def slow_forward(batch):
        batch = batch.clone()
        time.sleep(0.002)  # another thread may run here
        return model(batch)

    _fake_capture(monkeypatch, forward, slow_forward)
    wrong = []

    def certify_like(seed):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _ in range(15):
                batch = torch.rand(2, 1, 2, 2, generator=generator)
                if not torch.equal(forward(batch), model(batch)):
                    wrong.append(seed)

    threads = [threading.Thread(target=certify_like, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_a_graphed_float_model_is_still_freed():
    """The graphed entry of a float model wraps the model itself: it must not keep it alive
    through the weakly keyed cache (building the entry touches no GPU; capture is lazy)."""
    import gc
    import weakref

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    graphed, tag = engine._graphed(model, model, "", torch.device("cuda"), cuda_graphs=True)
    assert isinstance(graphed, engine.CudaGraphForward) and tag == "+graphs"
    assert engine._graphed(model, model, "", torch.device("cuda"), cuda_graphs=None)[0] is graphed
    alive = weakref.ref(model)
    del model, graphed
    gc.collect()
    assert alive() is None


def test_a_graphed_entry_follows_its_inner_model():
    """One tag ("+packed") can name two converted models (ARQ_INPUT_CODES toggled between calls):
    the graphs entry must replay the inner model asked for, not the one it was first built on,
    and keep graphs on for it (building the entry touches no GPU; capture is lazy)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    float_inner, codes_inner = nn.Linear(4, 3), nn.Linear(4, 3)
    cuda = torch.device("cuda")
    first, tag = engine._graphed(model, float_inner, "+packed", cuda, cuda_graphs=True)
    assert first.model is float_inner and tag == "+packed+graphs"
    second, _ = engine._graphed(model, codes_inner, "+packed", cuda, cuda_graphs=None)
    assert isinstance(second, engine.CudaGraphForward) and second.model is codes_inner
    assert engine._graphed(model, codes_inner, "+packed", cuda, cuda_graphs=None)[0] is second
    graph_entries = [key for key in engine._CACHE[model] if key[0] == "graphs"]
    assert len(graph_entries) == 1  # the other inner model's graphs are dropped, not kept alive
    engine.clear_cache(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_count_as_the_eager_model(qmodel, mnist):
    """Float and packed models: the same votes with and without graphs; a replaced parameter
    drops the graph (fingerprint) instead of replaying stale weights."""
    from arq.smoothing.core import sample_counts

    images = mnist[0][:2].cuda()
    for model in (copy.deepcopy(Plain(qmodel)).cuda().eval(), copy.deepcopy(qmodel).cuda().eval()):
        eager, tag = engine.prepare_model(model, "auto", "cuda", cuda_graphs=False)
        graphed, graphed_tag = engine.prepare_model(model, "auto", "cuda", cuda_graphs=True)
        assert graphed_tag == tag + "+graphs" and isinstance(graphed, engine.CudaGraphForward)
        assert engine.prepare_model(model, "auto", "cuda")[0] is graphed  # prepared once, then reused
        common = dict(sigma=0.6, num=700, draw=1, seed=3, batch_size=256, num_classes=10, backend="auto")
        for index, image in enumerate(images):  # 256, 256 and 188: two graph shapes
            expected = sample_counts(eager, image, input_index=index, **common)
            assert torch.equal(sample_counts(graphed, image, input_index=index, **common), expected)
        with torch.no_grad():
            parameter = next(p for p in model.parameters() if p.dim() > 1)
            parameter.mul_(-1.0)  # in place: new version counter
        assert engine.prepare_model(model, "auto", "cuda")[0] is not graphed
        engine.clear_cache(model)


def test_a_graphed_model_keeps_its_input_format():
    """arq.smoothing.core makes the noisy batches in the prepared model's input format: the graph
    wrapper must show the format of the model it replays (capture is lazy: no GPU is touched)."""
    from arq.smoothing.noise import InputCodes

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    assert engine.CudaGraphForward(model).input_codes is None
    model.input_codes = InputCodes((0.5,), (0.25,), 0.02, 0, -127, 127, dtype=torch.int8)
    assert engine.CudaGraphForward(model).input_codes is model.input_codes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_packed_model_reads_its_input_codes(monkeypatch, qmodel, mnist):
    """On CUDA the packed model enters at its stem's int8 codes, written by the Triton noise kernel with
    the normalization fused; the certificates are those of its float entry, exactly."""
    gpu_model = copy.deepcopy(qmodel).cuda().eval()
    images = mnist[0].cuda()
    prepared, tag = engine.prepare_model(gpu_model, "auto", "cuda")
    if engine.execution_of(tag) != "packed":  # "+packed+graphs" by default
        pytest.skip(f"the packed GPU path is not available here ({tag!r})")
    assert prepared.input_codes is not None and prepared.input_codes.dtype == torch.int8
    entered = arq.certify(gpu_model, images, sigma=0.6, n=N, n0=N0, batch_size=256)
    monkeypatch.setenv("ARQ_INPUT_CODES", "0")
    assert engine.prepare_model(gpu_model, "auto", "cuda")[0].input_codes is None
    assert arq.certify(gpu_model, images, sigma=0.6, n=N, n0=N0, batch_size=256) == entered


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_chunks_change_no_certificate(monkeypatch, qmodel, mnist):
    """ARQ_GPU_CHUNK splits each noisy batch before the (graphed) packed model: the same samples and
    votes, so the same certificates, with chunks that divide the batch and chunks that do not."""
    gpu_model = copy.deepcopy(qmodel).cuda().eval()
    images = mnist[0].cuda()
    monkeypatch.delenv("ARQ_GPU_CHUNK", raising=False)
    whole = arq.certify(gpu_model, images, sigma=0.6, n=N, n0=N0, batch_size=256)
    for chunk in ("64", "100"):
        monkeypatch.setenv("ARQ_GPU_CHUNK", chunk)
        assert arq.certify(gpu_model, images, sigma=0.6, n=N, n0=N0, batch_size=256) == whole, chunk


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_irs_runs_the_candidate_on_the_packed_kernels(monkeypatch, float_model, qmodel, mnist):
    """IRS (arq.irs) runs a quantized f' as arq.certify does: on CUDA through the packed kernels, entered
    at its stem's codes; its certificates are those of the packed model's float entry, exactly (the same
    samples in both), and those of the fake-quant f' ("as given") differ at most where the two models
    classify a replayed sample differently."""
    from arq.irs import build_cache, certify_incremental

    gpu_float, gpu_model = copy.deepcopy(float_model).cuda().eval(), copy.deepcopy(qmodel).cuda().eval()
    images = mnist[0].cuda()
    if engine.execution_of(engine.prepare_model(gpu_model, "auto", "cuda")[1]) != "packed":
        pytest.skip("the packed GPU path is not available here")
    cache = build_cache(gpu_float, images, sigma=0.6, n=N, n0=N0, n_p=N // 2, batch_size=256)
    entered = certify_incremental(gpu_model, images, cache, n_p=N // 2, batch_size=256)
    assert all(c.backend.endswith("+packed+graphs") for c in entered)  # "cuda+packed+graphs" with arq's CUDA ops
    as_given = certify_incremental(gpu_model, images, cache, n_p=N // 2, batch_size=256, execution="as given")
    assert all(c.backend.endswith("+fakequant") for c in as_given)
    for packed, fake in zip(entered, as_given):
        assert packed.mode == fake.mode
        if packed.mode == "irs":
            assert abs(packed.disagreements - fake.disagreements) <= N // 2 // 20  # the two differ on few samples
    monkeypatch.setenv("ARQ_INPUT_CODES", "0")
    assert certify_incremental(gpu_model, images, cache, n_p=N // 2, batch_size=256) == entered


def test_model_batches_split_cpu_batches_into_near_equal_chunks(monkeypatch):
    monkeypatch.setenv("ARQ_CPU_CHUNK", "128")
    sizes = lambda n: [part.shape[0] for part in engine.model_batches(torch.empty(n, 3))]  # noqa: E731
    assert sizes(400) == [100] * 4 and sizes(1000) == [125] * 8
    assert sizes(129) == [65, 64] and sizes(128) == [128] and sizes(7) == [7]
    batch = torch.arange(1000.0).reshape(-1, 1)
    assert torch.equal(torch.cat(engine.model_batches(batch)), batch)  # in order, nothing lost
    storage = batch.untyped_storage().data_ptr()
    assert all(part.untyped_storage().data_ptr() == storage for part in engine.model_batches(batch))  # views
    assert sizes(0) == [0]
    assert [p.shape[0] for p in engine.model_batches(torch.empty(400, 3, device="meta"))] == [400]  # CPU only
    monkeypatch.setenv("ARQ_CPU_CHUNK", "0")
    assert sizes(400) == [400]
    monkeypatch.setenv("ARQ_CPU_CHUNK", "150")
    assert sizes(400) == [134, 133, 133]
    for bad in ("-1", "many"):
        monkeypatch.setenv("ARQ_CPU_CHUNK", bad)
        with pytest.raises(ValueError, match="ARQ_CPU_CHUNK"):
            engine.model_batches(torch.empty(400, 3))


def test_model_batches_split_other_devices_only_when_asked(monkeypatch):
    """Off the CPU (a meta tensor stands for a CUDA one) batches stay whole unless ARQ_GPU_CHUNK asks for
    chunks, which are then the CPU's near-equal views; ARQ_CPU_CHUNK does not touch them."""
    monkeypatch.delenv("ARQ_GPU_CHUNK", raising=False)
    monkeypatch.setenv("ARQ_CPU_CHUNK", "128")
    sizes = lambda n: [part.shape[0] for part in engine.model_batches(torch.empty(n, 3, device="meta"))]  # noqa: E731
    assert sizes(1000) == [1000] and engine.gpu_chunk() == 0
    monkeypatch.setenv("ARQ_GPU_CHUNK", "250")
    assert sizes(1000) == [250] * 4 and sizes(900) == [225] * 4 and sizes(250) == [250] and sizes(100) == [100]
    assert [p.shape[0] for p in engine.model_batches(torch.empty(400, 3))] == [100] * 4  # CPU: ARQ_CPU_CHUNK
    monkeypatch.setenv("ARQ_GPU_CHUNK", "0")
    assert sizes(1000) == [1000]
    for bad in ("-5", "1e3"):
        monkeypatch.setenv("ARQ_GPU_CHUNK", bad)
        with pytest.raises(ValueError, match="ARQ_GPU_CHUNK"):
            engine.model_batches(torch.empty(400, 3, device="meta"))


@pytest.mark.parametrize("flags, chunk", [(frozenset({"avx2", "fma"}), 128),
                                          (frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"}), 0),
                                          (frozenset(), 128)])
def test_default_cpu_chunk_follows_the_host(monkeypatch, flags, chunk):
    """Chunks of 128 where there is no AVX-512, whole batches where there is; the variable wins."""
    from arq.quant import execution

    monkeypatch.setattr(execution, "_cpu_flags", lambda: flags)
    monkeypatch.delenv("ARQ_CPU_CHUNK", raising=False)
    assert engine.cpu_chunk() == chunk
    assert [part.shape[0] for part in engine.model_batches(torch.empty(400, 3))] == ([100] * 4 if chunk else [400])
    monkeypatch.setenv("ARQ_CPU_ISA", "avx2")  # chooses as on an AVX2 host
    assert engine.cpu_chunk() == 128
    monkeypatch.setenv("ARQ_CPU_CHUNK", "200")
    assert engine.cpu_chunk() == 200


class _PixelVotes(nn.Module):
    """Each sample's logits from that sample alone, exactly (float64 of 10 pixels); records call sizes."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.arq_metadata = {"sigma": 0.5, "num_classes": 10}

    def forward(self, x):
        self.calls.append(x.shape[0])
        return x.flatten(1)[:, 300:310].double()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_chunks_change_no_certificate_count_or_prediction(monkeypatch, mnist, backend):
    if backend == "cpp" and not compiled_ops_available():
        pytest.skip("needs arq._C")
    image = mnist[0][0]
    results = {}
    for chunk in ("0", "128"):
        monkeypatch.setenv("ARQ_CPU_CHUNK", chunk)
        model = _PixelVotes()
        certificate = arq.certify(model, image, n=1000, n0=100, batch_size=400, backend=backend)
        prediction = arq.predict(model, image, n=1000, batch_size=400, backend=backend)
        predictions = arq.smoothing.core.sample_predictions(model, image, sigma=0.5, num=1000, draw=1, seed=0,
                                                            input_index=0, batch_size=400, backend=backend)
        results[chunk] = (certificate, prediction, predictions, model.calls)
    whole, chunked = results["0"], results["128"]
    assert whole[0] == chunked[0] and whole[1] == chunked[1] and torch.equal(whole[2], chunked[2])
    assert max(whole[3]) == 400 and max(chunked[3]) == 100  # 400 -> four chunks of 100
    assert sum(whole[3]) == sum(chunked[3])  # every sample evaluated once either way


@pytest.mark.skipif(not compiled_ops_available(), reason="needs arq._C")
def test_noise_enters_as_the_first_layers_codes_with_the_same_votes(qmodel, mnist, monkeypatch):
    """The integer model reads its first layer's codes, made by the noise op from the same samples: every
    class count, certificate and prediction is the float entry's (ARQ_INPUT_CODES=0)."""
    from arq.smoothing.core import sample_counts

    images = mnist[0][:2]
    entered, _ = engine.prepare_model(qmodel, "cpp", "cpu")
    assert entered.input_codes is not None and entered.input_codes.mean == (float(torch.tensor(0.1307)),)
    monkeypatch.setenv("ARQ_INPUT_CODES", "0")
    floats, _ = engine.prepare_model(qmodel, "cpp", "cpu")
    assert floats is not entered and floats.input_codes is None
    common = dict(sigma=0.6, num=N, draw=1, seed=3, input_index=0, batch_size=256, num_classes=10, backend="cpp")
    float_counts = sample_counts(floats, images[0], **common)
    float_results = arq.certify(qmodel, images, sigma=0.6, n=N, n0=N0, batch_size=256)
    float_prediction = arq.predict(qmodel, images[1], n=N, batch_size=256)
    monkeypatch.setenv("ARQ_INPUT_CODES", "1")
    assert torch.equal(sample_counts(entered, images[0], **common), float_counts)
    assert arq.certify(qmodel, images, sigma=0.6, n=N, n0=N0, batch_size=256) == float_results
    assert arq.predict(qmodel, images[1], n=N, batch_size=256) == float_prediction


@pytest.mark.skipif(not compiled_ops_available(), reason="needs arq._C")
def test_clean_logits_encode_clean_images_for_a_model_that_reads_codes(qmodel, mnist, monkeypatch):
    """``clean_logits`` feeds a codes-entered integer model the codes of clean images: its logits are
    the float entry's (ARQ_INPUT_CODES=0) exactly; a float model gets the images as they are."""
    images = torch.cat([mnist[0], mnist[1][:33]])  # 37: an odd count
    entered, _ = engine.prepare_model(qmodel, "cpp", "cpu")
    assert entered.input_codes is not None
    with pytest.raises(RuntimeError):
        entered(images)  # the entered model alone reads uint8 codes, not float images
    monkeypatch.setenv("ARQ_INPUT_CODES", "0")
    floats, _ = engine.prepare_model(qmodel, "cpp", "cpu")
    assert floats.input_codes is None
    with torch.inference_mode():
        expected = floats(images)
        assert torch.equal(engine.clean_logits(entered, images), expected)
        assert torch.equal(engine.clean_logits(floats, images), expected)
        model = _PixelVotes()
        assert torch.equal(engine.clean_logits(model, images), model(images))


class _OwnNormalize(nn.Module):
    """A model's own normalization layer (not arq's NormalizeLayer), written the usual way."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.1307]).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor([0.3081]).view(1, 1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


@pytest.mark.skipif(not compiled_ops_available(), reason="needs arq._C")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_models_own_normalization_enters_at_the_codes_too(compiled, mnist, monkeypatch):
    """The engine recognizes a ``(x - mean) / std`` module of the model's own, eager and compiled: the
    codes entry is taken and every class count is the float entry's."""
    from arq.smoothing.core import sample_counts

    torch.manual_seed(0)
    model = nn.Sequential(_OwnNormalize(), nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 7 * 7, 10))
    model.arq_metadata = {"sigma": 0.5, "num_classes": 10}
    qmodel = arq.quantize(model.eval(), arq.quant.Policy.uniform(model, 8, 8), mnist[1][:64])
    common = dict(sigma=0.5, num=300, draw=1, seed=3, input_index=0, batch_size=150, num_classes=10, backend="cpp")
    entered, _ = engine.prepare_model(qmodel, "cpp", "cpu", compile=compiled)
    assert entered.input_codes is not None and entered.input_codes.std == (float(torch.tensor(0.3081)),)
    monkeypatch.setenv("ARQ_INPUT_CODES", "0")
    floats, _ = engine.prepare_model(qmodel, "cpp", "cpu", compile=compiled)
    assert floats.input_codes is None
    for image in mnist[0][:2]:
        counts = sample_counts(entered, image, **common)
        assert torch.equal(counts, sample_counts(floats, image, **common))
        assert int((counts > 0).sum()) >= 2  # votes split: equal counts say something


def test_execution_of_names_the_model_a_tag_runs():
    """Run records keep this: eager and compiled integer models are one execution, graphs replay the same."""
    assert engine.execution_of("") == engine.execution_of("+fakequant") == engine.execution_of("+graphs") == "as given"
    assert engine.execution_of("+int8") == engine.execution_of("+int8-compiled") == "integer"
    assert engine.execution_of("+packed") == engine.execution_of("+packed+graphs") == "packed"
    with pytest.raises(ValueError, match="unknown execution tag"):
        engine.execution_of("+int4")


@pytest.mark.skipif(not compiled_ops_available(), reason="needs arq._C")
def test_a_failing_codes_entry_keeps_the_float_entry(qmodel, mnist, monkeypatch):
    """Entering at the codes is an optional speed-up: where it fails, the integer model keeps its float
    input (one warning) and certifies with the same votes, instead of failing the certification."""
    from arq.quant import execution
    from arq.smoothing.core import sample_counts

    model = copy.deepcopy(qmodel)
    monkeypatch.setenv("ARQ_INPUT_CODES", "0")
    floats, _ = engine.prepare_model(model, "cpp", "cpu")
    monkeypatch.setenv("ARQ_INPUT_CODES", "1")

    def broken(integer_model):
        integer_model.get_submodule("0").mean.fill_(0.5)  # half done, then failing
        raise RuntimeError("entry failed")

    monkeypatch.setattr(execution, "enter_at_input_codes", broken)
    with pytest.warns(RuntimeWarning, match="keeps its float input .*entry failed"):
        prepared, tag = engine.prepare_model(model, "cpp", "cpu")
    assert tag == "+int8" and prepared.input_codes is None
    common = dict(sigma=0.6, num=300, draw=1, seed=3, input_index=0, batch_size=150, num_classes=10, backend="cpp")
    assert torch.equal(sample_counts(prepared, mnist[0][0], **common), sample_counts(floats, mnist[0][0], **common))


def test_a_float64_quantized_model_runs_as_given(float_model, mnist):
    """The integer conversion reads float32 weights: a .double() model is certified as the model it is."""
    qmodel = arq.quantize(float_model, arq.quant.Policy.uniform(float_model, 8, 8), mnist[1][:64]).double()
    certificate = arq.certify(qmodel, mnist[0][0], n=200, n0=20)
    assert certificate.backend == "cpp+fakequant"
    assert certificate == arq.certify(qmodel, mnist[0][0], n=200, n0=20, backend="torch")._replace(
        backend="cpp+fakequant")


def test_a_model_with_nothing_cached_holds_no_snapshot(float_model, mnist):
    qmodel = arq.quantize(float_model, arq.quant.Policy.uniform(float_model, 8, 8), mnist[1][:64])
    engine.prepare_model(qmodel, "torch", "cpu")  # the reference: nothing converted, nothing kept
    assert qmodel not in engine._SNAPSHOTS
    engine.prepare_model(qmodel, "cpp", "cpu")
    assert qmodel in engine._SNAPSHOTS
    engine.clear_cache(qmodel)
    assert qmodel not in engine._SNAPSHOTS
