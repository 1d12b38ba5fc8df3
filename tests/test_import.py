import subprocess
import sys
import textwrap


def test_importing_arq_does_no_work():
    # A fresh interpreter: importing the packages must not load torch's CUDA state, matplotlib or triton.
    script = textwrap.dedent("""
        import sys
        import arq, arq_kernels
        assert "torch" not in sys.modules, "import arq loaded torch"
        import arq.quant, arq.search, arq.models, arq.data, arq.analyze, arq.smoothing.core
        import torch
        assert not torch.cuda.is_initialized(), "importing arq initialized CUDA"
        assert "matplotlib" not in sys.modules, "importing arq loaded matplotlib"
        assert "triton" not in sys.modules, "importing arq loaded triton"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
