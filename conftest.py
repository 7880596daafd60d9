"""What every test file shares: Triton's interpreter on machines without a GPU, the relative error the
comparisons use, the tests' training loop, and the repository folder.

    python -m pytest -q -m "not slow"                 # everything CI runs (a few minutes)
    python -m pytest -q -m "not slow and not long"    # the inner loop (under 30 s)
    python -m pytest -q -m slow                       # longer than CI's budget: run by hand
"""
import os

import torch
import torch.nn.functional as F

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


def copy_steps(model, opt, lengths, batch_size, vocab_size, generator):
    """The tests' training loop: one optimizer step on a copy batch of each length in turn. Returns the
    losses. (train.py's loop is this one with a schedule, evals and checkpoints; tutorial.py shows it bare.)"""
    from mimetic import make_batch
    losses = []
    for length in lengths:
        inputs, targets = make_batch("copy", batch_size, length, vocab_size=vocab_size, generator=generator)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
