"""mimetic.py: in one file, in reading order, the selective scan (the spec), norms, Mamba 1 and 2,
attention baselines, the LM and its table of architectures, where each library's Mamba layer keeps
its parameters, mimetic initialization, what a Mamba layer's SSM reads, attention maps, the recall
tasks and evaluate.

Trockman, Harutyunyan, Kolter, Kumar, Bhojanapalli (2024), "Mimetic Initialization Helps State
Space Models Learn to Recall", arXiv:2410.11135. The synthetic tasks follow that paper and Gu & Dao
(2023) §4.1.

Glossary (code → paper):
  d_inner                D         SSM channels (expand · d_model); the layer input is X ∈ R^{D×T}
  d_state                N         state size per channel
  L                      T         sequence length
  A_log, layer.A         A         continuous diagonal state matrix, A = −exp(A_log) (§2);
                                   Mamba 2: a scalar per head H
  mimetic_c              c         mimetic reparameterization A = −exp(−c · A_log) (§3.1)
  dt, delta              Δ         step size softplus(W_Δ X + b_Δ) (Eq. 4); b_Δ is dt_proj.bias
                                   (Mamba 1) or dt_bias (Mamba 2)
  x_proj / in_proj rows  W_B, W_C  input and output projections of the state (Eq. 5–6)
  B, C                   B_t, C_t  B̄ = Δ B (Eq. 5), C = W_C X (Eq. 6)
  exp(Δ A)               Ā         discretized A (Eq. 7)
  attention_matrix       M_d       M_d[i, j] = C_iᵀ (∏_{k=j+1..i} Ā_k) B̄_j for i ≥ j (Eq. 8)
  attention_map / _mask            channel average of M_d / of ∏Ā (§2, "Mamba attention maps")
"""
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize


try:  # the fast scans and conv; mimetic.py copied alone runs its readable loops instead
    import mimetic_kernels as kernels
except ImportError as error:
    kernels = None
    warnings.warn("mimetic runs its own PyTorch loops (a CPU training step: Mamba 2 about 10× "
                  "slower than with mimetic_kernels.py, Mamba 1 1.4×), as mimetic_kernels failed "
                  f"to import: {error!r}")
use_kernels = kernels is not None  # set False to force the readable loop (tests compare the two)
SOFTPLUS_INV_1 = math.log(math.e - 1)  # softplus⁻¹(1) ≈ 0.5413: the mimetic dt bias (§3.1)


# ---- Selective scan (Eq. 2–3): the readable loop is the spec, mimetic_kernels.py the fast path

def selective_scan_loop(u, delta, A, B, C, new_example=None, return_last_state=False):
    """The selective scan, one time step at a time: the spec that every fast path is tested against.

        h_t = exp(Δ_t A) ⊙ h_{t−1} + Δ_t B_t u_t,    y_t = C_t · h_t,    h_{−1} = 0

    u, delta: (b, D, L); A: (D, N); B, C: (b, G, N, L), where channel d reads group d // (D / G).
    new_example: None, or (b, L) bool, True where a packed example starts; there Ā_t = 0, so the
    state restarts from 0. Returns y (b, D, L), and the last state h (b, D, N) if return_last_state.
    """
    (b, D, L), (G, N) = u.shape, B.shape[1:3]
    h = u.new_zeros(b, G, D // G, N)
    A = A.view(G, D // G, N)
    starts = [None] * L if new_example is None else new_example.view(b, 1, 1, 1, L).unbind(-1)
    ys = []
    # unbind() gives every step its slice at once: indexing [..., t] would make autograd keep a
    # (b, D, L) copy per step
    steps = zip(u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1), starts)
    for u_t, dt_t, B_t, C_t, start_t in steps:
        dt_t = dt_t.view(b, G, D // G, 1)
        if start_t is not None:  # Ā_t = 0 where an example starts: Ā_t h_{t−1} = 0
            h = h.masked_fill(start_t, 0)
        h = torch.exp(dt_t * A) * h + dt_t * B_t[:, :, None] * u_t.view(b, G, D // G, 1)
        ys.append((h * C_t[:, :, None]).sum(-1).view(b, D))
    y = torch.stack(ys, dim=-1)  # (b, D, L)
    return (y, h.view(b, D, N)) if return_last_state else y

def selective_scan(u, dt, A, B, C, D, z, dt_bias, new_example=None):
    """The Mamba 1 scan with Δ = softplus(dt + dt_bias), the D skip and the SiLU(z) gate.
    u, dt, z: (b, D, L); B, C: (b, N, L)."""
    if use_kernels:
        return kernels.selective_scan(u, dt, A, B, C, D, z, dt_bias, delta_softplus=True,
                                      new_example=new_example)
    delta = F.softplus(dt + dt_bias[:, None])
    y = selective_scan_loop(u, delta, A, B[:, None], C[:, None], new_example) + D[:, None] * u
    return y * F.silu(z)

def ssd_scan(x, dt, A, B, C, D, dt_bias, chunk_size, new_example=None):
    """The Mamba 2 scan: x (b, L, H, P), dt (b, L, H), A (H,), B, C (b, L, G, N) → y (b, L, H, P).
    Each of a head's P channels is a Mamba 1 channel whose A is the head's scalar (§2)."""
    if use_kernels:
        return kernels.ssd_scan(x, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=True,
                                chunk_size=chunk_size, new_example=new_example)
    (b, L, H, P), N = x.shape, B.shape[-1]
    u = x.permute(0, 2, 3, 1).reshape(b, H * P, L)  # (b, H·P, L)
    delta = F.softplus(dt + dt_bias).transpose(1, 2).repeat_interleave(P, dim=1)  # (b, H·P, L)
    A = A.repeat_interleave(P)[:, None].expand(H * P, N)  # (H·P, N)
    y = selective_scan_loop(u, delta, A, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), new_example)
    return y.view(b, H, P, L).permute(0, 3, 1, 2) + D[:, None] * x  # (b, L, H, P)


# ---- Norms ---------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMSNorm over groups of `group_size` features; with z, Mamba 2's gated norm(x · SiLU(z))."""
    def __init__(self, d, eps=1e-5, group_size=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size or d
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x, z=None):
        h = x.float() if z is None else x.float() * F.silu(z.float())
        groups = h.view(*h.shape[:-1], -1, self.group_size)  # (..., d / group_size, group_size)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return (groups.view_as(h) * self.weight).to(x.dtype)


# ---- Selective state space layers ----------------------------------------------------------------

def causal_conv(layer, x, new_example=None):
    """layer.conv1d, cut to the first L steps so that it is causal: x (b, L, C) → (b, L, C).
    kernels.causal_conv1d computes the same, faster. new_example (b, L) bool: a tap that would read
    a token from before the start of t's example reads 0 instead."""
    if use_kernels:
        return kernels.causal_conv1d(x, layer.conv1d.weight, layer.conv1d.bias, new_example)
    if new_example is None:
        return layer.conv1d(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2)
    K = layer.conv1d.kernel_size[0]  # tap k at step t reads x[t − K + 1 + k]
    bias = layer.conv1d.bias
    taps = F.pad(x, (0, 0, K - 1, 0)).unfold(1, K, 1)  # (b, L, C, K), 0 before the row starts
    example = F.pad(new_example.cumsum(1), (K - 1, 0)).unfold(1, K, 1)  # (b, L, K): their example
    taps = taps * (example == example[..., -1:])[:, :, None]  # 0 before t's example starts, too
    out = (taps * layer.conv1d.weight[:, 0]).sum(-1)  # (b, L, C)
    return out if bias is None else out + bias

def dt_bias_init(n, dt_min, dt_max, dt_init_floor):
    """The reference Δ init: Δ ~ log-uniform[dt_min, dt_max], floored.
    The bias is softplus⁻¹(Δ)."""
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
    log_dt = torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = log_dt.exp().clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(Δ) = Δ + log(1 − e^{−Δ})

def _check_input(hidden_states, d_model, new_example=None):
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != d_model:
        raise ValueError(f"hidden_states must be (batch, length, {d_model}), "
                         f"got {tuple(hidden_states.shape)}")
    if new_example is not None and (new_example.dtype != torch.bool
                                    or new_example.shape != hidden_states.shape[:2]):
        raise ValueError(f"new_example must be a bool (batch, length) tensor, got "
                         f"{new_example.dtype} {tuple(new_example.shape)} for hidden_states "
                         f"{tuple(hidden_states.shape)}")

def mamba1_ssm_inputs(layer, hidden_states, dt_rank, d_state, new_example=None):
    """Mamba 1's path from the block input to what its SSM reads (Eq. 9), for our Mamba1 and (by
    ssm_inputs) other libraries' Mamba 1 layers, which use the same parameter names:

        [x, z] = in_proj(hidden_states),   x ← SiLU(conv1d(x)),   [dt, B, C] = x_proj(x),
        dt ← W_Δ dt, where W_Δ = dt_proj.weight (the scan adds the bias b_Δ).

    hidden_states (b, L, d_model) → x, dt, B, C, z, time last as the scan reads them:
    x, dt, z (b, D, L); B, C (b, N, L)."""
    x, z = layer.in_proj(hidden_states).chunk(2, dim=-1)  # (b, L, D) each
    x = F.silu(causal_conv(layer, x, new_example))
    dt, B, C = layer.x_proj(x).split([dt_rank, d_state, d_state], dim=-1)
    dt = dt @ layer.dt_proj.weight.T  # (b, L, D): W_Δ X
    return tuple(t.transpose(1, 2) for t in (x, dt, B, C, z))  # time last: (b, D or N, L)

def mamba2_ssm_inputs(layer, hidden_states, ngroups, d_state, nheads, new_example=None):
    """Mamba 2's path from the block input to what its SSM reads, for our Mamba2 and (by ssm_inputs)
    other libraries' Mamba 2 layers. in_proj's rows are [z, x, B, C, dt], after [z0, x0] of an MLP
    beside the SSM in mamba_ssm's layers whose d_ssm < d_inner (dropped here); one conv1d and SiLU
    run over x, B and C together.

    hidden_states (b, L, d_model) → x (b, L, H, P), dt (b, L, H) (before its bias dt_bias),
    B, C (b, L, G, N), z (b, L, D)."""
    G, N, H = ngroups, d_state, nheads
    D = layer.conv1d.in_channels - 2 * G * N  # the SSM's channels (mamba_ssm's d_ssm)
    mlp = layer.in_proj.out_features - 2 * D - 2 * G * N - H  # rows of z0 and x0, if any
    _, z, xBC, dt = layer.in_proj(hidden_states).split([mlp, D, D + 2 * G * N, H], dim=-1)
    x, B, C = F.silu(causal_conv(layer, xBC, new_example)).split([D, G * N, G * N], dim=-1)
    return x.unflatten(-1, (H, D // H)), dt, B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N)), z

class SelectiveSSM(nn.Module):
    """What Mamba 1 and 2 share: A, which is mimetic (§3.1) while the buffer mimetic_c holds c
    (mimetic_init_ sets it, bake_mimetic_A_ clears it)."""
    def __init__(self):
        super().__init__()
        self.register_buffer("mimetic_c", None)

    @property
    def A(self):
        """A = −exp(A_log), or the mimetic A = −exp(−c · A_log) while mimetic_c holds c.
        In fp32."""
        A_log = self.A_log.float()
        return -torch.exp(A_log if self.mimetic_c is None else -self.mimetic_c * A_log)

class Mamba1(SelectiveSSM):
    """The Mamba 1 block (Eq. 9), (b, L, d_model) → (b, L, d_model), with the reference module's
    parameter names, shapes and init:

        out_proj( SSM[ SiLU(conv1d(x)) ] ⊙ SiLU(z) ),  [x, z] = in_proj(u),  [dt, B, C] = x_proj(x)
    """
    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=1e-3,
                 dt_max=0.1, dt_init_floor=1e-4, dt_scale=1.0, conv_bias=True, bias=False):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        D, N, R = self.d_inner, d_state, self.dt_rank
        self.in_proj = nn.Linear(d_model, 2 * D, bias=bias)
        self.conv1d = nn.Conv1d(D, D, d_conv, groups=D, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(D, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, D, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -dt_scale * R**-0.5, dt_scale * R**-0.5)
        self.dt_proj.bias = nn.Parameter(dt_bias_init(D, dt_min, dt_max, dt_init_floor))
        self.dt_proj.bias._no_reinit = True  # the LM's init zeroes Linear biases, but not this one
        A_log = torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(D, 1)  # (D, N)
        self.A_log = nn.Parameter(A_log)
        self.D = nn.Parameter(torch.ones(D))
        self.A_log._no_weight_decay = True  # as in the reference: weight decay would move A
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(D, d_model, bias=bias)

    def forward(self, hidden_states, new_example=None):  # new_example: see LM.forward
        _check_input(hidden_states, self.d_model, new_example)
        x, dt, B, C, z = mamba1_ssm_inputs(self, hidden_states, self.dt_rank, self.d_state,
                                           new_example)  # x, dt, z: (b, D, L); B, C: (b, N, L)
        y = selective_scan(x, dt, self.A, B, C, self.D.float(), z, self.dt_proj.bias.float(),
                           new_example)
        return self.out_proj(y.transpose(1, 2))  # (b, L, d_model)

class Mamba2(SelectiveSSM):
    """The Mamba 2 block, (b, L, d_model) → (b, L, d_model), with the reference module's parameter
    names, shapes and init; one conv1d runs over x, B and C."""
    def __init__(self, d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1,
                 A_init_range=(1, 16), dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4, chunk_size=64,
                 conv_bias=True, bias=False):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.headdim = headdim
        self.nheads = self.d_inner // headdim
        self.ngroups = ngroups
        self.chunk_size = chunk_size
        if self.d_inner % headdim or self.nheads % ngroups:
            raise ValueError(f"headdim={headdim} must divide d_inner = expand·d_model = "
                             f"{self.d_inner}, and ngroups={ngroups} must divide "
                             f"nheads={self.nheads}")
        D, N, G, H = self.d_inner, d_state, ngroups, self.nheads
        self.in_proj = nn.Linear(d_model, 2 * D + 2 * G * N + H, bias=bias)  # rows [z, x, B, C, dt]
        self.conv1d = nn.Conv1d(D + 2 * G * N, D + 2 * G * N, d_conv, groups=D + 2 * G * N,
                                padding=d_conv - 1, bias=conv_bias)
        self.dt_bias = nn.Parameter(dt_bias_init(H, dt_min, dt_max, dt_init_floor))
        self.A_log = nn.Parameter(torch.empty(H).uniform_(*A_init_range).log())  # (H,)
        self.D = nn.Parameter(torch.ones(H))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.norm = RMSNorm(D, eps=1e-5, group_size=D // G)
        self.out_proj = nn.Linear(D, d_model, bias=bias)

    def forward(self, hidden_states, new_example=None):  # new_example: see LM.forward
        _check_input(hidden_states, self.d_model, new_example)
        x, dt, B, C, z = mamba2_ssm_inputs(self, hidden_states, self.ngroups, self.d_state,
                                           self.nheads, new_example)
        y = ssd_scan(x, dt, self.A, B, C, self.D.float(), self.dt_bias.float(), self.chunk_size,
                     new_example)  # (b, L, H, P)
        y = self.norm(y.reshape(*z.shape), z)  # norm(y · SiLU(z)): (b, L, D)
        return self.out_proj(y)  # (b, L, d_model)


# ---- Baselines: softmax attention (the hybrid's layer, §3 Fig. 2), linear attention (Fig. 5) ----

def _split_heads(t, n_heads):
    return t.view(*t.shape[:2], n_heads, -1).transpose(1, 2)  # (b, L, h·d) → (b, h, L, d)

class Attention(nn.Module):
    """Causal softmax self-attention, with no positional embedding: in the paper's hybrid the Mamba
    layers provide position."""
    def __init__(self, d_model, n_heads=1):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, hidden_states):
        _check_input(hidden_states, self.d_model)
        qkv = self.qkv(hidden_states).chunk(3, dim=-1)
        q, k, v = (_split_heads(t, self.n_heads) for t in qkv)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, h, L, d)
        return self.out_proj(y.transpose(1, 2).flatten(2))

    def attention_matrix(self, hidden_states):
        _check_input(hidden_states, self.d_model)
        qkv = self.qkv(hidden_states).chunk(3, dim=-1)
        q, k, _ = (_split_heads(t, self.n_heads) for t in qkv)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (b, h, L, L)
        future = torch.ones_like(scores, dtype=torch.bool).triu(1)
        return scores.masked_fill(future, float("-inf")).softmax(-1)

class LinearAttention(nn.Module):
    """Simple causal linear attention, y_i = Σ_{j≤i} (q_i · k_j / √head_dim) v_j, with no feature
    map and no normalizer: Eq. 12 with its own projections (the Fig. 5 baseline). The values split
    d_model across the heads."""
    def __init__(self, d_model, head_dim=32, n_heads=1):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model = d_model
        self.head_dim = head_dim
        self.n_heads = n_heads
        self.qk = nn.Linear(d_model, 2 * n_heads * head_dim, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def attention_matrix(self, hidden_states):
        _check_input(hidden_states, self.d_model)
        q, k = (_split_heads(t, self.n_heads) for t in self.qk(hidden_states).chunk(2, dim=-1))
        return (q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)).tril()  # (b, h, L, L)

    def forward(self, hidden_states):
        y = self.attention_matrix(hidden_states) @ _split_heads(self.v(hidden_states), self.n_heads)
        return self.out_proj(y.transpose(1, 2).flatten(2))  # (b, h, L, d) → (b, L, d_model)


# ---- The language model: embedding → pre-norm residual blocks → final norm → tied head -----

@dataclass(frozen=True)
class Arch:
    """A kind of sequence mixer: an entry of ARCHS. ARCHS holds the paper's values, which
    ModelConfig passes explicitly; the Mamba classes keep the reference signatures (Mamba1's
    d_state=16 is mamba_ssm's)."""
    letter: str                                       # its layers' letter in ModelConfig.pattern
    build: Callable[["ModelConfig", int], nn.Module]  # (config, layer index) → that layer's mixer
    defaults: dict = field(default_factory=dict)      # the ModelConfig fields left None take these

def build_mamba1(config, i):
    """Layer i's Mamba 1, with its own N if config.layer_d_state gives one."""
    return Mamba1(config.d_model, d_state=config.layer_d_state.get(i, config.d_state),
                  d_conv=config.d_conv, expand=config.expand)

def build_mamba2(config, i):
    """Layer i's Mamba 2, with its own N if config.layer_d_state gives one."""
    return Mamba2(config.d_model, d_state=config.layer_d_state.get(i, config.d_state),
                  d_conv=config.d_conv, expand=config.expand, headdim=config.headdim,
                  ngroups=config.ngroups, chunk_size=config.chunk_size)

def build_attention(config, i):
    return Attention(config.d_model, config.n_heads)

def build_linear_attention(config, i):
    return LinearAttention(config.d_model, config.linear_head_dim, config.n_heads)

ARCHS = {
    "mamba1": Arch("M", build_mamba1,
                   dict(d_state=32,  # §5 "For all Mamba 1 experiments, we use state size 32"
                        expand=2, d_conv=4)),  # the reference Mamba's
    "mamba2": Arch("M", build_mamba2,
                   dict(d_state=128,  # §5 "state size 128 unless otherwise noted"
                        headdim=64,  # §5 "head dimension 64"
                        expand=2, d_conv=4)),  # the reference Mamba2's
    "attention": Arch("A", build_attention),
    "linear": Arch("L", build_linear_attention),
}

@dataclass
class ModelConfig:
    vocab_size: int = 32
    d_model: int = 64
    n_layers: int = 4
    arch: str = "mamba1"          # a name in ARCHS; the letter M stands for it when it is a Mamba
    pattern: str | None = None    # a letter per layer (M Mamba, A attention, L linear...);
                                  # None: arch's letter in every layer
    d_state: int | None = None    # None: ARCHS[arch].defaults, e.g. N = 32 (Mamba 1), 128 (Mamba 2)
    expand: int | None = None     # None: ARCHS[arch].defaults (2)
    d_conv: int | None = None     # None: ARCHS[arch].defaults (4)
    headdim: int | None = None    # Mamba 2; None: ARCHS[arch].defaults (64)
    ngroups: int = 1              # Mamba 2
    chunk_size: int = 64          # Mamba 2
    n_heads: int = 1              # attention and linear attention
    linear_head_dim: int = 32     # linear attention's query/key features per head
    layer_d_state: dict | None = None  # {layer index: N} for Mamba layers whose N differs (Fig. 5)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        for name, value in ARCHS[self.arch].defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.pattern = self.pattern or ARCHS[self.arch].letter * self.n_layers
        letters = {arch.letter for arch in ARCHS.values()}
        if len(self.pattern) != self.n_layers or set(self.pattern) - letters:
            raise ValueError(f"pattern must be {self.n_layers} letters from "
                             f"{', '.join(sorted(letters))}, got {self.pattern!r}")
        for letter in set(self.pattern):
            self.arch_of(letter)  # each letter names one architecture
        for name, value in vars(self).items():  # every number is a size (None: an unused one)
            if isinstance(value, (int, float)) and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        layer_d_state = self.layer_d_state or {}
        self.layer_d_state = {int(i): int(n) for i, n in layer_d_state.items()}  # JSON keys are str
        for i, n in self.layer_d_state.items():
            if not (0 <= i < self.n_layers and self.pattern[i] == "M" and n > 0):
                raise ValueError(f"layer_d_state {{{i}: {n}}} needs a Mamba layer (M) of "
                                 f"{self.pattern} and N > 0")

    def arch_of(self, letter):
        """The architecture a pattern letter stands for: arch if it is arch's letter, else the one
        architecture registered with it."""
        if ARCHS[self.arch].letter == letter:
            return self.arch
        names = [name for name, arch in ARCHS.items() if arch.letter == letter]
        if len(names) != 1:
            raise ValueError(f"pattern {self.pattern!r} has {letter}, which stands for one of "
                             f"{', '.join(names)}: set arch to one of them (it is {self.arch!r})")
        return names[0]

class Block(nn.Module):
    def __init__(self, mixer, d_model):
        super().__init__()
        self.norm = RMSNorm(d_model)
        self.mixer = mixer

    def forward(self, h, new_example=None):  # passed on only when given: attention takes none
        if new_example is None:
            return h + self.mixer(self.norm(h))
        return h + self.mixer(self.norm(h), new_example=new_example)

class LM(nn.Module):
    """A token model, initialized as the reference Mamba LM is."""
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            Block(ARCHS[config.arch_of(letter)].build(config, i), config.d_model)
            for i, letter in enumerate(config.pattern))
        self.norm_f = RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight  # tied
        for module in self.modules():  # the reference Mamba LM's init
            if isinstance(module, nn.Linear) and module.bias is not None:
                if not getattr(module.bias, "_no_reinit", False):  # the dt bias keeps its own init
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight"):  # GPT-2's residual scaling, as in the reference
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(config.n_layers)

    def forward(self, input_ids, new_example=None):
        """Logits (b, L, vocab_size). new_example: None (each row one sequence), or (b, L) bool,
        True where a packed example starts (e.g. input_ids == BOS; where mamba_ssm's seq_idx
        changes): the Mamba layers' scans and convs reset there, so each example of a row is
        computed as if it ran alone. Attention layers take no new_example (a hybrid raises)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got {tuple(input_ids.shape)}")
        h = self.embedding(input_ids)
        for block in self.layers:
            h = block(h, new_example)
        return self.lm_head(self.norm_f(h))  # (b, L, vocab_size)


# ---- Mamba layers of any library: ours, transformers' and mamba_ssm's ----------------------------
# Where a layer keeps what mimetic_init_ sets, and which of a model's layers are Mambas: what lets
# mimetic.py initialize and map other libraries' Mambas. Our blocks' forward never comes here.

@dataclass
class Layout:
    """Where a Mamba layer keeps what mimetic_init_ sets (every layer also has A_log and conv1d)."""
    version: int  # 1: A is (D, N), conv defaults off; 2: A is (H,), conv defaults on (§3, Fig. 3)
    proj: nn.Linear  # W_B and W_C are rows of it, one slice per group in B and in C
    B: list
    C: list
    dt_weight: torch.Tensor  # W_Δ: a matrix, or rows of in_proj
    dt_bias: torch.Tensor  # b_Δ
    dt_in_bias: torch.Tensor | None = None  # the dt rows of in_proj's bias, if it has one
    dt_limit: tuple = (0.0, math.inf)  # Δ is clamped to it

def _mamba1_layout(layer, N, R):
    """Mamba 1: x_proj's rows are [dt (R), B (N), C (N)]; W_Δ = dt_proj.weight, b_Δ its bias."""
    return Layout(version=1, proj=layer.x_proj, B=[slice(R, R + N)], C=[slice(R + N, R + 2 * N)],
                  dt_weight=layer.dt_proj.weight, dt_bias=layer.dt_proj.bias)

def _mamba2_layout(layer, N, G, H, dt_limit=(0.0, math.inf)):
    """Mamba 2: in_proj's rows are [z0, x0 (mamba_ssm's MLP, when d_ssm < d_inner), z, x, B (G·N),
    C (G·N), dt (H)]; W_Δ = the dt rows, b_Δ = dt_bias. H heads of P channels fill D."""
    W = layer.in_proj
    first_B = W.out_features - 2 * G * N - H  # the first row of B
    D = layer.conv1d.in_channels - 2 * G * N
    P = getattr(layer, "head_dim", None) or layer.headdim  # transformers' name, or ours
    if H * P != D or H % G:
        raise ValueError(f"{_name(layer)} has {H} heads × head_dim {P} for d_inner {D} and {G} "
                         "groups: the heads must fill d_inner and the groups divide the heads; "
                         "this layer cannot run")

    def groups(start):  # G slices of N rows from `start` on
        return [slice(start + g * N, start + (g + 1) * N) for g in range(G)]
    return Layout(version=2, proj=W, B=groups(first_B), C=groups(first_B + G * N),
                  dt_weight=W.weight[-H:], dt_bias=layer.dt_bias,
                  dt_in_bias=None if W.bias is None else W.bias[-H:], dt_limit=tuple(dt_limit))

def _mamba_ssm_mamba1_layout(layer):  # mamba_ssm.Mamba
    return _mamba1_layout(layer, layer.d_state, layer.dt_rank)

def _mamba_ssm_mamba2_layout(layer):  # mamba_ssm.Mamba2
    return _mamba2_layout(layer, layer.d_state, layer.ngroups, layer.nheads,
                          getattr(layer, "dt_limit", (0.0, math.inf)))

def _transformers_mamba1_layout(layer):  # transformers' MambaMixer
    return _mamba1_layout(layer, layer.ssm_state_size, layer.time_step_rank)

def _transformers_mamba2_layout(layer):  # transformers' Mamba2Mixer
    return _mamba2_layout(layer, layer.ssm_state_size, layer.n_groups, layer.num_heads,
                          layer.time_step_limit)

LAYOUTS = {  # (library, class name) → the function that gives such a layer's Layout
    ("mamba_ssm", "Mamba"): _mamba_ssm_mamba1_layout,
    ("mamba_ssm", "Mamba2"): _mamba_ssm_mamba2_layout,
    ("transformers", "MambaMixer"): _transformers_mamba1_layout,
    ("transformers", "Mamba2Mixer"): _transformers_mamba2_layout,
}

def _name(layer):
    """The name of the user's class of a layer, not torch's Parametrized... subclass of it."""
    return parametrize.type_before_parametrizations(layer).__name__

def layout_of(layer):
    """The Layout of a Mamba layer, or None. Another library's layer is found by its type's MRO, as
    a parametrization subclasses the type."""
    if isinstance(layer, Mamba1):
        return _mamba1_layout(layer, layer.d_state, layer.dt_rank)
    if isinstance(layer, Mamba2):
        return _mamba2_layout(layer, layer.d_state, layer.ngroups, layer.nheads)
    for cls in type(layer).__mro__:
        library = cls.__module__.partition(".")[0]
        if (library, cls.__name__) in LAYOUTS:
            return LAYOUTS[library, cls.__name__](layer)
    return None

def sequence_mixers(module):
    """{index: mixer}. A Mamba layer is {0: it}. A model's mixers, attention included, are indexed
    as its blocks (ours: model.layers, others': model.backbone.layers), so that the paper's "layer 4
    of 8" is 3. Any other module: its Mamba layers, in order."""
    if layout_of(module):
        return {0: module}
    for blocks in module.modules():
        if isinstance(blocks, nn.ModuleList) and any(hasattr(block, "mixer") for block in blocks):
            return {i: block.mixer for i, block in enumerate(blocks) if hasattr(block, "mixer")}
    return dict(enumerate(m for m in module.modules() if layout_of(m)))

def mamba_layers(module):
    """{index: Mamba layer} of a module, indexed as sequence_mixers."""
    return {i: m for i, m in sequence_mixers(module).items() if layout_of(m)}


# ---- Mimetic initialization (§3), of our blocks and of transformers' and mamba_ssm's Mambas -----

class MimeticA(nn.Module):
    """Makes another library's A mimetic without editing its source: registered as a
    parametrization, it turns the layer's A_log into −c · raw, so that the layer's own
    A = −exp(A_log) is −exp(−c · raw) (§3.1), and training updates raw.

    The state dict then holds raw (keeping A_log's _no_weight_decay) and c, but no A_log: it loads
    into a model that had the same mimetic_init_. For any other model, bake_mimetic_A_ first writes
    a plain A_log (from_pretrained would draw a fresh A_log in place of the missing one). The
    layer's own weight init, run again, writes the computed A_log, not raw: it cannot undo this."""
    def __init__(self, c):
        super().__init__()
        self.register_buffer("c", torch.tensor(float(c)))

    def forward(self, raw):
        return -self.c * raw

def _set_mimetic_A_(layer, c):
    """A = −exp(−c · A_log) (§3.1): with A_log's init (log n, or the log of a draw from [1, 16]) and
    c = 8, A ≈ 0 and Ā = exp(Δ A) ≈ 1, except where A_log = 0, which gives A = −1 for any c (Mamba
    1's first state, head 0 of transformers' Mamba 2). Ours keep c in mimetic_c; another library's
    layer gets the MimeticA parametrization (a second call only updates its c)."""
    if isinstance(layer, SelectiveSSM):
        layer.mimetic_c = torch.tensor(float(c), device=layer.A_log.device)
    elif parametrize.is_parametrized(layer, "A_log"):
        layer.parametrizations.A_log[0].c.fill_(c)
    else:
        decay = getattr(layer.A_log, "_no_weight_decay", False)
        mimetic_A = MimeticA(c).to(layer.A_log.device)
        parametrize.register_parametrization(layer, "A_log", mimetic_A, unsafe=True)
        layer.parametrizations.A_log.original._no_weight_decay = decay

def _set_delta_to_one_(where):
    """Δ = softplus(W_Δ X + b_Δ) = 1 for every input (§3.1): W_Δ = 0 (Mamba 1: dt_proj.weight;
    Mamba 2: the dt rows of in_proj, and of its bias if it has one) and b_Δ = softplus⁻¹(1)."""
    where.dt_weight.zero_()
    where.dt_bias.fill_(SOFTPLUS_INV_1)
    if where.dt_in_bias is not None:
        where.dt_in_bias.zero_()

def _average_W_C_with_W_B_(layer, where):
    """W_C ← ½ (W_C + W_B), per group, on where.proj's weight rows and bias (§3.2). Both start from
    the default init U(±1/√fan_in) (fan_in: d_inner for Mamba 1, d_model for Mamba 2), so that
    W_Cᵀ W_B = ½ W_Cᵀ W_B + ½ W_Bᵀ W_B has mean ½ E[W_Bᵀ W_B] = N / (6 · fan_in) · I, a scaled
    identity of rank N. (Not W_C = W_B: Trockman & Kolter (2023) advise correlated, not equal,
    query and key weights.)

    Averaging twice would pull W_C further toward W_B, so the layer keeps the W_C it got here in the
    buffer mimetic_W_C, and a later call that finds W_C unchanged does nothing."""
    def W_C():  # every group's rows of W_C, stacked
        return torch.cat([where.proj.weight[rows] for rows in where.C])
    if hasattr(layer, "mimetic_W_C") and torch.equal(layer.mimetic_W_C, W_C()):
        return
    for rows_B, rows_C in zip(where.B, where.C):
        for t in (where.proj.weight, where.proj.bias):
            if t is not None:
                t[rows_C] = 0.5 * (t[rows_C] + t[rows_B])
    layer.register_buffer("mimetic_W_C", W_C(), persistent=False)

def _set_identity_conv_(layer):
    """conv1d ≈ identity (§3, Fig. 3): 1 on the current token's tap (the last), else 0, and no
    bias."""
    layer.conv1d.weight.zero_()
    layer.conv1d.weight[:, 0, -1] = 1.0
    if layer.conv1d.bias is not None:
        layer.conv1d.bias.zero_()

@torch.no_grad()
def mimetic_init_(module, *, c=8.0, A=True, dt=True, bc=True, conv=None, layers=None):
    """The paper's mimetic initialization (§3), in place, of the Mamba layers of `module`: ours,
    transformers' or mamba_ssm's, a single layer or a whole model. Four steps, each one function:

      A ≈ 0, Ā ≈ 1   A = −exp(−c · A_log)               _set_mimetic_A_          (§3.1)
      Δ ≈ 1          W_Δ = 0, b_Δ = softplus⁻¹(1)       _set_delta_to_one_       (§3.1)
      W_Cᵀ W_B ≈ I   W_C ← ½ (W_C + W_B) per group      _average_W_C_with_W_B_   (§3.2)
      conv ≈ I       conv1d passes each token through   _set_identity_conv_      (§3, Fig. 3)

    A, dt, bc and conv turn a step off; conv=None does the conv step for Mamba 2 only, as the paper
    does. layers: indices into the model's blocks (see mamba_layers), None for all its Mamba layers.
    Every check runs before anything changes, and a second call changes nothing."""
    if c <= 0:
        raise ValueError(f"c must be positive, got {c}")
    found = mamba_layers(module)
    if not found:
        libraries = ", ".join(".".join(key) for key in LAYOUTS)
        raise TypeError(f"no Mamba layer in {type(module).__name__}: mimetic_init_ looks for "
                        f"mimetic.py's Mamba1 and Mamba2, {libraries} and models made of them")
    chosen = sorted(found) if layers is None else list(layers)
    if bad := [i for i in chosen if i not in found]:
        raise ValueError(f"layers {bad} are not Mamba layers of this model; its Mamba layers are "
                         f"{sorted(found)}")
    if len(set(chosen)) < len(chosen):
        raise ValueError(f"layers {chosen} names a layer more than once")
    todo = [(found[i], layout_of(found[i])) for i in chosen]
    for layer, where in todo if dt else ():
        if not where.dt_limit[0] <= 1 <= where.dt_limit[1]:
            raise ValueError(f"{_name(layer)} clamps Δ to {where.dt_limit}: Δ = 1 is impossible; "
                             "pass dt=False or widen its dt_limit / time_step_limit")
    for layer, where in todo:
        if A:
            _set_mimetic_A_(layer, c)
        if dt:
            _set_delta_to_one_(where)
        if bc:
            _average_W_C_with_W_B_(layer, where)
        if conv or (conv is None and where.version == 2):
            _set_identity_conv_(layer)
    return module

@torch.no_grad()
def bake_mimetic_A_(module):
    """Writes each mimetic A of `module` into a plain A_log = −c · A_log (the same A), and drops
    mimetic_c or the MimeticA parametrization, so that an unmodified model loads the state dict
    (save_pretrained). Training then goes on in the plain A = −exp(A_log)."""
    for layer in mamba_layers(module).values():
        if isinstance(layer, SelectiveSSM) and layer.mimetic_c is not None:
            layer.A_log.copy_(-layer.mimetic_c * layer.A_log)
            layer.mimetic_c = None
        elif parametrize.is_parametrized(layer, "A_log"):
            # torch shares the layer's Parametrized class with its deep copies: give this layer a
            # class of its own, so that removing A_log's parametrization leaves the copies alone
            cls = type(layer)
            layer.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            decay = getattr(layer.parametrizations.A_log.original, "_no_weight_decay", False)
            parametrize.remove_parametrizations(layer, "A_log", leave_parametrized=True)
            layer.A_log._no_weight_decay = decay
    return module


# ---- What a Mamba layer's SSM reads, in any library ----------------------------------------------

def mixer_inputs(model, input_ids):
    """{index: (b, L, d_model)}: what each of sequence_mixers(model) reads (after its block's norm)
    in model(input_ids). Forward pre-hooks catch it, rather than a library's numbering of
    hidden_states, which is not ours to pin (it has changed between transformers versions)."""
    mixers = sequence_mixers(model)
    index = {id(m): i for i, m in mixers.items()}
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault(index[id(module)], args[0] if args else kwargs["hidden_states"])
    hooks = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in mixers.values()]
    try:
        model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return {i: seen[i] for i in mixers if i in seen}

def ssm_inputs(layer, hidden_states):
    """What the SSM of any library's Mamba layer reads from hidden_states (b, L, d_model): x after
    the conv and SiLU, dt before its bias, B, C and the gate z (Eq. 9), by the blocks' own input
    path. Mamba 1, time last as the scan reads them: x, dt, z (b, D, L), B, C (b, N, L).
    Mamba 2: x (b, L, H, P), dt (b, L, H), B, C (b, L, G, N), z (b, L, D)."""
    where = layout_of(layer)
    _check_input(hidden_states, layer.in_proj.in_features)
    N = where.B[0].stop - where.B[0].start  # a group's rows of W_B
    if where.version == 1:
        dt_rank = where.B[0].start  # x_proj's rows: [dt (R), B (N), C (N)]
        return mamba1_ssm_inputs(layer, hidden_states, dt_rank, N)
    ngroups = len(where.B)
    nheads = where.dt_weight.shape[0]  # a dt row per head
    return mamba2_ssm_inputs(layer, hidden_states, ngroups, N, nheads)

def ssm_A(layer):
    """A of any Mamba layer in fp32: (D, N) for Mamba 1, (H, 1) for Mamba 2 (a scalar per head)."""
    A = layer.A if isinstance(layer, SelectiveSSM) else -torch.exp(layer.A_log.float())
    return A.reshape(len(A), -1)

def ssm_params(layer, hidden_states):
    """Δ (b, D, L), A (D, N), B, C (b, G, N, L) of any Mamba layer, for Eq. 8: per channel (Mamba 2:
    per head, with one A for all N, §2), Δ clamped as the layer clamps it. In fp32 (fp64 for an fp64
    layer), the projections cast up."""
    where = layout_of(layer)
    A = ssm_A(layer)
    dt, B, C = (t.to(torch.promote_types(t.dtype, A.dtype))
                for t in ssm_inputs(layer, hidden_states)[1:4])
    if where.version == 1:
        delta = F.softplus(dt + where.dt_bias[:, None]).clamp(*where.dt_limit)
        return delta, A, B[:, None], C[:, None]
    delta = F.softplus(dt + where.dt_bias).transpose(1, 2).clamp(*where.dt_limit)  # (b, H, L)
    return delta, A.expand(-1, B.shape[-1]), B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1)


# ---- Attention maps (§2): M_d of Eq. 8, its channel average and the average mask ∏Ā ----------

def segsum(log_a):
    """Segment sums, (..., L) → (..., L, L): S[..., i, j] = Σ_{k=j+1..i} log_a[..., k] for i ≥ j,
    and −inf above the diagonal, so that exp(S) is the causal mask ∏_{k=j+1..i} Ā_k. Summing the
    masked terms, rather than differencing one long cumsum, keeps it exact. mimetic_kernels' SSD
    uses this one too."""
    L = log_a.shape[-1]
    ones = torch.ones(L, L, dtype=torch.bool, device=log_a.device)
    terms = log_a[..., :, None].expand(*log_a.shape, L)  # [k, j] = log_a[k]
    terms = terms.masked_fill(~ones.tril(-1), 0)  # only k > j
    return terms.cumsum(-2).masked_fill(~ones.tril(), float("-inf"))

def ssm_matrix(delta, A, B, C):
    """Eq. 8, the matrix of the scan as an attention:

      M[b, d, i, j] = Σ_n C[b, n, i] · exp(Σ_{k=j+1..i} Δ[b, d, k] A[d, n]) · Δ[b, d, j] B[b, n, j]

    delta: (b, D, L), A: (D, N), B, C: (b, G, N, L) → M: (b, D, L, L); the scan is y_d = M_d x_d.
    With one A for all N (Mamba 2) the mask leaves the sum over n: M = mask ⊙ C_iᵀ B_j Δ_j,
    multi-head linear attention."""
    (b, D, L), (G, N) = delta.shape, B.shape[1:3]
    if torch.equal(A, A[:, :1].expand_as(A)):  # one A for all N
        CB = (C.transpose(-1, -2) @ B).repeat_interleave(D // G, dim=1)  # (b, D, L, L)
        return segsum(delta * A[:, 0, None]).exp() * CB * delta[..., None, :]
    M = delta.new_zeros(b, D, L, L)
    for n in range(N):  # one state dimension at a time keeps memory at (b, D, L, L)
        B_n, C_n = (t[:, :, n].repeat_interleave(D // G, dim=1) for t in (B, C))  # (b, D, L)
        M += C_n[..., :, None] * segsum(delta * A[:, n, None]).exp() * (delta * B_n)[..., None, :]
    return M

def attention_matrix(layer, hidden_states):
    """M of a layer (any library's Mamba, Attention, LinearAttention) on the hidden_states it reads:
    (b, D, L, L) per channel for Mamba 1, (b, H, L, L) per head for the others. For a Mamba, M times
    the SSM input is the SSM output before the D skip and the z gate. In fp32 (fp64 for an fp64
    layer), also for bf16 weights or under autocast."""
    if layout_of(layer):
        params = ssm_params(layer, hidden_states)
        with torch.autocast(hidden_states.device.type, enabled=False):
            return ssm_matrix(*params)
    if isinstance(layer, (Attention, LinearAttention)):
        M = layer.attention_matrix(hidden_states)
        return M.to(torch.promote_types(M.dtype, torch.float32))
    raise TypeError(f"no attention matrix for {_name(layer)}")

def attention_map(layer, hidden_states):
    """The layer's attention map (§2): M averaged over channels (heads), (b, L, L)."""
    return attention_matrix(layer, hidden_states).mean(1)

def attention_mask(layer, hidden_states):
    """The average attention mask (§2), (1/DN) Σ_{d,n} ∏_{k=j+1..i} Ā_{d,n,k}, (b, L, L): how far
    back the layer looks."""
    if not layout_of(layer):
        raise TypeError(f"only Mamba layers have a mask ∏Ā, got {_name(layer)}")
    delta, A, _, _ = ssm_params(layer, hidden_states)
    # with one A for all N (Mamba 2), one mask serves every n
    columns = A[:, :1] if torch.equal(A, A[:, :1].expand_as(A)) else A
    masks = (segsum(delta * a[:, None]).exp().mean(1) for a in columns.unbind(1))
    return sum(masks) / columns.shape[1]

@torch.no_grad()
def mimetic_report(model, input_ids=None):
    """How mimetic each Mamba layer of `model` is, a dict per layer [after mimetic_init_; §6 finds
    pretrained Mambas near it]:
      mask         mean of the average mask ∏Ā over i ≥ j, on input_ids [≈ 1]; None without them
      A_bar        mean one-step decay Ā = exp(Δ A) [≈ 1, but e^−1 where A_log = 0]
      delta(_std)  Δ's mean (spread) over channels and tokens; without input_ids Δ = softplus(b_Δ)
                   [1 (0)]
      bc_cos       cos(W_C, W_B), a group's rows flattened, mean over groups [≈ 1/√2 from i.i.d.
                   rows, else ≈ 0]
      conv_err     ‖(conv taps, bias) − (identity, 0)‖ / ‖identity‖ [0 for Mamba 2; Mamba 1 keeps
                   its conv]"""
    inputs = {} if input_ids is None else mixer_inputs(model, input_ids)
    rows = []
    for i, layer in mamba_layers(model).items():
        where = layout_of(layer)
        A = ssm_A(layer)
        h = inputs.get(i)
        mask = None
        if h is None:  # Δ where W_Δ X = 0
            bias = where.dt_bias.float()
            if where.dt_in_bias is not None:
                bias = bias + where.dt_in_bias.float()
            delta = F.softplus(bias).clamp(*where.dt_limit)[None, :, None]  # (1, D or H, 1)
        else:
            delta, A, _, _ = ssm_params(layer, h)
            L = h.shape[1]
            mask = attention_mask(layer, h).mean().item() * L**2 / (L * (L + 1) / 2)  # mean, i ≥ j
        W = where.proj.weight.float()
        cos = [F.cosine_similarity(W[rows_B].flatten(), W[rows_C].flatten(), dim=0).item()
               for rows_B, rows_C in zip(where.B, where.C)]
        taps = layer.conv1d.weight[:, 0].float()
        conv_bias = layer.conv1d.bias
        off = (taps - torch.eye(taps.shape[1], device=taps.device)[-1]).norm()  # identity: 1 on t
        conv_err = math.hypot(off, 0 if conv_bias is None else conv_bias.float().norm())
        conv_err /= len(taps) ** 0.5
        A_bar = torch.exp(delta[:, :, None] * A[:, :, None]).mean().item()
        rows.append(dict(layer=i, mask=mask, A_bar=A_bar,
                         delta=delta.mean().item(), delta_std=delta.std(correction=0).item(),
                         bc_cos=sum(cos) / len(cos), conv_err=conv_err))
    return rows

def format_report(rows):
    """mimetic_report's rows as a table, one line per layer."""
    heads = dict(layer="layer", mask="mask ∏Ā", A_bar="Ā", delta="Δ", delta_std="Δ std",
                 bc_cos="cos(W_C,W_B)", conv_err="‖conv−I‖/‖I‖")

    def cell(value):
        if value is None:
            return "-"
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    table = [heads.values()] + [[cell(row[k]) for k in heads] for row in rows]
    return "\n".join(" ".join(s.rjust(12) for s in line) for line in table)


# ---- Synthetic tasks (§2 "Copying task", "Multi-query associative recall"; Mamba §4.1) ---------
# Every task is teacher-forced next-token prediction: targets[:, t] labels the prediction made after
# reading inputs[:, :t+1], and is -100 (cross_entropy's ignore_index) where there is nothing to
# predict. TASK_VOCAB[task]: the default V (vocab_size) of content tokens 0..V-1, and the names of
# the special tokens V, V+1, ... Batches are built on the CPU from the given torch.Generator only,
# so a seed fixes a batch (generator=None: the same batch every call).

TASK_VOCAB = {
    "copy": (26, ("SEP", "STOP")),
    "stack": (26, ("SEP", "STOP")),
    "mqar": (8192, ()),  # as in zoology: no separator, the key range tells keys from values
    "sort": (512, ("SEP", "STOP")),
    "selective_copy": (16, ("BLANK", "SEP")),
    "induction": (16, ("TRIGGER",)),
}
TASKS = tuple(TASK_VOCAB)
COPY_TASKS = ("copy", "stack", "sort")  # a string, SEP, the string again (reordered), STOP
SELECTIVE_COPY_TOKENS = 16  # tokens to memorize in selective copying (Mamba App. E.1)
MQAR_POWER_A = 0.01  # zoology's power law a for where mqar queries fall (a = 1: uniform)
EVAL_SEED = 2**31 - 1  # evaluate()'s default batches, apart from make_batch's default stream

def _content_vocab(task, vocab_size):
    if task not in TASK_VOCAB:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    V = TASK_VOCAB[task][0] if vocab_size is None else vocab_size
    if V <= 0:
        raise ValueError(f"vocab_size must be positive, got {V}")
    return V

def task_vocab_size(task, vocab_size=None):
    """Embedding size an LM needs for `task`: its content tokens plus its special tokens."""
    return _content_vocab(task, vocab_size) + len(TASK_VOCAB[task][1])

def _sample_distinct(b, population, k, g):
    """(b, k): k distinct ints from range(population) per row, in random order."""
    return torch.rand(b, population, generator=g).topk(k, dim=1).indices

def _shift(seq, first_label):
    """Teacher forcing: seq[t+1] is predicted from seq[:t+1]; labeled from position first_label."""
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, :first_label] = -100
    return inputs, targets

def _copy_like(task, b, n, V, g):
    """A string of n tokens, SEP (V), the string again, STOP (V+1): as it was (copy), reversed
    (stack) or sorted (sort: no repeats). V=26, stack [7, 0, 19]:
    inputs [7, 0, 19, 26, 19, 0, 7], targets [-100] * 3 + [19, 0, 7, 27]"""
    if task == "sort":
        if n > V:
            raise ValueError(f"sort draws without replacement: length {n} > vocab_size {V}")
        x = _sample_distinct(b, V, n, g)
        y = x.sort(dim=1).values
    else:
        x = torch.randint(V, (b, n), generator=g)
        y = x.flip(1) if task == "stack" else x
    sep = torch.full((b, 1), V)
    stop = torch.full((b, 1), V + 1)
    return _shift(torch.cat([x, sep, y, stop], dim=1), n)  # labels: the pasted string and STOP

def _mqar(b, n, V, g, T):
    """Multi-query associative recall (zoology's multiquery_ar): n key-value pairs
    k_1 v_1 ... k_n v_n, keys distinct from [1, V/2) (zoology keeps 0 out of keys), values distinct
    from [V/2, V), then T − 2n query tokens. Key i is queried at slot gap_i of the (T − 2n) // 2
    even offsets there, the i-th of n draws without replacement with p(slot s) ∝ (s+1)^(a−1): most
    queries come soon after the context, as repeated bigrams do in text. Its label is the key's
    value; the other query tokens are unlabeled filler from [0, V) (zoology's random_non_queries),
    which may repeat a key.
    V=8, n=2, T=12, keys [3, 1], values [6, 4], gaps [0, 2]:
    inputs [3, 6, 1, 4,  3, 5, 0, 7, 1, 2, 6, 2],
    targets [-100] * 4 + [6, -100, -100, -100, 4, -100, -100, -100]"""
    half = V // 2
    if n > half - 1:
        raise ValueError(f"mqar needs length <= vocab_size // 2 - 1 = {half - 1} distinct keys, "
                         f"got {n}")
    if T < 4 * n:
        raise ValueError(f"mqar needs seq_len >= 4 · length = {4 * n} (a query slot per key), "
                         f"got {T}")
    keys = 1 + _sample_distinct(b, half - 1, n, g)
    values = half + _sample_distinct(b, V - half, n, g)
    context = torch.stack([keys, values], dim=2).view(b, 2 * n)
    weights = torch.arange(1, (T - 2 * n) // 2 + 1, dtype=torch.float64) ** (MQAR_POWER_A - 1)
    # the i-th draw is key i's slot
    gaps = torch.multinomial(weights.expand(b, -1), n, replacement=False, generator=g)
    queries = torch.randint(V, (b, T - 2 * n), generator=g).scatter_(1, 2 * gaps, keys)
    targets = torch.full((b, T), -100).scatter_(1, 2 * n + 2 * gaps, values)
    return torch.cat([context, queries], dim=1), targets

def _selective_copy(b, L, V, g):
    """Selective copying (Mamba §4.1.1): 16 tokens at random positions of an L-token region of
    BLANK (V), then SEP (V+1), then those tokens in order, the labels. The random spacing defeats a
    fixed-lag convolution."""
    k = SELECTIVE_COPY_TOKENS
    if L < k:
        raise ValueError(f"selective_copy needs length >= {k} (the number of tokens to copy), "
                         f"got {L}")
    tokens = torch.randint(V, (b, k), generator=g)
    where = _sample_distinct(b, L, k, g).sort(dim=1).values  # sorted: the tokens keep their order
    region = torch.full((b, L), V).scatter_(1, where, tokens)
    return _shift(torch.cat([region, torch.full((b, 1), V + 1), tokens], dim=1), L)

def _induction(b, L, V, g):
    """Induction heads (Mamba §4.1.2): L random tokens with TRIGGER (V) once inside and again at the
    end, where the label is the token that followed the first. V=16, L=6:
    inputs [5, 16, 9, 2, 11, 16], last label 9."""
    if L < 4:  # the first trigger then has at least two possible positions
        raise ValueError(f"induction needs length >= 4, got {L}")
    inputs = torch.randint(V, (b, L), generator=g)
    p = torch.randint(L - 2, (b, 1), generator=g)  # the trigger in [0, L-3]: its answer, before L-1
    inputs.scatter_(1, p, V)
    inputs[:, -1] = V
    targets = torch.full((b, L), -100)
    targets[:, -1] = inputs.gather(1, p + 1).squeeze(1)
    return inputs, targets

def make_batch(task, batch_size, length, *, vocab_size=None, generator=None, seq_len=None):
    """(inputs, targets), LongTensors (batch_size, T). length: the string length (copy, stack,
    sort), key-value pairs (mqar), region length (selective_copy: T = length + 16) or sequence
    length (induction: T = length). seq_len: mqar's T, which zoology sets apart from the number of
    pairs (16 tokens a pair in its configs); None: 6 · length."""
    V = _content_vocab(task, vocab_size)
    for name, value in (("batch_size", batch_size), ("length", length)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if seq_len is not None and task != "mqar":
        raise ValueError(f"seq_len is mqar's sequence length; {task} sets its own from length")
    g = torch.Generator() if generator is None else generator
    if task in COPY_TASKS:
        return _copy_like(task, batch_size, length, V, g)
    if task == "mqar":
        return _mqar(batch_size, length, V, g, 6 * length if seq_len is None else seq_len)
    if task == "selective_copy":
        return _selective_copy(batch_size, length, V, g)
    return _induction(batch_size, length, V, g)

# What evaluate returns, with the headings tables and plots give them
METRICS = {"exact_match": "exact match",
           "token_acc": "token accuracy (mqar: zoology's per-query accuracy)",
           "string_acc": "string accuracy (Jelassi et al.'s: STOP not scored)"}

@torch.no_grad()
def evaluate(model, task, length, *, vocab_size=None, batch_size=64, n_batches=4, generator=None,
             device=None, seq_len=None):
    """METRICS of argmax predictions on held-out batches (seed EVAL_SEED unless a generator is
    given), in eval mode: token_acc over labeled tokens, exact_match (all of a row's labeled tokens
    right), string_acc (the pasted string right, STOP not scored). Teacher-forced exact match is
    greedy decoding's: both see the same prefixes until the first error."""
    if n_batches <= 0:
        raise ValueError(f"n_batches must be positive, got {n_batches}")
    g = torch.Generator().manual_seed(EVAL_SEED) if generator is None else generator
    device = next(model.parameters(), torch.empty(0)).device if device is None else device
    was_training = model.training
    model.eval()
    stop = _content_vocab(task, vocab_size) + 1 if task in COPY_TASKS else None
    correct = labeled = exact = strings = 0
    try:
        for _ in range(n_batches):
            inputs, targets = make_batch(task, batch_size, length, vocab_size=vocab_size,
                                         generator=g, seq_len=seq_len)
            targets = targets.to(device)
            mask = targets != -100
            right = (model(inputs.to(device)).argmax(-1) == targets) & mask
            correct += right.sum().item()
            labeled += mask.sum().item()
            exact += (right.sum(1) == mask.sum(1)).sum().item()
            string = mask & (targets != stop)
            strings += ((right & string).sum(1) == string.sum(1)).sum().item()
    finally:
        model.train(was_training)
    n = batch_size * n_batches
    return dict(token_acc=correct / labeled, exact_match=exact / n, string_acc=strings / n)
