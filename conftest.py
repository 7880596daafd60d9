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


def new_example_at(L, *rows):
    """A (len(rows), L) bool new_example, True at the steps listed per row: where its examples start."""
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for row, starts in enumerate(rows):
        mask[row, starts] = True
    return mask


def example_spans(new_example):
    """[(row, start, end)]: each packed example, from its start (or its row's first step) to the next."""
    spans = []
    for row, flags in enumerate(new_example.tolist()):
        starts = [0] + [t for t, flag in enumerate(flags) if flag and t > 0]
        spans += [(row, s, e) for s, e in zip(starts, starts[1:] + [len(flags)])]
    return spans


def packed_and_alone(fn, inputs, time_dims, new_example, params=(), seed=1):
    """fn(**inputs, new_example=...) on packed rows, and on each of their examples alone, with gradients.

    time_dims[name]: the time axis of that input and, under "out", of fn's output; the other inputs,
    and `params` (tensors fn reads itself), are parameters. An example runs alone as its row's slice
    from its start to the next start, with its own slice of new_example (True at most at its first
    step, where the state is 0 anyway). Returns (packed, alone): {"out": output, "d" + name: gradient
    of a fixed random linear loss of the output} for the float inputs, and "param<i>" for params. The
    examples' outputs and input gradients are put back in place and their parameter gradients summed,
    so the two are equal exactly when each example of a packed row is computed as if it ran alone."""
    def run(inputs, new_example, weight=None):
        leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point())
                  for k, v in inputs.items()}
        out = fn(**leaves, new_example=new_example)
        if weight is None:
            gen = torch.Generator().manual_seed(seed)
            weight = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        wrt = {**{"d" + k: v for k, v in leaves.items() if v.requires_grad},
               **{f"param{i}": p for i, p in enumerate(params)}}
        grads = torch.autograd.grad((out * weight).sum(), list(wrt.values()))
        return {"out": out.detach(), **dict(zip(wrt, grads))}, weight

    packed, weight = run(inputs, new_example)
    dims = {"out": time_dims["out"], **{"d" + k: dim for k, dim in time_dims.items()}}
    alone = {k: torch.zeros_like(v) for k, v in packed.items()}
    for row, s, e in example_spans(new_example):
        cut = lambda t, dim: t[row:row + 1].narrow(dim, s, e - s)  # the example's part of a row
        sliced = {k: cut(v, time_dims[k]) if k in time_dims else v for k, v in inputs.items()}
        result, _ = run(sliced, new_example[row:row + 1, s:e], cut(weight, time_dims["out"]))
        for k, v in result.items():
            if k in dims:
                cut(alone[k], dims[k]).copy_(v)
            else:  # a parameter
                alone[k] += v
    return packed, alone
