"""mimetic_kernels.py: every backend of selective_scan and ssd_scan against the reference loop, gradients included,
and clear errors on bad input. The Triton kernels run in Triton's interpreter on a machine without a GPU."""
import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import types
import warnings

import pytest
import torch

import mimetic_kernels as kernels
from conftest import HERE, new_example_at, packed_and_alone, rel_err

# ---------------------------------------------------------------------------------------------------
# mimetic_kernels.py: every backend against the reference loop, gradients included

CUDA = torch.cuda.is_available()
TRITON_OK = kernels.triton is not None and (CUDA or kernels._INTERPRETED)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton missing, or interpreter not on for CPU")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.fixture
def device():
    return torch.device("cuda" if CUDA else "cpu")


def scan_inputs(b=2, dim=8, N=5, L=37, G=2, z=True, D=True, bias=True, dtype=torch.float32, device="cpu",
                seed=0):
    """Inputs of selective_scan; G=None gives ungrouped B, C of shape (b, N, L)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=gen)
    bc = (b, N, L) if G is None else (b, G, N, L)
    x = dict(u=r(b, dim, L), delta=r(b, dim, L, scale=0.5), A=-torch.exp(r(dim, N, scale=0.5)), B=r(*bc), C=r(*bc),
             D=r(dim) if D else None, z=r(b, dim, L) if z else None, delta_bias=r(dim, scale=0.3) if bias else None)
    act = ("u", "delta", "B", "C", "z")  # activations take `dtype`; A, D, delta_bias stay fp32 as in Mamba
    return {k: None if v is None else v.to(device, dtype if k in act else torch.float32) for k, v in x.items()}


def run_scan(inputs, backend, softplus=True, seed=1, autocast=False, new_example=None):
    """Output, last state and the gradient of every input for a fixed random linear loss."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # forward only, as PyTorch advises
        y, last = kernels.selective_scan(**leaves, delta_softplus=softplus, return_last_state=True,
                                         new_example=new_example, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    wy, wl = (torch.randn(t.shape, generator=gen).to(t.device) for t in (y, last))
    ((y.float() * wy).sum() + (last * wl).sum()).backward()
    return {"y": y, "last": last, **{"d" + k: v.grad for k, v in leaves.items() if v is not None}}


def assert_all_close(got, want, tol):
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert rel_err(got[k], want[k]) <= tol, (k, rel_err(got[k], want[k]))


# ----------------------------------------------------------------------------- the reference itself


def test_ref_matches_hand_computed_two_steps():
    u, delta = torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[0.5, 0.25]]])
    A, B, C = torch.tensor([[-2.0]]), torch.tensor([[[3.0, -1.0]]]), torch.tensor([[[0.5, 2.0]]])
    D, z = torch.tensor([0.1]), torch.tensor([[[0.0, 1.0]]])
    h0 = 0.5 * 3.0 * 1.0
    h1 = torch.exp(torch.tensor(0.25 * -2.0)) * h0 + 0.25 * -1.0 * 2.0
    y1 = (2.0 * h1 + 0.1 * 2.0) * torch.sigmoid(torch.tensor(1.0))  # gated by silu(1) = sigmoid(1)
    want = torch.stack([torch.tensor(0.0), y1])  # silu(0) = 0 gates the first step off
    y, last = kernels.selective_scan(u, delta, A, B, C, D, z, return_last_state=True, backend="ref")
    torch.testing.assert_close(y.flatten(), want)
    torch.testing.assert_close(last.flatten(), h1.reshape(1))


# ----------------------------------------------------------------------------- PyTorch backend

SCAN_CASES = [  # L=37 spans chunks of 8 with a remainder; L=16 ends exactly on a chunk; L=1 is one step
    dict(G=None, z=True, D=True, bias=True, softplus=True, L=37),
    dict(G=1, z=False, D=False, bias=False, softplus=False, L=37),
    dict(G=2, z=True, D=True, bias=True, softplus=True, L=16),
    dict(G=2, z=False, D=True, bias=False, softplus=True, L=1),
]


@pytest.mark.parametrize("case", SCAN_CASES)
@pytest.mark.parametrize("chunk", [8, 1])
def test_torch_backend_matches_ref(case, chunk, monkeypatch):
    monkeypatch.setattr(kernels, "TORCH_CHUNK", chunk)
    case = dict(case)
    softplus = case.pop("softplus")
    inputs = scan_inputs(**case)
    assert_all_close(run_scan(inputs, "torch", softplus), run_scan(inputs, "ref", softplus), 1e-5)


@pytest.mark.parametrize("chunk", [3, 1])
def test_torch_backend_gradcheck_fp64(chunk, monkeypatch):
    monkeypatch.setattr(kernels, "TORCH_CHUNK", chunk)
    x = scan_inputs(b=1, dim=4, N=3, L=7, G=2, dtype=torch.float64)
    x = {k: v.double().requires_grad_() for k, v in x.items()}
    fn = lambda *args: kernels.selective_scan(*args, delta_softplus=True, return_last_state=True, backend="torch")
    assert torch.autograd.gradcheck(fn, tuple(x[k] for k in SCAN_ARGS), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_torch_backend_matches_ref_at_the_main_jobs_mamba1_sizes():
    """fig1's CPU Mamba 1 (D = 128, N = 32) on its longest batch (34 tokens): the CPU cache budget cuts it
    into chunks of 4 steps, so this also checks states carried across chunks at the real sizes."""
    inputs = scan_inputs(b=32, dim=128, N=32, L=34, G=None)
    assert kernels._torch_chunk_len(inputs["u"], 32) == 4
    assert_all_close(run_scan(inputs, "torch"), run_scan(inputs, "ref"), 1e-5)


def test_torch_backend_saves_chunk_states_not_all_states(monkeypatch):
    monkeypatch.setattr(kernels, "TORCH_CHUNK", 64)
    b, dim, N, L = 2, 8, 16, 512
    x = {k: v.requires_grad_() for k, v in scan_inputs(b=b, dim=dim, N=N, L=L, G=1).items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = kernels.selective_scan(**x, delta_softplus=True, backend="torch")
    beyond_inputs = sum(saved) - sum(v.numel() for v in x.values())
    assert 0 < beyond_inputs <= (L // 64) * b * dim * N  # one state per chunk, not one per step
    y.sum().backward()
    assert x["A"].grad.abs().sum() > 0


def test_default_backend_on_cpu_is_torch():
    if CUDA:
        pytest.skip("on a GPU the default is triton")
    x = scan_inputs()
    assert torch.equal(kernels.selective_scan(**x, backend=None), kernels.selective_scan(**x, backend="torch"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_low_precision(dtype):
    x = scan_inputs(L=40, dtype=dtype)
    got = run_scan(x, "torch")
    want = run_scan({k: None if v is None else v.float() for k, v in x.items()}, "ref")
    assert got["y"].dtype == dtype and got["du"].dtype == dtype and got["dA"].dtype == torch.float32
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k], rtol=3e-2, atol=5e-2)


def test_math_stays_fp32_under_autocast():
    x, xs = scan_inputs(L=20), ssd_inputs(L=20)
    want, want_ssd = run_scan(x, "torch"), run_ssd(xs, "torch")
    got, got_ssd = run_scan(x, "torch", autocast=True), run_ssd(xs, "torch", autocast=True)
    assert_all_close(got, want, 1e-6)
    assert_all_close(got_ssd, want_ssd, 1e-6)


# ----------------------------------------------------------------------------- Triton backend

TRITON_CASES = [  # few and tiny: the interpreter is slow. N=5 is padded to 8 lanes inside the kernel
    dict(G=None, z=True, D=True, bias=True, softplus=True, L=37),
    dict(G=2, z=False, D=False, bias=False, softplus=False, L=20),
    dict(G=2, z=True, D=False, bias=True, softplus=True, L=16),
]


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_backend_matches_ref(case, device, monkeypatch):
    monkeypatch.setattr(kernels, "TRITON_CHUNK", 16)  # L=37: chunks of 16, 16 and 5
    case = dict(case)
    softplus = case.pop("softplus")
    inputs = scan_inputs(**case, device=device)
    assert_all_close(run_scan(inputs, "triton", softplus), run_scan(inputs, "ref", softplus), 1e-5)


@needs_triton
def test_triton_backend_bf16(device):
    x = scan_inputs(L=21, dtype=torch.bfloat16, device=device)
    got = run_scan(x, "triton")
    want = run_scan({k: None if v is None else v.float() for k, v in x.items()}, "ref")
    assert got["y"].dtype == torch.bfloat16 and got["dB"].dtype == torch.bfloat16
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k], rtol=3e-2, atol=5e-2)


@needs_triton
def test_triton_backend_rejects_fp64():
    with pytest.raises(ValueError, match="fp64"):
        kernels.selective_scan(**scan_inputs(dtype=torch.float64), backend="triton")


# ----------------------------------------------------------------------------- SSD (Mamba2)


def ssd_inputs(b=2, L=45, H=4, P=3, G=2, N=5, D=True, bias=True, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=gen)
    x = dict(x=r(b, L, H, P), dt=r(b, L, H, scale=0.5), A=-torch.exp(r(H, scale=0.5)), B=r(b, L, G, N),
             C=r(b, L, G, N), D=r(H) if D else None, dt_bias=r(H, scale=0.3) if bias else None)
    act = ("x", "dt", "B", "C")
    return {k: None if v is None else v.to(device, dtype if k in act else torch.float32) for k, v in x.items()}


def run_ssd(inputs, backend, softplus=True, chunk_size=16, seed=1, autocast=False,
            new_example=None):
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, last = kernels.ssd_scan(**leaves, dt_softplus=softplus, chunk_size=chunk_size, return_last_state=True,
                                   new_example=new_example, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    wy, wl = (torch.randn(t.shape, generator=gen).to(t.device) for t in (y, last))
    ((y.float() * wy).sum() + (last * wl).sum()).backward()
    return {"y": y, "last": last, **{"d" + k: v.grad for k, v in leaves.items() if v is not None}}


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("L", [45, 32, 5])  # not a multiple of chunk_size=16, a multiple, shorter than one chunk
@pytest.mark.parametrize("extras", [True, False], ids=["D-bias-softplus", "plain"])
def test_ssd_torch_matches_ref(G, L, extras):
    x = ssd_inputs(L=L, G=G, D=extras, bias=extras)
    assert_all_close(run_ssd(x, "torch", extras), run_ssd(x, "ref", extras), 1e-5)


@pytest.mark.parametrize("chunk_size", [1, 7, 15, 16, 44, 45, 64])  # 45 steps in 45, 7, 3, 3, 2, 1 and 1 chunks
def test_ssd_torch_result_does_not_depend_on_the_chunk_size(chunk_size):
    x = ssd_inputs(L=45)
    assert_all_close(run_ssd(x, "torch", chunk_size=chunk_size), run_ssd(x, "ref"), 1e-5)


def test_ssd_ref_is_selective_scan_per_head_channel():
    x = ssd_inputs(b=1, L=9, H=2, P=2, G=1, N=3)
    y = kernels.ssd_scan(**x, dt_softplus=True, backend="ref")
    for h in range(2):
        for p in range(2):  # one Mamba1 channel with A = A_h in every state entry
            yc = kernels.selective_scan_ref(
                x["x"][:, :, h, p][:, None], x["dt"][:, :, h][:, None], x["A"][h].expand(1, 3),
                x["B"][:, :, 0].transpose(1, 2), x["C"][:, :, 0].transpose(1, 2), x["D"][h:h + 1],
                delta_bias=x["dt_bias"][h:h + 1], delta_softplus=True)
            assert rel_err(y[:, :, h, p], yc[:, 0]) <= 1e-6


@needs_triton
def test_ssd_triton_matches_torch(device):
    x = ssd_inputs(b=1, L=20, H=2, P=2, G=2, N=4, device=device)
    assert_all_close(run_ssd(x, "triton"), run_ssd(x, "torch"), 1e-5)


def test_ssd_bf16():
    x = ssd_inputs(dtype=torch.bfloat16)
    got = run_ssd(x, None)
    want = run_ssd({k: None if v is None else v.float() for k, v in x.items()}, "ref")
    assert got["y"].dtype == torch.bfloat16 and got["last"].dtype == torch.float32
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k], rtol=3e-2, atol=5e-2)


# ----------------------------------------------------------------------------- causal conv


@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv1d_is_nn_conv1d_cut_to_length(bias):
    """kernels.causal_conv1d on (b, L, C) gives nn.Conv1d(groups=C, padding=K-1)[..., :L]'s output and gradients
    (mimetic.py's readable path), and under bf16 autocast the same dtype as the conv."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3, bias=bias)
    x = torch.randn(2, 9, 6, requires_grad=True)
    got = kernels.causal_conv1d(x, conv.weight, conv.bias)
    want = conv(x.transpose(1, 2))[..., :9].transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    grads = [torch.autograd.grad(y.square().sum(), [x, *conv.parameters()]) for y in (got, want)]
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.causal_conv1d(x.bfloat16(), conv.weight, conv.bias).dtype == conv(x.transpose(1, 2)).dtype


# ----------------------------------------------------------------------------- a reset at example starts

# 2 rows of 37 steps: starts on chunk edges (16, with chunks of 8 or 16) and inside chunks, a one-step
# example (16), one at the last step, and a first example with no flag (row 1's steps 0-2)
PACKED_STARTS = ([0, 5, 16, 17, 30], [3, 15, 36])
SCAN_TIME = dict(u=2, delta=2, B=3, C=3, z=2, out=2)  # the time axis of selective_scan's tensors
SSD_TIME = dict(x=1, dt=1, B=1, C=1, out=1)


def test_ref_with_new_example_runs_each_example_alone():
    """The spec, in fp64: with new_example, each packed example's output and input gradients are those
    of the example run alone, and the parameter gradients their sum; without it, examples share state."""
    x = {k: v.double() for k, v in scan_inputs(L=37).items()}
    ref = lambda new_example, **x: kernels.selective_scan(**x, delta_softplus=True,
                                                          new_example=new_example, backend="ref")
    packed, alone = packed_and_alone(ref, x, SCAN_TIME, new_example_at(37, *PACKED_STARTS))
    assert_all_close(packed, alone, 1e-12)
    assert rel_err(ref(None, **x), alone["out"]) > 0.1


@pytest.mark.parametrize("chunk", [8, 1])
def test_torch_backend_with_new_example_matches_ref(chunk, monkeypatch):
    monkeypatch.setattr(kernels, "TORCH_CHUNK", chunk)  # the backward recomputes chunks of states
    x, new_example = scan_inputs(L=37), new_example_at(37, *PACKED_STARTS)
    assert_all_close(run_scan(x, "torch", new_example=new_example),
                     run_scan(x, "ref", new_example=new_example), 1e-5)


@needs_triton
@pytest.mark.long
def test_triton_backend_with_new_example_matches_ref(device, monkeypatch):
    monkeypatch.setattr(kernels, "TRITON_CHUNK", 16)
    x, new_example = scan_inputs(L=37, device=device), new_example_at(37, *PACKED_STARTS).to(device)
    assert_all_close(run_scan(x, "triton", new_example=new_example),
                     run_scan(x, "ref", new_example=new_example), 1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 16, 37, 64])  # 37, 8, 5, 3, 1 and 1 chunks
def test_ssd_torch_with_new_example_matches_ref_at_any_chunk_size(chunk_size):
    """Outputs, last state and gradients. An SSD that cut the state with a huge negative log decay and
    then subtracted cumulative sums would lose every digit of the steps after a start."""
    x, new_example = ssd_inputs(L=37), new_example_at(37, *PACKED_STARTS)
    assert_all_close(run_ssd(x, "torch", chunk_size=chunk_size, new_example=new_example),
                     run_ssd(x, "ref", new_example=new_example), 1e-5)


def test_ssd_torch_with_new_example_runs_each_example_alone():
    x = {k: v.double() for k, v in ssd_inputs(L=37).items()}
    ssd = lambda new_example, **x: kernels.ssd_scan(**x, dt_softplus=True, chunk_size=8,
                                                    new_example=new_example, backend="torch")
    packed, alone = packed_and_alone(ssd, x, SSD_TIME, new_example_at(37, *PACKED_STARTS))
    assert_all_close(packed, alone, 1e-12)
    assert rel_err(ssd(None, **x), alone["out"]) > 0.1


def test_causal_conv1d_with_new_example_runs_each_example_alone():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3).double()
    conv1d = lambda x, new_example: kernels.causal_conv1d(x, conv.weight, conv.bias, new_example)
    x = torch.randn(2, 20, 6, dtype=torch.float64)
    new_example = new_example_at(20, [0, 2, 3, 9], [5, 19])  # examples of 1 to 11 steps
    packed, alone = packed_and_alone(conv1d, dict(x=x), dict(x=1, out=1), new_example,
                                     list(conv.parameters()))
    assert_all_close(packed, alone, 1e-12)
    assert rel_err(conv1d(x, None), alone["out"]) > 0.1


def test_new_example_where_nothing_is_carried_changes_no_bit():
    """One example per row (a start at step 0 only): each fast path gives, bit for bit, the outputs
    and gradients it gives without new_example; masking only multiplies by 1 or drops a zero state."""
    first = new_example_at(37, [0], [0])
    x, xs = scan_inputs(L=37), ssd_inputs(L=37)
    for got, want in ((run_scan(x, "torch", new_example=first), run_scan(x, "torch")),
                      (run_ssd(xs, "torch", chunk_size=8, new_example=first),
                       run_ssd(xs, "torch", chunk_size=8))):
        assert all(torch.equal(got[k], want[k]) for k in want)
    u, weight, bias = torch.randn(2, 37, 6), torch.randn(6, 1, 4), torch.randn(6)
    assert torch.equal(kernels.causal_conv1d(u, weight, bias, first),
                       kernels.causal_conv1d(u, weight, bias))


def test_new_example_must_be_a_bool_mask_of_batch_by_length():
    for bad, match in ((torch.zeros(2, 37, dtype=torch.int32), "bool tensor"),  # mamba_ssm's seq_idx
                       (torch.zeros(2, 36, dtype=torch.bool), r"shape \(batch, L\) = \(2, 37\)")):
        with pytest.raises(ValueError, match=match):
            kernels.selective_scan(**scan_inputs(L=37), new_example=bad)
        with pytest.raises(ValueError, match=match):
            kernels.ssd_scan(**ssd_inputs(L=37), new_example=bad)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("change, match", [
    (dict(A=torch.zeros(8)), r"A must have shape \(dim, N\)"),
    (dict(A=torch.zeros(7, 5)), r"A must have shape \(dim, N\)"),
    (dict(B=torch.zeros(2, 3, 5, 37), C=torch.zeros(2, 3, 5, 37)), "not divisible by G"),
    (dict(C=torch.zeros(2, 2, 5, 36)), r"C must have shape \(batch, G, N, L\) = \(2, 2, 5, 37\)"),
    (dict(delta=torch.zeros(2, 8, 36)), r"delta must have shape \(batch, dim, L\)"),
    (dict(z=torch.zeros(2, 8, 37, dtype=torch.float16)), "z has dtype"),
    (dict(D=torch.zeros(9)), r"D must have shape \(dim,\)"),
    (dict(delta_bias=torch.zeros(8, 1)), r"delta_bias must have shape \(dim,\)"),
])
def test_selective_scan_rejects_bad_inputs(change, match):
    with pytest.raises(ValueError, match=match):
        kernels.selective_scan(**{**scan_inputs(), **change}, backend="torch")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        kernels.selective_scan(**scan_inputs(), backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.ssd_scan(**ssd_inputs(), backend="fast")


def test_ssd_rejects_bad_inputs():
    with pytest.raises(ValueError, match="not divisible by G"):
        kernels.ssd_scan(**{**ssd_inputs(), "B": torch.zeros(2, 45, 3, 5), "C": torch.zeros(2, 45, 3, 5)})
    with pytest.raises(ValueError, match=r"A must have shape \(H,\)"):
        kernels.ssd_scan(**{**ssd_inputs(), "A": torch.zeros(4, 5)})
    with pytest.raises(ValueError, match="chunk_size"):
        kernels.ssd_scan(**ssd_inputs(), chunk_size=0)
    with pytest.raises(ValueError, match="x must be fp16, bf16, fp32 or fp64"):
        kernels.ssd_scan(**{**ssd_inputs(), "x": torch.zeros(2, 45, 4, 3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="B has dtype"):
        kernels.ssd_scan(**{**ssd_inputs(), "B": torch.zeros(2, 45, 2, 5, dtype=torch.float64)})


def test_triton_backend_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "triton", None)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        kernels.selective_scan(**scan_inputs(), backend="triton")
    x = scan_inputs()
    assert rel_err(kernels.selective_scan(**x, delta_softplus=True), kernels.selective_scan(**x, backend="ref",
                                                                                           delta_softplus=True)) < 1e-5


@pytest.mark.long
def test_kernels_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import mimetic_kernels as kernels, torch; assert kernels.triton is None; "
            "y = kernels.selective_scan(torch.randn(1, 2, 3), torch.rand(1, 2, 3), -torch.ones(2, 4), "
            "torch.randn(1, 4, 3), torch.randn(1, 4, 3)); assert y.shape == (1, 2, 3) and y.isfinite().all()")
    done = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_kernels_imports_with_a_triton_older_than_3_4(monkeypatch):
    """Triton < 3.4 has no triton.knobs: the interpreter switch is then read from TRITON_INTERPRET."""
    if kernels.triton is None:
        pytest.skip("needs triton")
    old = types.ModuleType("triton")
    old.__dict__.update({k: v for k, v in vars(kernels.triton).items() if k != "knobs"})
    monkeypatch.setitem(sys.modules, "triton", old)
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        spec = importlib.util.spec_from_file_location("kernels_on_old_triton", os.path.join(HERE, "mimetic_kernels.py"))
        fresh = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fresh)
        assert fresh.triton is old and fresh._INTERPRETED == (interpret == "1")


@needs_triton
@pytest.mark.long
def test_triton_launches_run_on_the_tensors_device(monkeypatch):
    """Each Triton launch, forward and backward, runs under a guard that makes the tensors' GPU current
    (under torchrun, rank k's tensors are on cuda:k while Triton launches on the current device)."""
    guarded = []

    @contextlib.contextmanager
    def record(t):
        guarded.append(t.device)
        yield
    monkeypatch.setattr(kernels, "_on_device", record)
    run_scan(scan_inputs(L=8), "triton")
    assert guarded == [torch.device("cpu")] * 2
    rank_1 = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda:1"))
    monkeypatch.undo()
    assert kernels._on_device(rank_1).idx == 1


def auto_on_cpu(monkeypatch):
    """SCAN_BACKEND "auto" trying Triton on this CPU (in the interpreter) as it would on a GPU."""
    monkeypatch.setattr(kernels, "AUTO_TRITON_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(kernels, "_auto_choice", {})


@needs_triton
def test_auto_backend_falls_back_to_torch_once_when_triton_raises(monkeypatch):
    auto_on_cpu(monkeypatch)
    x = scan_inputs(L=8)
    want = kernels.selective_scan(**x, delta_softplus=True, backend="torch")
    kernels._auto_choice[torch.device("cpu")] = "triton"  # the self-check passed; a later launch fails

    def fails(*args):
        raise RuntimeError("ptxas fatal: out of registers")
    monkeypatch.setattr(kernels._SelectiveScanTriton, "apply", fails)
    with pytest.warns(UserWarning, match="out of registers.*using the torch backend"):
        assert torch.equal(kernels.selective_scan(**x, delta_softplus=True), want)
    assert kernels.backends_in_use("cpu") == {"selective_scan": "torch", "ssd_scan": "torch"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: later calls go straight to torch
        assert torch.equal(kernels.selective_scan(**x, delta_softplus=True), want)
    with pytest.raises(RuntimeError, match="out of registers"):  # asked for by name: no fallback
        kernels.selective_scan(**x, backend="triton")
    kernels._auto_choice.clear()  # a device's first call: the self-check meets the failure
    with pytest.warns(UserWarning, match="out of registers"):
        assert kernels.backends_in_use("cpu")["selective_scan"] == "torch"


@needs_triton
@pytest.mark.long
def test_auto_backend_takes_triton_after_its_self_check_passes(monkeypatch):
    auto_on_cpu(monkeypatch)
    assert kernels.backends_in_use("cpu") == {"selective_scan": "triton", "ssd_scan": "torch"}
    monkeypatch.setattr(kernels, "SCAN_BACKEND", "triton")
    assert kernels.backends_in_use("cpu") == {"selective_scan": "triton", "ssd_scan": "triton"}
    monkeypatch.setattr(kernels, "SCAN_BACKEND", "torch")
    assert kernels.backends_in_use("cpu") == {"selective_scan": "torch", "ssd_scan": "torch"}


# ----------------------------------------------------------------------------- the GPU compiler, on a CPU

COMPILE_REPORT = """
import contextlib, io, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import mimetic_kernels as kernels
fp32 = ("A_ptr", "D_ptr", "bias_ptr", "keep_ptr", "last_ptr", "starts_ptr", "scratch_ptr", "dlast_ptr",
        "dA_ptr", "dB_ptr", "dC_ptr", "dD_ptr", "dbias_ptr")
variants = [(fn, reset) for fn in (kernels._scan_fwd_kernel, kernels._scan_bwd_kernel)
            for reset in (False, True)]  # reset: with keep_ptr (new_example), else keep_ptr None
for dim, N in ((2048, 32), (128, 16)):  # the paper's Mamba 1 layer, and the Mamba paper's small one
    block_d, block_n, warps = kernels._triton_blocks(64, dim, 1, N)
    for capability in (80, 90):
        for act in ("fp32", "bf16"):
            for fn, reset in variants:
                constants = dict(SOFTPLUS=True, CHUNK=kernels.TRITON_CHUNK, BLOCK_D=block_d, BLOCK_N=block_n,
                                 **({} if reset else dict(keep_ptr=None)))
                signature = {a: "constexpr" if a in constants else "i32" if not a.endswith("_ptr") else
                             "*fp32" if a in fp32 else "*" + act for a in fn.arg_names}
                log = io.StringIO()  # ptxas -v's report, which Triton prints under TRITON_DUMP_PTXAS_LOG=1
                with contextlib.redirect_stdout(log):
                    triton.compile(ASTSource(fn, signature, constexprs=constants),
                                   target=GPUTarget("cuda", capability, 32), options=dict(num_warps=warps))
                registers = re.findall(r"Used (\\d+) registers", log.getvalue())
                spills = [int(n) for n in re.findall(r"(\\d+) bytes spill (?:stores|loads)", log.getvalue())]
                assert registers and spills, "no ptxas report: " + log.getvalue()
                print(f"sm_{capability} {fn.__name__}{' reset' * reset} {act} D={dim} N={N} "
                      f"block {block_d}x{block_n} warps {warps}: {registers[0]} registers, "
                      f"{max(spills)} bytes spilled")
"""


@pytest.mark.long
@pytest.mark.skipif(kernels.triton is None, reason="needs triton")
def test_triton_kernels_compile_for_sm80_and_sm90(capsys):
    """The interpreter runs code that the GPU compiler may still reject: compile both kernels, with
    and without new_example's reset, to PTX and a cubin for the A100 (sm_80) and H100 (sm_90) on this
    CPU, no GPU needed, and print registers and spills."""
    with tempfile.TemporaryDirectory() as cache:  # an empty cache: every kernel goes through ptxas
        env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "TRITON_CACHE_DIR": cache,
               "TRITON_DUMP_PTXAS_LOG": "1"}
        done = subprocess.run([sys.executable, "-c", COMPILE_REPORT], cwd=HERE, capture_output=True, text=True,
                              timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    with capsys.disabled():  # into CI's log
        print("\n" + "\n".join(lines))
    assert len(lines) == 32 and all(line.endswith(" 0 bytes spilled") for line in lines)


# ----------------------------------------------------------------------------- GPU only (run on a GPU later)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_matches_torch_long(dtype, device):
    x = scan_inputs(b=2, dim=64, N=16, L=8192, G=1, dtype=dtype, device=device)
    got, want = run_scan(x, "triton"), run_scan({k: None if v is None else v.float() for k, v in x.items()}, "torch")
    for k in want:
        assert rel_err(got[k].float(), want[k]) <= (1e-5 if dtype == torch.float32 else 2e-2), k


@needs_cuda
def test_gpu_triton_matches_ref_and_is_default(device):
    x = scan_inputs(b=2, dim=48, N=16, L=300, G=2, device=device)
    assert_all_close(run_scan(x, None), run_scan(x, "ref"), 1e-5)
    assert torch.equal(kernels.selective_scan(**x, backend=None), kernels.selective_scan(**x, backend="triton"))


@needs_cuda
def test_gpu_ssd_long(device):
    x = ssd_inputs(b=2, L=2000, H=8, P=16, G=2, N=32, device=device)
    assert_all_close(run_ssd(x, "torch", chunk_size=64), run_ssd(x, "triton", chunk_size=64), 1e-5)


@needs_cuda
def test_gpu_scans_with_new_example_long(device):
    """Triton's scan with resets (also the SSD's "triton" backend) against the torch backends, at 2000
    steps of examples about 50 long."""
    starts = torch.rand(2, 2000, generator=torch.Generator().manual_seed(0)) < 0.02
    new_example = starts.to(device)
    x = scan_inputs(b=2, dim=64, N=16, L=2000, G=1, device=device)
    assert_all_close(run_scan(x, "triton", new_example=new_example),
                     run_scan(x, "torch", new_example=new_example), 1e-5)
    xs = ssd_inputs(b=2, L=2000, H=8, P=16, G=2, N=32, device=device)
    assert_all_close(run_ssd(xs, "torch", chunk_size=64, new_example=new_example),
                     run_ssd(xs, "triton", chunk_size=64, new_example=new_example), 1e-5)


@needs_cuda
def test_gpu_matches_mamba_ssm(device):
    sscan = pytest.importorskip("mamba_ssm.ops.selective_scan_interface").selective_scan_fn
    x = scan_inputs(b=2, dim=64, N=16, L=1000, G=1, device=device)
    got = kernels.selective_scan(**x, delta_softplus=True, backend="triton")
    assert rel_err(got, sscan(**x, delta_softplus=True)) <= 1e-5
