"""The synthetic networks the end-to-end benchmark certifies must compute meaningful votes in every
precision it times: a peer that counts NaN logits as votes would be timed on a meaningless loop."""
import pytest
import torch

from arq.smoothing.noise import noisy_batch
from benchmarks.bench_e2e import make_model


@pytest.mark.parametrize("arch", ["resnet20", "resnet110"])
def test_benchmark_network_logits_fit_float16(arch):
    model = make_model(arch)
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    noisy = noisy_batch(x, 0.25, seed=3, input_index=0, draw=0, sample_start=0, count=16, backend="torch")
    with torch.no_grad():
        logits = model(noisy)
        half = model.half()(noisy.half()).float()
    assert torch.isfinite(logits).all()
    # well inside float16's range (65,504), at every depth: ResNet-110's logits were ~5e7 before
    assert logits.abs().max() < 1e3
    assert torch.isfinite(half).all()
    assert (half.argmax(1) == logits.argmax(1)).float().mean() >= 0.9  # float16 rounding may flip a near tie


def test_graphed_peer_batch_parses_its_variant():
    """bench_e2e's graphed FP16 peer runs in batches of BATCH, or N for ``fp16_cl_cudagraphs_b<N>``, which
    must divide a call's samples (its graph replays whole batches)."""
    import pytest

    from benchmarks.bench_e2e import BATCH, graphed_peer_batch

    assert graphed_peer_batch("fp16_cl_cudagraphs", 30 * BATCH) == BATCH
    assert graphed_peer_batch("fp16_cl_cudagraphs_b250", 30_000) == 250
    for variant, samples in (("fp16_cl_cudagraphs_b0", 30_000), ("fp16_cl_cudagraphs_bx", 30_000),
                             ("fp16_cl_cudagraphs_b7", 30_000)):
        with pytest.raises(ValueError, match="fp16_cl_cudagraphs_b"):
            graphed_peer_batch(variant, samples)
