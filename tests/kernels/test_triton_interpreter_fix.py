"""arq_kernels' fix of Triton 3.6's interpreter (``_common._fix_interpreter_index``): a loop over a
runtime scalar argument, as every K loop of the kernels, must run under ``TRITON_INTERPRET=1`` with
numpy >= 2.4 (triton-lang/triton#9171); on Triton >= 3.7 the interpreter is left as it is."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from arq_kernels import _common


@triton.jit
def _strided_sums(x_ptr, out_ptr, length, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, length, BLOCK):  # the runtime scalar the 3.6 interpreter could not index
        total += tl.load(x_ptr + start + offsets, mask=start + offsets < length, other=0).to(tl.int64)
    tl.store(out_ptr + offsets, total)


def test_loop_over_a_runtime_scalar_matches_torch(device, generator):
    block = 16
    for length in (1, 37, 160):  # one partial block, several with a partial last one, whole blocks
        x = torch.randint(-1000, 1000, (length,), generator=generator, dtype=torch.int32).to(device)
        out = torch.full((block,), -7, dtype=torch.int64, device=device)  # poisoned
        _strided_sums[(1,)](x, out, length, BLOCK=block)
        padded = torch.zeros(-(-length // block) * block, dtype=torch.int64)
        padded[:length] = x.cpu().to(torch.int64)
        assert torch.equal(out.cpu(), padded.view(-1, block).sum(dim=0))


def test_interpreter_patched_only_before_triton_3_7():
    patched = getattr(interpreter._patch_lang_tensor, "_arq_index_fix", False)
    assert patched == _common._triton_before(3, 7)
    assert _common._triton_before(99, 0) and not _common._triton_before(3, 0)
