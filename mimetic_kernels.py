"""mimetic_kernels.py — selective-scan kernels for Mamba (S6) and Mamba2 (SSD) layers. (Not kernels.py: that
name would shadow Hugging Face's `kernels` package, which transformers imports.)

Two entry points, both differentiable in every tensor argument:

    selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, *,
                   new_example, backend)
        Mamba1 scan, same arguments and meaning as mamba_ssm's `selective_scan_fn`, and new_example.
    ssd_scan(x, dt, A, B, C, D, *, dt_bias, dt_softplus, chunk_size, return_last_state, new_example,
             backend)
        Mamba2 scan (one scalar decay rate per head), computed in chunked matmul ("SSD") form.

and causal_conv1d(x, weight, bias, new_example), the depthwise causal conv both Mambas run before
their scan.

Backends of selective_scan:
    "ref"    the specification: mimetic.py's selective_scan_loop, a plain loop over time,
             differentiated by autograd (slow).
    "torch"  PyTorch, one step at a time on a state updated in place, hand-written backward; runs anywhere.
    "triton" Triton forward and backward kernels (CUDA tensors, or CPU with TRITON_INTERPRET=1).
    None     what SCAN_BACKEND says: "auto" (the default) is "triton" for CUDA tensors when triton imports
             and a self-check on the device's first call passes (else "torch", saying why), and it goes on
             with "torch" if a Triton launch raises later; "triton" or "torch" use that one.
ssd_scan's None is "torch" (its chunked matmuls) unless SCAN_BACKEND is "triton".

Glossary (shapes in comments use these letters):
    b        batch size
    D, dim   channels (Mamba1); also the skip weight D of shape (dim,)
    L        sequence length;  t indexes time
    N        state size per channel
    G        number of B/C groups; channel d uses group d // R, where R = dim // G
    u        input (b, D, L);  z: gate (b, D, L), output is y * SiLU(z)
    delta    raw step size (b, D, L);  Δ = softplus(delta + delta_bias) or delta + delta_bias
    A        decay rates (D, N), negative;  a_t = exp(Δ_t A) is the per-step decay
    B, C     input and output projections (b, G, N, L)
    h        state (b, D, N):  h_t = a_t h_{t-1} + Δ_t u_t B_t,  y_t = C_t · h_t + D u_t
    g        adjoint dLoss/dh_t, run backwards: g_t = dy_t C_t + a_{t+1} g_{t+1}
    chunk    a block of T consecutive time steps; backward passes recompute states per chunk
             from the state stored at each chunk start instead of storing (b, D, N, L)
    SSD      Mamba2 layout: x (b, L, H, P) with H heads of P channels, A (H,), B, C (b, L, G, N)
    new_example  (b, L) bool, True where a packed example starts (where mamba_ssm's seq_idx
             changes), or None: there the state restarts from 0 (a_t = 0) and the conv reads no
             earlier token, so each example of a row is computed as if it ran alone

All math runs in fp32 (fp64 when the inputs are fp64, for gradcheck), also inside torch.autocast
regions; outputs take u's (x's) dtype, last states are returned in the math dtype.

`python -m experiments.bench --only scans` times every backend against the reference (and mamba_ssm's CUDA kernels).
"""
import contextlib
import os
import warnings

import torch
import torch.nn.functional as F

try:  # mimetic_kernels.py must import without triton; only the "triton" backend needs it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BACKENDS = ("triton", "torch", "ref")
TORCH_CHUNK = 64  # most time steps per chunk in the PyTorch backend
TORCH_CHUNK_ELEMS = 1 << 24  # cap on b*D*N*T, the size of each per-chunk temporary (GPU)
TORCH_CHUNK_ELEMS_CPU = 1 << 19  # the same on CPU, small enough to stay in cache
TRITON_CHUNK = 16  # time steps between stored states; the backward keeps one chunk of states
SCAN_BACKEND = "auto"  # what backend=None means: "auto", "triton" or "torch" (train.py's --scan-backend)
AUTO_TRITON_DEVICES = ("cuda",)  # device types on which "auto" tries Triton
_auto_choice = {}  # device → the backend "auto" settled on there


# ----------------------------------------------------------------------------- input checks


def _math_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(name, t, layout, shape, like, same_dtype):
    """ValueError naming `name` unless t has `shape` and lives on like's device with an allowed dtype."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape {layout} = {tuple(shape)}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {like.device}")
    allowed = (like.dtype,) if same_dtype else (like.dtype, torch.float32)
    if t.dtype not in allowed:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {allowed}")


def _check_new_example(new_example, batch, L, like):
    if new_example is None:
        return
    if not isinstance(new_example, torch.Tensor) or new_example.dtype != torch.bool:
        raise ValueError(f"new_example must be a bool tensor (True where an example starts), got "
                         f"{getattr(new_example, 'dtype', type(new_example).__name__)}")
    if tuple(new_example.shape) != (batch, L):
        raise ValueError(f"new_example must have shape (batch, L) = ({batch}, {L}), got "
                         f"{tuple(new_example.shape)}")
    if new_example.device != like.device:
        raise ValueError(f"new_example is on {new_example.device}, the inputs on {like.device}")


def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, new_example):
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        raise ValueError(f"u must have shape (batch, dim, L), got {getattr(u, 'shape', type(u).__name__)}")
    if u.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"u must be fp16, bf16, fp32 or fp64, got {u.dtype}")
    batch, dim, L = u.shape
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape (dim, N) = ({dim}, N), got {getattr(A, 'shape', type(A).__name__)}")
    if A.is_complex():
        raise ValueError("A must be real; complex A is not supported")
    N = A.shape[1]
    if not isinstance(B, torch.Tensor) or B.dim() not in (3, 4):
        raise ValueError(f"B must have shape (batch, N, L) or (batch, G, N, L), got {getattr(B, 'shape', None)}")
    G = 1 if B.dim() == 3 else B.shape[1]
    if G < 1 or dim % G:
        raise ValueError(f"B has G={G} groups but dim={dim} is not divisible by G")
    bc_layout, bc_shape = ("(batch, N, L)", (batch, N, L)) if B.dim() == 3 else ("(batch, G, N, L)", (batch, G, N, L))
    _check("delta", delta, "(batch, dim, L)", (batch, dim, L), u, True)
    _check("A", A, "(dim, N)", (dim, N), u, False)
    _check("B", B, bc_layout, bc_shape, u, False)
    _check("C", C, bc_layout, bc_shape, u, False)
    if z is not None:
        _check("z", z, "(batch, dim, L)", (batch, dim, L), u, True)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            _check(name, t, "(dim,)", (dim,), u, False)
    _check_new_example(new_example, batch, L, u)


def _check_ssd_inputs(x, dt, A, B, C, D, dt_bias, chunk_size, new_example):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must have shape (batch, L, H, P), got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"x must be fp16, bf16, fp32 or fp64, got {x.dtype}")
    batch, L, H, P = x.shape
    if not isinstance(B, torch.Tensor) or B.dim() != 4 or B.shape[:2] != (batch, L):
        raise ValueError(f"B must have shape (batch, L, G, N) = ({batch}, {L}, G, N), got {getattr(B, 'shape', None)}")
    G, N = B.shape[2:]
    if G < 1 or H % G:
        raise ValueError(f"B has G={G} groups but H={H} heads is not divisible by G")
    _check("dt", dt, "(batch, L, H)", (batch, L, H), x, True)
    _check("A", A, "(H,)", (H,), x, False)
    _check("B", B, "(batch, L, G, N)", (batch, L, G, N), x, False)
    _check("C", C, "(batch, L, G, N)", (batch, L, G, N), x, False)
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            _check(name, t, "(H,)", (H,), x, False)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_new_example(new_example, batch, L, x)


def _pick_backend(backend, device, default_triton):
    if backend is None:
        backend = SCAN_BACKEND if SCAN_BACKEND != "auto" else _auto_backend(device) if default_triton else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None")
    if backend == "triton":
        if triton is None:
            raise RuntimeError("backend='triton' needs the triton package, which is not importable; use 'torch'")
        if device.type != "cuda" and not _INTERPRETED:
            raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing")
    return backend


def _auto_backend(device):
    """"triton" if triton imports and, on this device's first call, a small forward and backward through it
    matches the torch backend; else "torch", saying why once."""
    if triton is None or device.type not in AUTO_TRITON_DEVICES:
        return "torch"
    if device not in _auto_choice:
        _auto_choice[device] = "torch"  # while the check runs, and if it fails
        try:
            err = _triton_vs_torch(device)
            _auto_choice[device] = "triton" if err < 1e-4 else _fall_back(device, f"off by {err:.1e}")
        except Exception as e:  # a compiler, driver or launch error
            _fall_back(device, e)
    return _auto_choice[device]


@torch.enable_grad()  # also when the first call comes from an evaluation under no_grad
def _triton_vs_torch(device):
    """Largest relative error of Triton's output and gradients against the torch backend's, at small shapes."""
    g = torch.Generator().manual_seed(0)
    shapes = ((2, 8, 20), (2, 8, 20), (8, 16), (2, 2, 16, 20), (2, 2, 16, 20), (8,), (2, 8, 20), (8,))
    x = [torch.randn(shape, generator=g) for shape in shapes]  # u, delta, A, B, C, D, z, delta_bias
    x[2] = -x[2].exp()  # A < 0
    x = [t.to(device).requires_grad_() for t in x]
    runs = []
    for backend in ("triton", "torch"):
        y = selective_scan(*x, delta_softplus=True, backend=backend)
        runs.append([y, *torch.autograd.grad(y.square().sum(), x)])
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(*runs))


def _fall_back(device, why):
    warnings.warn(f"Triton's selective scan failed on {device} ({why}); using the torch backend there")
    _auto_choice[device] = "torch"
    return "torch"


def backends_in_use(device):
    """{"selective_scan": ..., "ssd_scan": ...}: what backend=None runs on `device` (its first call runs the
    self-check of "auto")."""
    device = torch.device(device)
    return {name: _pick_backend(None, device, name == "selective_scan") for name in ("selective_scan", "ssd_scan")}


def _delta(delta, delta_bias, softplus):
    """Δ from the raw step size: (b, D, L) -> (b, D, L)."""
    dl = delta if delta_bias is None else delta + delta_bias[:, None]
    return F.softplus(dl) if softplus else dl


def _keep(new_example, dtype):
    """(b, L) in the math dtype: 0 where an example starts, 1 elsewhere. It multiplies the decay
    a_t, so the state restarts from 0 there; None stays None, and the scans run as without it."""
    return None if new_example is None else (~new_example).to(dtype)


# ----------------------------------------------------------------------------- reference


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, new_example=None):
    """The specification: mimetic.selective_scan_loop, one time step per iteration, differentiated by
    autograd, run in the math dtype with the D skip and the z gate around it. No input checks."""
    from mimetic import selective_scan_loop  # here, not at the top: mimetic imports this file
    f = _math_dtype(u.dtype)
    dl = _delta(delta.to(f), None if delta_bias is None else delta_bias.to(f), delta_softplus)  # (b, D, L)
    u_ = u.to(f)
    if B.dim() == 3:  # one group
        B, C = B[:, None], C[:, None]  # (b, 1, N, L)
    y, h = selective_scan_loop(u_, dl, A.to(f), B.to(f), C.to(f), new_example, return_last_state=True)
    if D is not None:
        y = y + D.to(f)[:, None] * u_
    if z is not None:
        y = y * F.silu(z.to(f))
    return (y.to(u.dtype), h) if return_last_state else y.to(u.dtype)


# ----------------------------------------------------------------------------- PyTorch backend
# Internally time comes first, (L, b, G, R) and (L, b, G, N), so each step is a contiguous block of memory.

LOG2E = 1.4426950408889634  # exp(x) = 2^(x log2 e)


def _per_step(keep, L):
    """keep (b, L) as L views (b, 1, 1, 1), one per step, or None where no row starts an example:
    packed examples start at a few steps in a hundred, and the others skip a multiply by 1 (a
    Mamba 1 step on packed rows of 220: +13% with it at every step, measured 2026-12-06)."""
    if keep is None:
        return [None] * L
    starts_here = (keep == 0).any(0).tolist()  # one read of the device
    return [k if s else None for k, s in zip(keep.T[:, :, None, None, None].unbind(), starts_here)]


def _torch_chunk_len(u, N):
    """Steps between saved states: cache-sized on CPU, memory-sized on GPU."""
    budget = TORCH_CHUNK_ELEMS if u.is_cuda else TORCH_CHUNK_ELEMS_CPU
    return max(1, min(TORCH_CHUNK, budget // u[..., 0].numel() // N))


def _decay(dl_t, A2, out, keep_t=None):
    """a_t = exp(Δ_t A) = 2^(Δ_t A log2 e) from Δ_t (b, G, R, 1), written into `out` (b, G, R, N),
    times keep_t (b, 1, 1, 1) if given (0: an example starts at t). On CPU exp2 is about 3× faster
    than exp (torch 2.13, AVX-512), and writing into `out` skips allocating a (b, D, N) tensor per
    step."""
    torch.mul(dl_t, A2, out=out).exp2_()
    return out if keep_t is None else out.mul_(keep_t)


class _SelectiveScanTorch(torch.autograd.Function):
    """PyTorch scan, one time step per iteration on a (b, G, R, N) state updated in place. Inputs are in
    the math dtype, B and C grouped (b, G, N, L).

    The (b, D, N, L) tensors Ā and B̄u are never built: each step makes its (b, D, N) slice into a buffer
    and folds it into the state, so at the main job's sizes the work stays in cache. Only the state at each
    chunk start is saved; backward recomputes a chunk's states from it, then runs the adjoint g backwards.
    keep (b, L) or None multiplies each a_t; where it is 0, so are g's path back through a_t and
    dLoss/d(Δ_t A).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, keep):
        ctx.set_materialize_grads(False)
        (b, dim, L), (G, N) = u.shape, B.shape[1:3]
        R, T = dim // G, _torch_chunk_len(u, N)
        tf = lambda t: t.view(b, G, -1, L).permute(3, 0, 1, 2).contiguous()  # (b, D or N, L) -> (L, b, G, R or N)
        dl, Bf, Cf = tf(_delta(delta, delta_bias, softplus)), tf(B), tf(C)
        A2, dlu = A.view(G, R, N) * LOG2E, dl * tf(u)
        h, a, ys = u.new_zeros(b, G, R, N), u.new_empty(b, G, R, N), []
        starts = u.new_empty(-(-L // T), b, G, R, N)
        steps = zip(dl[..., None].unbind(), dlu[..., None].unbind(), Bf[:, :, :, None].unbind(),
                    Cf.unbind(), _per_step(keep, L))
        for t, (dl_t, dlu_t, B_t, C_t, keep_t) in enumerate(steps):
            if t % T == 0:
                starts[t // T] = h
            # h_t = a_t h_{t-1} + Δ_t u_t B_t
            h.mul_(_decay(dl_t, A2, a, keep_t)).addcmul_(dlu_t, B_t)
            ys.append(torch.einsum("bgrn,bgn->bgr", h, C_t))  # C_t · h_t
        y = torch.stack(ys).permute(1, 2, 3, 0).reshape(b, dim, L)
        if D is not None:
            y = y + D[:, None] * u
        out = y if z is None else y * F.silu(z)
        ctx.T, ctx.softplus = T, softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, starts, keep)
        return out, h.view(b, dim, N)

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, starts, keep = ctx.saved_tensors
        (b, dim, L), (G, N), T = u.shape, B.shape[1:3], ctx.T
        R = dim // G
        tf = lambda t: t.view(b, G, -1, L).permute(3, 0, 1, 2).contiguous()  # -> (L, b, G, R or N)
        back = lambda t: t.permute(1, 2, 3, 0).reshape(b, -1, L)  # inverse of tf
        dout = torch.zeros_like(u) if dout is None else dout
        dl, uf, Bf, Cf = tf(_delta(delta, delta_bias, ctx.softplus)), tf(u), tf(B), tf(C)
        dyf = tf(dout if z is None else dout * F.silu(z))  # dLoss/dy before the gate
        A3, dlu = A.view(G, R, N), dl * uf
        A2 = A3 * LOG2E
        g = u.new_zeros(b, G, R, N) if dlast is None else dlast.reshape(b, G, R, N).clone()  # a_{t+1} g_{t+1}
        hs, decays = u.new_empty(T + 1, b, G, R, N), u.new_empty(T, b, G, R, N)  # a chunk's h_{t-1}, h_t and a_t
        dlog_a, dA = torch.empty_like(g), torch.zeros_like(g)  # dA per batch row, summed at the end
        y, gB, ddl, dB, dC = (torch.empty_like(t) for t in (uf, uf, uf, Bf, Cf))
        # per-step views, made once: unbind is cheaper than indexing at every step
        dl_, dlu_, dy_ = dl[..., None].unbind(), dlu[..., None].unbind(), dyf[..., None].unbind()  # (b, G, R, 1)
        B_col, C_col = Bf[:, :, :, None].unbind(), Cf[:, :, :, None].unbind()  # (b, G, 1, N)
        dy_row, dlu_row = dyf[..., None, :].unbind(), dlu[..., None, :].unbind()  # (b, G, 1, R)
        keep_ = _per_step(keep, L)  # (b, 1, 1, 1) or None
        for s in reversed(range(0, L, T)):
            e = min(s + T, L)
            hs[0] = starts[s // T]
            for t in range(s, e):  # recompute the chunk's states: hs[t - s + 1] = h_t
                a = _decay(dl_[t], A2, decays[t - s], keep_[t])
                torch.mul(hs[t - s], a, out=hs[t - s + 1]).addcmul_(dlu_[t], B_col[t])
            for t in reversed(range(s, e)):
                h_prev, h, a = hs[t - s], hs[t - s + 1], decays[t - s]
                if z is not None:  # dz needs y
                    y[t] = torch.einsum("bgrn,bgn->bgr", h, Cf[t])
                g.addcmul_(dy_[t], C_col[t])  # now g = dLoss/dh_t
                gB[t] = torch.einsum("bgrn,bgn->bgr", g, Bf[t])
                dB[t] = (dlu_row[t] @ g).squeeze(-2)  # summed over the group's channels
                dC[t] = (dy_row[t] @ h).squeeze(-2)
                torch.mul(g.mul_(a), h_prev, out=dlog_a)  # dLoss/d(Δ_t A) = g_t a_t h_{t-1}; g = a_t g_t goes on
                dA.addcmul_(dlog_a, dl_[t])
                torch.sum(dlog_a.mul_(A3), -1, out=ddl[t])  # an einsum is 3× slower here (CPU)
        D3 = torch.zeros_like(A3[..., 0]) if D is None else D.view(G, R)
        dz = None
        if z is not None:  # out = (y + D u) silu(z)
            sz = torch.sigmoid(z)
            dz = dout * back(y + D3 * uf) * sz * (1 + z * (1 - sz))
        ddelta = back(ddl + gB * uf)
        if ctx.softplus:
            ddelta = ddelta * torch.sigmoid(delta if delta_bias is None else delta + delta_bias[:, None])
        dD = None if D is None else (dyf * uf).sum((0, 1)).view(dim)
        dbias = None if delta_bias is None else ddelta.sum((0, 2))
        return (back(gB * dl + dyf * D3), ddelta, dA.sum(0).view(dim, N), back(dB).view(b, G, N, L),
                back(dC).view(b, G, N, L), dD, dz, dbias, None, None)


# ----------------------------------------------------------------------------- Triton backend

if triton is not None:
    knobs = getattr(triton, "knobs", None)  # new in Triton 3.4; older ones read the environment variable
    _INTERPRETED = bool(knobs.runtime.interpret) if knobs else os.environ.get("TRITON_INTERPRET", "0") == "1"

    # Names follow flash-linear-attention's convention: i_ program ids, o_ offsets, m_ masks, b_ blocks of
    # values loaded into registers; the math keeps the symbols of the module docstring (h, g, a, y).

    @triton.jit
    def _offsets(i_b, i_d, L, DIM, N, R, G, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's channels o_d and state lanes o_n; the mask and offsets of its (D, N) tile; where its
        channels' sequences start in (b, D, L) tensors, and its group's rows of B and C in (b, G, N, L)."""
        o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        o_n = tl.arange(0, BLOCK_N)  # N padded to a power of two; padded lanes have A = B = C = 0, so h = 0
        m_dn = (o_d[:, None] < DIM) & (o_n[None, :] < N)  # (BLOCK_D, BLOCK_N)
        o_dn = o_d[:, None] * N + o_n[None, :]
        o_seq = i_b * DIM * L + o_d * L  # (BLOCK_D,)
        o_bc = (i_b * G + (i_d * BLOCK_D) // R) * N * L + o_n * L  # (BLOCK_N,): a block never straddles groups
        return o_d, o_n, m_dn, o_dn, o_seq, o_bc

    @triton.jit
    def _load_params(A_ptr, D_ptr, bias_ptr, o_d, o_dn, m_dn, BLOCK_D: tl.constexpr):
        """b_A (BLOCK_D, BLOCK_N), b_D and b_bias (BLOCK_D,) in fp32; D and the bias are 0 when absent."""
        b_A = tl.load(A_ptr + o_dn, mask=m_dn, other=0.0).to(tl.float32)
        b_D = tl.zeros([BLOCK_D], tl.float32) if D_ptr is None else tl.load(D_ptr + o_d).to(tl.float32)
        b_bias = tl.zeros([BLOCK_D], tl.float32) if bias_ptr is None else tl.load(bias_ptr + o_d).to(tl.float32)
        return b_A, b_D, b_bias

    @triton.jit
    def _load_step(delta_ptr, u_ptr, B_ptr, o_seq, o_bc, t, b_bias, m_n, SOFTPLUS: tl.constexpr):
        """delta_t + bias, Δ_t, u_t (BLOCK_D,) and B_t (BLOCK_N,) in fp32."""
        b_raw = tl.load(delta_ptr + o_seq + t).to(tl.float32) + b_bias
        b_dl = tl.where(b_raw <= 20.0, tl.log(1.0 + tl.exp(b_raw)), b_raw) if SOFTPLUS else b_raw  # torch's softplus
        b_u = tl.load(u_ptr + o_seq + t).to(tl.float32)
        return b_raw, b_dl, b_u, tl.load(B_ptr + o_bc + t, mask=m_n, other=0.0).to(tl.float32)

    @triton.jit
    def _decay_step(b_dl, b_A, keep_ptr, i_b, L, t):
        """a_t = exp(Δ_t A) (BLOCK_D, BLOCK_N), times keep_t if given (0: an example starts)."""
        a = tl.exp(b_dl[:, None] * b_A)
        if keep_ptr is not None:
            a = a * tl.load(keep_ptr + i_b * L + t)
        return a

    @triton.jit
    def _scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, keep_ptr,
                         out_ptr, last_ptr, starts_ptr, L, DIM, N, R, G, n_chunks,
                         SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr):
        """Sequential over time; the state h (BLOCK_D, BLOCK_N) lives in registers."""
        i_b, i_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
        o_d, o_n, m_dn, o_dn, o_seq, o_bc = _offsets(i_b, i_d, L, DIM, N, R, G, BLOCK_D, BLOCK_N)
        b_A, b_D, b_bias = _load_params(A_ptr, D_ptr, bias_ptr, o_d, o_dn, m_dn, BLOCK_D)
        h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
        for c in range(0, n_chunks):
            if starts_ptr is not None:  # the backward restarts each chunk from here
                tl.store(starts_ptr + (i_b * n_chunks + c) * DIM * N + o_dn, h, mask=m_dn)
            for t in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, L)):
                _, b_dl, b_u, b_B = _load_step(delta_ptr, u_ptr, B_ptr, o_seq, o_bc, t, b_bias, o_n < N, SOFTPLUS)
                b_C = tl.load(C_ptr + o_bc + t, mask=o_n < N, other=0.0).to(tl.float32)
                a = _decay_step(b_dl, b_A, keep_ptr, i_b, L, t)
                h = a * h + (b_dl * b_u)[:, None] * b_B[None, :]
                y = tl.sum(h * b_C[None, :], 1) + b_D * b_u
                if z_ptr is not None:
                    b_z = tl.load(z_ptr + o_seq + t).to(tl.float32)
                    y = y * b_z * tl.sigmoid(b_z)
                tl.store(out_ptr + o_seq + t, y.to(out_ptr.dtype.element_ty))
        tl.store(last_ptr + i_b * DIM * N + o_dn, h, mask=m_dn)

    @triton.jit
    def _scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, keep_ptr,
                         dout_ptr, dlast_ptr, starts_ptr, scratch_ptr, du_ptr, ddelta_ptr, dz_ptr,
                         dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, L, DIM, N, R, G, n_chunks,
                         SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr):
        """Chunks in reverse; per chunk: recompute states into scratch, then step backwards through time.

        dA, dD, dbias are written per batch row and dB, dC per channel block (summed on the host):
        no atomics, so the result is deterministic.
        """
        i_b, i_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
        o_d, o_n, m_dn, o_dn, o_seq, o_bc = _offsets(i_b, i_d, L, DIM, N, R, G, BLOCK_D, BLOCK_N)
        b_A, b_D, b_bias = _load_params(A_ptr, D_ptr, bias_ptr, o_d, o_dn, m_dn, BLOCK_D)
        n_dblk = DIM // BLOCK_D
        o_part = (i_b * n_dblk + i_d) * N * L + o_n * L  # (BLOCK_N,) this block's rows of dB, dC
        # scratch slot k holds h_{s-1+k} for the current chunk [s, e); one (BLOCK_D, BLOCK_N) tile per slot
        o_tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + o_n[None, :]
        scratch = scratch_ptr + (i_b * n_dblk + i_d) * (CHUNK + 1) * BLOCK_D * BLOCK_N + o_tile
        g = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)  # a_{t+1} g_{t+1}: what later steps send back to h_t
        if dlast_ptr is not None:
            g = tl.load(dlast_ptr + i_b * DIM * N + o_dn, mask=m_dn, other=0.0)
        dA = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
        dD = tl.zeros([BLOCK_D], tl.float32)
        dbias = tl.zeros([BLOCK_D], tl.float32)
        for ci in range(0, n_chunks):
            s = (n_chunks - 1 - ci) * CHUNK
            e = tl.minimum(s + CHUNK, L)
            h = tl.load(starts_ptr + (i_b * n_chunks + s // CHUNK) * DIM * N + o_dn, mask=m_dn, other=0.0)
            tl.store(scratch, h)
            for t in range(s, e):
                _, b_dl, b_u, b_B = _load_step(delta_ptr, u_ptr, B_ptr, o_seq, o_bc, t, b_bias, o_n < N, SOFTPLUS)
                a = _decay_step(b_dl, b_A, keep_ptr, i_b, L, t)
                h = a * h + (b_dl * b_u)[:, None] * b_B[None, :]
                tl.store(scratch + (t - s + 1) * BLOCK_D * BLOCK_N, h)
            tl.debug_barrier()  # states stored by one thread are read by another below
            for k in range(0, e - s):  # h is h_t here
                t = e - 1 - k
                h_prev = tl.load(scratch + (t - s) * BLOCK_D * BLOCK_N)
                b_raw, b_dl, b_u, b_B = _load_step(delta_ptr, u_ptr, B_ptr, o_seq, o_bc, t, b_bias, o_n < N, SOFTPLUS)
                b_C = tl.load(C_ptr + o_bc + t, mask=o_n < N, other=0.0).to(tl.float32)
                b_dy = tl.load(dout_ptr + o_seq + t).to(tl.float32)
                if z_ptr is not None:  # out = y * silu(z)
                    b_z = tl.load(z_ptr + o_seq + t).to(tl.float32)
                    sz = tl.sigmoid(b_z)
                    y = tl.sum(h * b_C[None, :], 1) + b_D * b_u
                    tl.store(dz_ptr + o_seq + t, (b_dy * y * sz * (1 + b_z * (1 - sz))).to(dz_ptr.dtype.element_ty))
                    b_dy = b_dy * b_z * sz
                a = _decay_step(b_dl, b_A, keep_ptr, i_b, L, t)
                g += b_dy[:, None] * b_C[None, :]  # now g = dLoss/dh_t
                gB = tl.sum(g * b_B[None, :], 1)
                dlog_a = g * h_prev * a  # dLoss/d(Δ_t A)
                ddl = tl.sum(dlog_a * b_A, 1) + gB * b_u
                if SOFTPLUS:
                    ddl = ddl * tl.sigmoid(b_raw)
                tl.store(du_ptr + o_seq + t, (gB * b_dl + b_dy * b_D).to(du_ptr.dtype.element_ty))
                tl.store(ddelta_ptr + o_seq + t, ddl.to(ddelta_ptr.dtype.element_ty))
                tl.store(dB_ptr + o_part + t, tl.sum(g * (b_dl * b_u)[:, None], 0), mask=o_n < N)
                tl.store(dC_ptr + o_part + t, tl.sum(h * b_dy[:, None], 0), mask=o_n < N)
                dA += dlog_a * b_dl[:, None]
                dD += b_dy * b_u
                dbias += ddl
                g = g * a
                h = h_prev
            tl.debug_barrier()  # the next chunk overwrites scratch
        tl.store(dA_ptr + i_b * DIM * N + o_dn, dA, mask=m_dn)
        tl.store(dD_ptr + i_b * DIM + o_d, dD)
        tl.store(dbias_ptr + i_b * DIM + o_d, dbias)
else:
    _INTERPRETED = False


def _triton_blocks(batch, dim, G, N):
    """Block sizes: a channel block divides R = dim / G, so it never straddles two groups and the kernels'
    unmasked per-channel loads and stores stay in bounds; and there are enough programs to fill a GPU."""
    block_n = triton.next_power_of_2(N)
    R = dim // G
    block_d = min(R & -R, max(1, 512 // block_n))  # R & -R: largest power of two dividing R
    while block_d > 4 and batch * (dim // block_d) < 1024:
        block_d //= 2
    return block_d, block_n, max(1, min(4, block_d * block_n // 128))


def _on_device(t):
    """Triton launches on the current CUDA device, which stays cuda:0 unless set: make it t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class _SelectiveScanTriton(torch.autograd.Function):
    """Triton scan. Inputs keep their dtypes (kernels load and upcast); B and C are grouped
    (b, G, N, L); keep (b, L) fp32 or None, as _SelectiveScanTorch's."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, keep):
        ctx.set_materialize_grads(False)
        u, delta, A, B, C, D, z, delta_bias, keep = (None if t is None else t.contiguous()
                                                     for t in (u, delta, A, B, C, D, z, delta_bias,
                                                               keep))
        (b, dim, L), (G, N) = u.shape, B.shape[1:3]
        block_d, block_n, warps = _triton_blocks(b, dim, G, N)
        n_chunks = triton.cdiv(L, TRITON_CHUNK)
        out = torch.empty_like(u)
        last = u.new_empty(b, dim, N, dtype=torch.float32)
        starts = u.new_empty(b, n_chunks, dim, N, dtype=torch.float32) if any(ctx.needs_input_grad) else None
        with _on_device(u):
            _scan_fwd_kernel[(b, dim // block_d)](
                u, delta, A, B, C, D, z, delta_bias, keep, out, last, starts, L, dim, N, dim // G,
                G, n_chunks, SOFTPLUS=softplus, CHUNK=TRITON_CHUNK, BLOCK_D=block_d,
                BLOCK_N=block_n, num_warps=warps)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, keep, starts)
        ctx.meta = (softplus, TRITON_CHUNK, block_d, block_n, warps)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, keep, starts = ctx.saved_tensors
        softplus, chunk, block_d, block_n, warps = ctx.meta
        (b, dim, L), (G, N) = u.shape, B.shape[1:3]
        n_dblk, f32 = dim // block_d, torch.float32
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        dlast = None if dlast is None else dlast.contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = None if z is None else torch.empty_like(z)
        dA = u.new_empty(b, dim, N, dtype=f32)  # per batch row
        dD, dbias = u.new_empty(b, dim, dtype=f32), u.new_empty(b, dim, dtype=f32)
        dB, dC = u.new_empty(b, n_dblk, N, L, dtype=f32), u.new_empty(b, n_dblk, N, L, dtype=f32)  # per block
        scratch = u.new_empty(b * n_dblk * (chunk + 1) * block_d * block_n, dtype=f32)
        with _on_device(u):
            _scan_bwd_kernel[(b, n_dblk)](
                u, delta, A, B, C, D, z, delta_bias, keep, dout, dlast, starts, scratch, du, ddelta,
                dz, dA, dB, dC, dD, dbias, L, dim, N, dim // G, G, starts.shape[1],
                SOFTPLUS=softplus, CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps)
        per_group = lambda t, like: t.view(b, G, n_dblk // G, N, L).sum(2).to(like.dtype)  # blocks -> groups
        return (du, ddelta, dA.sum(0).to(A.dtype), per_group(dB, B), per_group(dC, C),
                None if D is None else dD.sum(0).to(D.dtype), dz,
                None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype), None, None)


# ----------------------------------------------------------------------------- Mamba1 entry point


# torch.compile runs both entry points eagerly: their loops over chunks depend on the sequence length, so a
# compiled model would recompile for every new length, and Inductor's CPU code for the SSD backward with
# dynamic shapes corrupts memory (torch 2.13). The rest of a compiled model is still compiled.
@torch.compiler.disable
def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, new_example=None, backend=None):
    """Mamba1 selective scan; see the module docstring. Returns y (b, D, L), or (y, last_state (b, D, N))."""
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, new_example)
    auto = backend is None and SCAN_BACKEND == "auto"
    backend = _pick_backend(backend, u.device, default_triton=True)
    if backend == "triton" and u.dtype == torch.float64:
        raise ValueError("backend='triton' supports fp32, bf16 and fp16 inputs, not fp64")
    with torch.autocast(u.device.type, enabled=False):  # keep fp32 math inside mixed-precision regions
        if backend == "ref":
            return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                      return_last_state, new_example)
        if B.dim() == 3:
            B, C = B[:, None], C[:, None]  # (b, 1, N, L)
        if backend == "triton":
            try:
                keep = _keep(new_example, torch.float32)
                y, last = _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias,
                                                     bool(delta_softplus), keep)
            except Exception as e:  # e.g. a compiler error at a shape the self-check did not try
                if not auto:
                    raise
                backend = _fall_back(u.device, e)
        if backend == "torch":
            f = _math_dtype(u.dtype)
            inputs = (None if t is None else t.to(f) for t in (u, delta, A, B, C, D, z, delta_bias))
            keep = _keep(new_example, f)
            y, last = _SelectiveScanTorch.apply(*inputs, bool(delta_softplus), keep)
            y = y.to(u.dtype)
    return (y, last) if return_last_state else y


# ----------------------------------------------------------------------------- Mamba2 (SSD)


def _ssd_torch(x, dl, A, B, C, Q, need_state, new_example=None):
    """Chunked SSD in the math dtype. x (b, L, H, P); dl = Δ (b, L, H); A (H,); B, C (b, L, G, N).

    Returns y and, if need_state, the last state (b, H, P, N). Chunks are at most Q steps, as few as that
    allows, and of equal length, so that padding stays below one step per chunk: padding every sequence to
    a multiple of Q would make most of the (Q, Q) work padding (the CPU main job's 5–34 tokens against
    Q = 64, or 65 against 128). One chunk needs no state passed between chunks.

    new_example (b, L) bool or None: each step gets its example's number (the starts up to it),
    and every decay from step j to step i is masked to exp(-inf) = 0 unless both are in one
    example. Masking by example numbers, never subtracting log decays, keeps -inf - -inf (NaN)
    and the cancellation of large cumulative sums out; the masked terms get no gradient.
    """
    from mimetic import segsum  # the spec's segment sums; imported here, as mimetic imports this file
    (b, L, H, P), (G, N) = x.shape, B.shape[2:]
    nc = -(-L // Q)  # ceil(L / Q) chunks
    Q = -(-L // nc)  # the shortest chunk length that still needs only nc of them
    pad = nc * Q - L  # padded steps have Δ = 0: decay 1 and no input, so they leave the state alone
    pad_time = lambda t: F.pad(t, [0, 0] * (t.dim() - 2) + [0, pad])
    R = H // G
    x, dl, B, C = pad_time(x), pad_time(dl), pad_time(B), pad_time(C)
    xdt = (x * dl[..., None]).view(b, nc, Q, G, R, P)  # Δ_j x_j
    B, C = B.view(b, nc, Q, G, N), C.view(b, nc, Q, G, N)
    log_a = (dl * A).view(b, nc, Q, G, R).permute(0, 3, 4, 1, 2)  # (b, G, R, nc, Q): Δ_t A_h
    seg = segsum(log_a)  # (b, G, R, nc, Q, Q)
    if new_example is not None:
        is_start = pad_time(new_example).long()  # (b, nc·Q); padded steps join the last example
        example = is_start.cumsum(1)  # the example each step is in
        # the example of the step before each chunk: the one whose state enters the chunk
        entering = (example - is_start).view(b, nc, Q)[..., :1]  # (b, nc, 1)
        example = example.view(b, nc, Q)
        same = example[..., :, None] == example[..., None, :]  # (b, nc, Q, Q): i, j in one example
        seg = seg.masked_fill(~same[:, None, None], float("-inf"))  # no decay across a start
    # 1. inside each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(seg_ij) Δ_j x_j
    CB = torch.einsum("bcign,bcjgn->bgcij", C, B)  # (b, G, nc, Q, Q)
    y = torch.einsum("bgcij,bgrcij,bcjgrp->bcigrp", CB, seg.exp(), xdt)  # (b, nc, Q, G, R, P)
    # (einsum operands are ordered so that contracting left to right never builds a (.., N, R) tensor)
    if nc == 1 and not need_state:
        return y.reshape(b, Q, H, P)[:, :L], None
    # 2. what each chunk adds to the state at its end
    S = torch.einsum("bgrcj,bcjgrp,bcjgn->bcgrpn", seg[..., -1, :].exp(), xdt, B)  # (b, nc, G, R, P, N)
    # 3. pass states across chunks: h_c = exp(sum of the chunk's Δ A) h_{c-1} + S_c
    cs = log_a.cumsum(-1)  # (b, G, R, nc, Q): log decay from the chunk start through step i
    if new_example is not None:  # the entering state reaches step i if no example starts up to i
        cs = cs.masked_fill((example != entering)[:, None, None], float("-inf"))
    chunk_decay = cs[..., -1].exp()[..., None, None]  # (b, G, R, nc, 1, 1)
    h, starts = x.new_zeros(b, G, R, P, N), []
    for c in range(nc):
        starts.append(h)
        h = chunk_decay[:, :, :, c] * h + S[:, c]
    # 4. the state entering each chunk (zero for the first), decayed to step i and read out by C_i
    if nc > 1:
        y = y + torch.einsum("bcign,bcgrpn,bgrci->bcigrp", C, torch.stack(starts, 1), cs.exp())
    return y.reshape(b, nc * Q, H, P)[:, :L], h.reshape(b, H, P, N)


@torch.compiler.disable
def ssd_scan(x, dt, A, B, C, D=None, *, dt_bias=None, dt_softplus=False, chunk_size=64, return_last_state=False,
             new_example=None, backend=None):
    """Mamba2 scan. x (b, L, H, P), dt (b, L, H), A (H,), B, C (b, L, G, N), D and dt_bias (H,).

    Per head h and channel p: h_t = exp(Δ_t A_h) h_{t-1} + Δ_t B_t x_t,  y_t = C_t . h_t + D_h x_t.
    Returns y (b, L, H, P), or (y, last_state (b, H, P, N)). backend: "torch" (default, chunked matmul
    form with plain autograd), "ref" or "triton" (selective_scan with A repeated per head channel).
    """
    _check_ssd_inputs(x, dt, A, B, C, D, dt_bias, chunk_size, new_example)
    (b, L, H, P), N = x.shape, B.shape[-1]
    backend = _pick_backend(backend, x.device, default_triton=False)
    if backend != "torch":  # one Mamba1 channel per (head, head channel) pair: d = h * P + p
        per_chan = lambda t: None if t is None else t.repeat_interleave(P)  # (H,) -> (H*P,)
        out = selective_scan(
            x.reshape(b, L, H * P).transpose(1, 2), dt.repeat_interleave(P, dim=2).transpose(1, 2),
            per_chan(A)[:, None].expand(H * P, N), B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), per_chan(D),
            delta_bias=per_chan(dt_bias), delta_softplus=dt_softplus, return_last_state=True,
            new_example=new_example, backend=backend)
        y, last = out[0].transpose(1, 2).reshape(b, L, H, P), out[1].view(b, H, P, N)
    else:
        f = _math_dtype(x.dtype)
        dl = _delta(dt.to(f).transpose(1, 2), None if dt_bias is None else dt_bias.to(f), dt_softplus).transpose(1, 2)
        with torch.autocast(x.device.type, enabled=False):  # keep fp32 einsums inside mixed-precision regions
            y, last = _ssd_torch(x.to(f), dl, A.to(f), B.to(f), C.to(f), chunk_size,
                                 return_last_state, new_example)
        if D is not None:
            y = y + D.to(f)[:, None] * x.to(f)
        y = y.to(x.dtype)
    return (y, last) if return_last_state else y


# ----------------------------------------------------------------------------- causal conv (Mamba1 and 2)


def causal_conv1d(x, weight, bias, new_example=None):
    """nn.Conv1d(C, C, K, groups=C, padding=K-1) cut to L steps, on x (b, L, C) as the projections lay it out.

    out[:, t, c] = bias[c] + sum_k weight[c, 0, k] * x[:, t - (K-1) + k, c], with x = 0 before the start: K
    multiply-adds that skip two transposes and conv's slow backward (several times faster on short sequences).
    In x's dtype, as autocast runs nn.Conv1d: fp32 taps would turn a bf16 x into fp32 beside bf16 dt and z,
    which the scans refuse.

    new_example (b, L) bool: x = 0 also before the start of t's example, as if it ran alone (a tap
    reads x[t - (K-1) + k] only where that step is in t's example).
    """
    K, L = weight.shape[-1], x.shape[1]
    padded = F.pad(x, (0, 0, K - 1, 0))  # (b, K - 1 + L, C)
    taps = weight[:, 0].T.to(x.dtype)  # (K, C): taps[K - 1] multiplies the current token
    if new_example is None:
        window = lambda k: padded[:, k:k + L]  # x[t - (K-1) + k] for every t: (b, L, C)
    else:
        example = new_example.cumsum(1)  # (b, L): the example each step is in
        earlier = F.pad(example, (K - 1, 0))  # (b, K - 1 + L); where x is padding, x = 0 anyway
        window = lambda k: padded[:, k:k + L] * (earlier[:, k:k + L] == example)[..., None]
    first = window(0)
    out = first * taps[0] if bias is None else torch.addcmul(bias.to(x.dtype), first, taps[0])
    for k in range(1, K):
        out = torch.addcmul(out, window(k), taps[k])
    return out
