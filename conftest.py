"""What every test file shares: Triton's interpreter on machines without a GPU, the relative error the
comparisons use, and the repository folder.

    python -m pytest -q -m "not slow"                 # everything CI runs (a few minutes)
    python -m pytest -q -m "not slow and not long"    # the inner loop (under 30 s)
    python -m pytest -q -m slow                       # longer than CI's budget: run by hand
"""
import os

import torch

if not torch.cuda.is_available():  # Triton kernels then run on CPU tensors in its interpreter, which must
    os.environ["TRITON_INTERPRET"] = "1"  # be switched on before mimetic_kernels imports triton

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_report_header():
    """The versions a run tested: CI runs test_foreign.py with the newest transformers and with its floor."""
    try:
        import transformers
        hf = transformers.__version__
    except ImportError:
        hf = "not installed (test_foreign.py skips)"
    return f"torch {torch.__version__}, transformers {hf}"


def rel_err(a, b):
    """Norm-wise relative error ||a - b|| / ||b|| in fp64 (||a|| when b is exactly zero, as dA is for L=1)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item() if b.norm() > 0 else a.norm().item()
