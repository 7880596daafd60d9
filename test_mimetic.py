"""mimetic.py: the blocks against float64 references written from the equations, mimetic initialization
(§3), the attention maps (Eq. 8), the synthetic tasks and evaluate(), and clear errors on bad input."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mimetic
from conftest import copy_steps, new_example_at, packed_and_alone, rel_err
from mimetic import (LM, SELECTIVE_COPY_TOKENS, TASKS, Attention, LinearAttention, Mamba1, Mamba2, ModelConfig,
                     bake_mimetic_A_, evaluate, make_batch, mimetic_init_, task_vocab_size)


@pytest.fixture(params=["loop", "kernels"])
def scan_path(request, monkeypatch):
    """Run a test once on mimetic.py's own loop and once on mimetic_kernels' fast path."""
    assert mimetic.kernels is not None, "mimetic.py did not pick up mimetic_kernels"
    monkeypatch.setattr(mimetic, "use_kernels", request.param == "kernels")
    return request.param


# ---------------------------------------------------------------------------------------------------
# Slow references written from the equations, in float64

def causal_conv(x, weight, bias):
    """Depthwise causal conv: out[t, d] = bias[d] + Σ_k w[d, k] x[t − (K−1) + k, d]. x: (b, L, D)."""
    K, L = weight.shape[-1], x.shape[1]
    padded = F.pad(x, (0, 0, K - 1, 0))
    return sum(weight[:, 0, k] * padded[:, k:k + L] for k in range(K)) + bias


def recurrence(x, delta, A, B, C):
    """h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t x_t, y_t = C_t · h_t. x, delta: (b, L, D); A (D, N); B, C (b, L, D, N)."""
    h, ys = 0, []
    for t in range(x.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t] * x[:, t, :, None]
        ys.append((h * C[:, t]).sum(-1))
    return torch.stack(ys, 1)


def mamba1_reference(layer, u):
    p = {k: v.double() for k, v in layer.state_dict().items()}
    D, N, R = layer.d_inner, layer.d_state, layer.dt_rank
    xz = u.double() @ p["in_proj.weight"].T
    x = F.silu(causal_conv(xz[..., :D], p["conv1d.weight"], p["conv1d.bias"]))
    dt, B, C = (x @ p["x_proj.weight"].T).split([R, N, N], dim=-1)
    delta = F.softplus(dt @ p["dt_proj.weight"].T + p["dt_proj.bias"])
    B, C = (t[:, :, None, :].expand(-1, -1, D, -1) for t in (B, C))
    y = (recurrence(x, delta, layer.A.double(), B, C) + p["D"] * x) * F.silu(xz[..., D:])
    return y @ p["out_proj.weight"].T


def mamba2_reference(layer, u):
    p = {k: v.double() for k, v in layer.state_dict().items()}
    D, N, G, H, P = layer.d_inner, layer.d_state, layer.ngroups, layer.nheads, layer.headdim
    z, xBC, dt = (u.double() @ p["in_proj.weight"].T).split([D, D + 2 * G * N, H], dim=-1)
    x, B, C = F.silu(causal_conv(xBC, p["conv1d.weight"], p["conv1d.bias"])).split([D, G * N, G * N], dim=-1)
    delta = F.softplus(dt + p["dt_bias"]).repeat_interleave(P, dim=-1)  # head h → its P channels
    A = layer.A.double().repeat_interleave(P)[:, None].expand(D, N)
    B, C = (t.unflatten(-1, (G, N)).repeat_interleave(D // G, dim=2) for t in (B, C))  # (b, L, D, N)
    y = recurrence(x, delta, A, B, C) + p["D"].repeat_interleave(P) * x
    y = y * F.silu(z)
    groups = y.unflatten(-1, (G, D // G))
    y = (groups / groups.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).flatten(-2) * p["norm.weight"]
    return y @ p["out_proj.weight"].T


# ---------------------------------------------------------------------------------------------------
# The blocks

def test_mamba1_matches_reference(scan_path):
    torch.manual_seed(0)
    layer = Mamba1(16, d_state=8)
    u = torch.randn(2, 37, 16)
    assert rel_err(layer(u), mamba1_reference(layer, u)) < 1e-5


@pytest.mark.parametrize("ngroups", [1, 2])
def test_mamba2_matches_reference(scan_path, ngroups):
    torch.manual_seed(0)
    layer = Mamba2(16, d_state=8, headdim=8, ngroups=ngroups, chunk_size=16)
    u = torch.randn(2, 37, 16)  # 37: not a multiple of the chunk
    assert rel_err(layer(u), mamba2_reference(layer, u)) < 1e-5


def test_mamba2_scan_equals_mamba1_scan_with_per_head_A(scan_path):
    torch.manual_seed(0)
    b, L, H, P, G, N = 2, 21, 4, 3, 2, 5
    x, dt = torch.randn(b, L, H, P), torch.randn(b, L, H)
    A, D, bias = -torch.rand(H) - 0.1, torch.randn(H), torch.randn(H)
    B, C = torch.randn(b, L, G, N), torch.randn(b, L, G, N)
    y = mimetic.ssd_scan(x, dt, A, B, C, D, bias, chunk_size=8)
    delta = F.softplus(dt + bias).transpose(1, 2).repeat_interleave(P, 1)  # (b, H·P, L)
    y1 = mimetic.selective_scan_loop(x.permute(0, 2, 3, 1).reshape(b, H * P, L), delta,
                                     A.repeat_interleave(P)[:, None].expand(H * P, N),
                                     B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1))
    expected = y1.view(b, H, P, L).permute(0, 3, 1, 2) + D[:, None] * x
    assert rel_err(y, expected) < 1e-5


def test_reference_parameter_names_and_shapes():
    """The state-dict layout of mamba_ssm's Mamba (simple) and Mamba2 modules, so weights load both ways."""
    m1 = Mamba1(32, d_state=16)  # d_inner 64, dt_rank 2
    assert {k: tuple(v.shape) for k, v in m1.state_dict().items()} == {
        "A_log": (64, 16), "D": (64,), "in_proj.weight": (128, 32), "conv1d.weight": (64, 1, 4),
        "conv1d.bias": (64,), "x_proj.weight": (34, 64), "dt_proj.weight": (64, 2), "dt_proj.bias": (64,),
        "out_proj.weight": (32, 64)}
    m2 = Mamba2(32, d_state=16, headdim=16, ngroups=2)  # d_inner 64, 4 heads
    assert {k: tuple(v.shape) for k, v in m2.state_dict().items()} == {
        "dt_bias": (4,), "A_log": (4,), "D": (4,), "in_proj.weight": (2 * 64 + 2 * 2 * 16 + 4, 32),
        "conv1d.weight": (128, 1, 4), "conv1d.bias": (128,), "norm.weight": (64,), "out_proj.weight": (32, 64)}
    for layer in (m1, m2):  # round trip, default and mimetic (which adds its c; baked, a plain A_log)
        fresh = lambda: type(layer)(32, d_state=16, **({} if layer is m1 else {"headdim": 16, "ngroups": 2}))
        fresh().load_state_dict(layer.state_dict())
        mimetic_init_(layer)
        assert "mimetic_c" in layer.state_dict()
        twin = mimetic_init_(fresh())
        twin.load_state_dict(layer.state_dict())
        assert torch.equal(twin.A, layer.A) and twin.mimetic_c.item() == 8.0
        A = layer.A
        plain = fresh()
        plain.load_state_dict(bake_mimetic_A_(layer).state_dict())  # strict: no mimetic_c any more
        assert plain.mimetic_c is None and torch.allclose(plain.A, A, rtol=1e-6, atol=0)


def test_default_init_values():
    torch.manual_seed(0)
    m1 = Mamba1(64, d_state=16, dt_min=1e-3, dt_max=0.1)
    assert torch.equal(m1.A_log, torch.log(torch.arange(1, 17.0)).repeat(128, 1))
    assert torch.allclose(m1.A, -torch.arange(1, 17.0).repeat(128, 1), rtol=1e-6)
    assert torch.equal(m1.D, torch.ones(128))
    assert m1.A_log._no_weight_decay and m1.D._no_weight_decay  # the reference keeps weight decay off A
    dt = F.softplus(m1.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert 0.005 < dt.log().mean().exp() < 0.02  # log-uniform: geometric mean √(1e-3 · 0.1) = 0.01
    bound = m1.dt_rank ** -0.5
    assert m1.dt_proj.weight.abs().max() <= bound and m1.dt_proj.weight.abs().max() > 0.8 * bound
    m2 = Mamba2(128, headdim=16)  # 16 heads
    assert (-m2.A).min() >= 1 and (-m2.A).max() <= 16 and torch.equal(m2.D, torch.ones(16))
    assert F.softplus(m2.dt_bias).min() >= 1e-3 * (1 - 1e-5) and F.softplus(m2.dt_bias).max() <= 0.1 * (1 + 1e-5)


def test_lm_init_keeps_the_blocks_special_init():
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=50, d_model=64, n_layers=4, pattern="MMAL"))
    mixer = model.layers[0].mixer
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)  # not zeroed → softplus(0) = 0.69
    assert torch.equal(mixer.A_log, torch.log(torch.arange(1, 33.0)).repeat(128, 1))  # N = 32, the table's Mamba 1
    assert torch.equal(mixer.D, torch.ones(128))
    assert abs(model.embedding.weight.std().item() - 0.02) < 0.002
    assert model.lm_head.weight is model.embedding.weight
    # out_proj: kaiming-uniform bound 1/√fan_in, scaled by 1/√n_layers
    bound = 1 / math.sqrt(128) / math.sqrt(4)
    assert 0.9 * bound < mixer.out_proj.weight.abs().max() <= bound


def test_attention_baselines_are_their_matrices():
    torch.manual_seed(0)
    h = torch.randn(2, 12, 16)
    attn = Attention(16, n_heads=2)
    M = mimetic.attention_matrix(attn, h)
    assert M.shape == (2, 2, 12, 12) and torch.allclose(M.sum(-1), torch.ones(2, 2, 12))
    assert torch.equal(M.triu(1), torch.zeros_like(M))
    v = h @ attn.qkv.weight[32:].T
    y = (M @ v.view(2, 12, 2, 8).transpose(1, 2)).transpose(1, 2).flatten(2) @ attn.out_proj.weight.T
    assert rel_err(attn(h), y) < 1e-5
    lin = LinearAttention(16, head_dim=8)
    q, k = (h @ w.T for w in lin.qk.weight.chunk(2))
    M = mimetic.attention_matrix(lin, h)
    assert torch.allclose(M[:, 0], (q @ k.transpose(1, 2)).tril() / math.sqrt(8), atol=1e-6)
    assert rel_err(lin(h), (M[:, 0] @ (h @ lin.v.weight.T)) @ lin.out_proj.weight.T) < 1e-5


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_fast_path_trains_like_the_readable_path(arch, monkeypatch):
    """Six training steps of a small LM through mimetic_kernels and through mimetic.py's own loop, from the same
    init and batches (1 to 3 scan chunks of 8 steps), give the same losses and parameters in fp32. Losses
    are compared under AdamW, as training runs; parameters under SGD, since Adam's division by |gradient|
    turns the rounding of a near-zero gradient into a visible step (one conv tap moves 1e-4 apart)."""
    monkeypatch.setattr(mimetic.kernels, "TORCH_CHUNK", 8)

    def train_steps(fast, optimizer):
        monkeypatch.setattr(mimetic, "use_kernels", fast)
        torch.manual_seed(0)
        model = mimetic_init_(LM(ModelConfig(vocab_size=task_vocab_size("copy", 16), d_model=32, n_layers=2,
                                             arch=arch, d_state=16, headdim=16, chunk_size=8)))
        opt, start = optimizer(model.parameters()), {name: p.detach().clone() for name, p in model.named_parameters()}
        losses = copy_steps(model, opt, (3, 9, 5, 7, 2, 8), 8, 16, torch.Generator().manual_seed(0))  # 5-19 tokens
        return torch.tensor(losses), dict(model.named_parameters()), start
    adamw, sgd = (lambda p: torch.optim.AdamW(p, lr=3e-3)), (lambda p: torch.optim.SGD(p, lr=0.1))
    assert rel_err(train_steps(True, adamw)[0], train_steps(False, adamw)[0]) < 1e-5
    (fast_losses, fast, start), (ref_losses, ref, _) = train_steps(True, sgd), train_steps(False, sgd)
    assert rel_err(fast_losses, ref_losses) < 1e-5
    assert max(rel_err(fast[name], ref[name]) for name in ref) < 1e-5
    assert rel_err(ref["layers.1.mixer.in_proj.weight"], start["layers.1.mixer.in_proj.weight"]) > 1e-3  # it trained


@pytest.mark.parametrize("layers", [dict(arch="mamba1"), dict(arch="mamba2"), dict(pattern="MA"), dict(pattern="LL")])
def test_lm_forward_and_backward_under_bf16_autocast_stay_close_to_fp32(layers, scan_path):
    """train.py --dtype bf16: Mamba 1, Mamba 2, the hybrid and linear attention run under bf16 autocast
    (on CPU here, CUDA's is the same code), with outputs and gradients within bf16's rounding of fp32's."""
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=20, d_model=32, n_layers=2, d_state=16, headdim=16, **layers))
    inputs = torch.randint(0, 20, (2, 24), generator=torch.Generator().manual_seed(0))
    runs = []
    for bf16 in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(inputs)
        logits.float().square().mean().backward()
        runs.append((logits, torch.cat([p.grad.flatten() for p in model.parameters()])))
    (want, want_grad), (got, got_grad) = runs
    assert got.dtype == torch.bfloat16 and want.dtype == torch.float32
    assert 1e-4 < rel_err(got, want) < 3e-2 and rel_err(got_grad, want_grad) < 3e-2  # > 1e-4: bf16 did run


# A state reset where packed examples start: new_example (mamba_ssm's seq_idx)

# 2 rows of 37 tokens: starts on chunk edges (chunks of 8) and inside chunks, a one-token example (16),
# one at the last token, and a first example with no flag (row 1's tokens 0-2)
PACKED_STARTS = ([0, 5, 16, 17, 30], [3, 15, 36])


def test_new_example_makes_the_scans_and_the_conv_compute_each_packed_example_alone(scan_path):
    """The spec (and the fast path) in fp64: with new_example, the Mamba 1 scan, the Mamba 2 scan and
    the conv give each packed example the outputs and input gradients of the example run alone, and
    parameter gradients that are their sum over the examples; without it, they differ."""
    torch.manual_seed(0)
    b, L, D, H, P, G, N = 2, 37, 6, 2, 3, 2, 4
    r = lambda *shape: torch.randn(*shape, dtype=torch.float64)
    layer = Mamba2(8, d_state=N, headdim=4).double()  # its conv1d: 16 + 2·4 channels, 4 taps
    mamba1 = dict(u=r(b, D, L), dt=r(b, D, L), A=-r(D, N).exp(), B=r(b, N, L), C=r(b, N, L), D=r(D),
                  z=r(b, D, L), dt_bias=r(D))
    mamba2 = dict(x=r(b, L, H, P), dt=r(b, L, H), A=-r(H).exp(), B=r(b, L, G, N), C=r(b, L, G, N),
                  D=r(H), dt_bias=r(H))
    cases = [  # (function, inputs, their time axes, parameters it reads itself)
        (lambda new_example, **x: mimetic.selective_scan(**x, new_example=new_example), mamba1,
         dict(u=2, dt=2, B=2, C=2, z=2, out=2), []),
        (lambda new_example, **x: mimetic.ssd_scan(**x, chunk_size=8, new_example=new_example), mamba2,
         dict(x=1, dt=1, B=1, C=1, out=1), []),
        (lambda x, new_example: mimetic.causal_conv(layer, x, new_example), dict(x=r(b, L, 24)),
         dict(x=1, out=1), list(layer.conv1d.parameters()))]
    new_example = new_example_at(L, *PACKED_STARTS)
    for fn, inputs, time_dims, params in cases:
        packed, alone = packed_and_alone(fn, inputs, time_dims, new_example, params)
        assert max(rel_err(packed[k], alone[k]) for k in packed) < 1e-12
        assert rel_err(fn(**inputs, new_example=None), alone["out"]) > 0.1


def small_lm(arch):
    return LM(ModelConfig(vocab_size=12, d_model=16, n_layers=2, arch=arch, d_state=4, headdim=8,
                          chunk_size=8))


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_lm_with_new_example_computes_each_packed_example_alone(arch, scan_path):
    """The LM in fp64, logits and every parameter's gradient. Within 1e-6, not 1e-12: RMSNorm computes
    in fp32 even for fp64 weights, where a matmul's last bits, which depend on the batch's shape, can
    round differently."""
    torch.manual_seed(0)
    model = small_lm(arch).double()
    ids, new_example = torch.randint(0, 12, (2, 37)), new_example_at(37, *PACKED_STARTS)
    run = lambda input_ids, new_example: model(input_ids, new_example)
    packed, alone = packed_and_alone(run, dict(input_ids=ids), dict(input_ids=1, out=1), new_example,
                                     list(model.parameters()))
    assert len(packed) == 1 + len(list(model.parameters()))
    assert max(rel_err(packed[k], alone[k]) for k in packed) < 1e-6
    assert rel_err(model(ids), alone["out"]) > 0.1


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_new_example_on_the_fast_path_matches_the_readable_path(arch, monkeypatch):
    """fp32, packed rows with resets: mimetic_kernels.py gives the readable path's numbers."""
    monkeypatch.setattr(mimetic.kernels, "TORCH_CHUNK", 8)
    torch.manual_seed(0)
    model = small_lm(arch)
    ids, new_example = torch.randint(0, 12, (2, 37)), new_example_at(37, *PACKED_STARTS)
    runs = []
    for fast in (True, False):
        monkeypatch.setattr(mimetic, "use_kernels", fast)
        model.zero_grad()
        logits = model(ids, new_example)
        logits.square().mean().backward()
        runs.append((logits, torch.cat([p.grad.flatten() for p in model.parameters()])))
    (fast, fast_grad), (readable, readable_grad) = runs
    assert rel_err(fast, readable) < 1e-5 and rel_err(fast_grad, readable_grad) < 1e-5


def test_new_example_with_one_example_per_row_changes_nothing(scan_path):
    """A start at the first token only resets a state that is 0 anyway: on the fast path the logits
    are bit for bit those without new_example; mimetic.py's own conv then sums its taps in another
    order (1e-16 apart in fp64)."""
    torch.manual_seed(0)
    for arch in ("mamba1", "mamba2"):
        model = small_lm(arch)
        ids, first = torch.randint(0, 12, (2, 37)), new_example_at(37, [0], [0])
        if scan_path == "kernels":
            assert torch.equal(model(ids, first), model(ids))
        layer = model.layers[0].mixer.double()
        x = torch.randn(2, 37, layer.conv1d.in_channels, dtype=torch.float64)
        assert rel_err(mimetic.causal_conv(layer, x, first), mimetic.causal_conv(layer, x)) < 1e-14


def test_new_example_must_be_a_bool_mask_of_the_rows():
    layer, h = Mamba2(8, d_state=4, headdim=4), torch.randn(2, 5, 8)
    seq_idx, too_long = torch.zeros(2, 5, dtype=torch.int32), torch.zeros(2, 6, dtype=torch.bool)
    for bad in (seq_idx, too_long):
        with pytest.raises(ValueError, match=r"new_example must be a bool \(batch, length\) tensor"):
            layer(h, bad)
    hybrid = LM(ModelConfig(vocab_size=12, d_model=16, n_layers=2, pattern="MA", headdim=8))
    with pytest.raises(TypeError, match="new_example"):  # attention takes none
        hybrid(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.bool))


@pytest.mark.long
def test_torch_compile_with_dynamic_shapes_matches_eager():
    """torch.compile(model, dynamic=True) on batches whose length changes, as in training (one and two SSD
    chunks): the same outputs and gradients as eager, for Mamba 1 with attention and for Mamba 2."""
    for arch, pattern in (("mamba1", "MA"), ("mamba2", "ML")):
        torch.manual_seed(0)
        model = mimetic_init_(LM(ModelConfig(vocab_size=12, d_model=16, n_layers=2, arch=arch, pattern=pattern,
                                             d_state=8, headdim=8, linear_head_dim=8)))
        compiled = torch.compile(model, dynamic=True)
        for length in (5, 9, 70):
            x = torch.randint(0, 12, (3, length))
            outputs, grads = [], []
            for run in (model, compiled):
                model.zero_grad()
                outputs.append(run(x))
                outputs[-1].square().mean().backward()
                grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            assert rel_err(outputs[1], outputs[0]) < 1e-6 and rel_err(grads[1], grads[0]) < 1e-6, (arch, length)


# ---------------------------------------------------------------------------------------------------
# Mimetic initialization (§3)

def test_mimetic_A_makes_A_bar_near_one():
    torch.manual_seed(0)
    m1 = mimetic_init_(Mamba1(16, d_state=16), c=8.0)
    A_bar = torch.exp(m1.A)  # with Δ = 1
    assert A_bar[:, 1:].min() >= 0.99
    assert torch.allclose(A_bar[:, 0], torch.full((32,), math.exp(-1)))  # A_log = log 1 = 0: A = −1 for any c
    m2 = Mamba2(64, headdim=8)
    A_init = -m2.A
    mimetic_init_(m2)
    assert torch.exp(m2.A)[A_init >= 2].min() >= 0.99  # −A = (−A_init)^(−c) ≤ 2^−8
    assert torch.allclose(-m2.A, A_init ** -8.0, rtol=1e-5)


@pytest.mark.parametrize("cls, bias", [(Mamba1, False), (Mamba1, True), (Mamba2, False), (Mamba2, True)])
def test_mimetic_dt_is_one_on_any_input(cls, bias):
    torch.manual_seed(0)
    layer = cls(16, d_state=8, bias=bias, **({"headdim": 8} if cls is Mamba2 else {}))
    if bias:
        torch.nn.init.normal_(layer.in_proj.bias)  # a trained-looking bias must not leak into Δ
    mimetic_init_(layer, A=False, bc=False)
    delta = mimetic.ssm_params(layer, torch.randn(3, 10, 16) * 10)[0]
    assert torch.allclose(delta, torch.ones_like(delta), atol=1e-6)


@pytest.mark.parametrize("cls", [Mamba1, Mamba2])
def test_mimetic_bc_correlates_W_C_with_W_B(cls):
    torch.manual_seed(0)
    layer = cls(64, d_state=32, **({"headdim": 16, "ngroups": 2} if cls is Mamba2 else {}))

    def correlations():
        where = mimetic.layout_of(layer)
        weight = where.proj.weight
        return [F.cosine_similarity(weight[b].flatten(), weight[c].flatten(), dim=0).item()
                for b, c in zip(where.B, where.C)]
    assert all(abs(r) < 0.1 for r in correlations())
    mimetic_init_(layer, A=False, dt=False, conv=False)
    assert all(abs(r - 1 / math.sqrt(2)) < 0.05 for r in correlations())  # W_C = ½(W_C′ + W_B): 1/√2


@pytest.mark.parametrize("cls", [Mamba1, Mamba2])
def test_identity_conv_passes_input_through(cls):
    layer = mimetic_init_(cls(16, d_state=8, **({"headdim": 8} if cls is Mamba2 else {})), conv=True)
    x = torch.randn(2, layer.conv1d.in_channels, 9)
    assert torch.equal(layer.conv1d(x)[..., :9], x)


def test_conv_default_is_on_for_mamba2_off_for_mamba1():
    torch.manual_seed(0)
    m1, m2 = Mamba1(16), Mamba2(16, headdim=8)
    w1 = m1.conv1d.weight.clone()
    mimetic_init_(m1)
    mimetic_init_(m2)
    assert torch.equal(m1.conv1d.weight, w1)
    assert m2.conv1d.weight[:, 0, -1].eq(1).all() and m2.conv1d.weight[:, 0, :-1].eq(0).all()


def test_mimetic_layers_touches_only_those_blocks():
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=20, d_model=16, n_layers=4, pattern="MMAM"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mimetic_init_(model, layers=[1])
    changed = {k.split(".")[1] for k, v in model.state_dict().items()
               if k not in before or not torch.equal(v, before[k])}
    assert changed == {"1"}
    assert model.layers[0].mixer.mimetic_c is None and model.layers[1].mixer.mimetic_c.item() == 8.0
    with pytest.raises(ValueError, match=r"layers \[2\]"):
        mimetic_init_(model, layers=[2])  # the attention layer


def test_eq12_mamba1_becomes_causal_linear_attention_as_c_grows():
    """At mimetic init, M restricted to n ≥ 2 → CausalMask(Xᵀ W_Cᵀ W_B X) (Eq. 12), error shrinking with c."""
    torch.manual_seed(0)
    base = Mamba1(16, d_state=8)
    h = torch.randn(2, 16, 16)
    errors = []
    for c in (2.0, 4.0, 8.0):
        layer = Mamba1(16, d_state=8)
        layer.load_state_dict(base.state_dict())
        mimetic_init_(layer, c=c)
        delta, A, B, C = mimetic.ssm_params(layer, h)
        M = mimetic.ssm_matrix(delta, A[:, 1:], B[:, :, 1:], C[:, :, 1:])
        linear = (C[:, 0, 1:].transpose(1, 2) @ B[:, 0, 1:]).tril()  # (b, L, L): C_iᵀ B_j, Δ = 1
        errors.append(rel_err(M, linear[:, None].expand_as(M)))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1 - math.exp(-15 * 2 ** -8.0)  # the n = 2 mask at distance 15 bounds it


@pytest.mark.parametrize("cls", [Mamba1, Mamba2])
def test_attention_matrix_times_x_is_the_scan(cls):
    torch.manual_seed(0)
    layer = cls(16, d_state=8, **({"headdim": 8, "ngroups": 2} if cls is Mamba2 else {}))
    h = torch.randn(2, 23, 16)
    M = mimetic.attention_matrix(layer, h)
    delta, A, B, C = mimetic.ssm_params(layer, h)
    if cls is Mamba1:
        x = mimetic.ssm_inputs(layer, h)[0]  # (b, D, L)
        assert rel_err(torch.einsum("bdij,bdj->bdi", M, x), mimetic.selective_scan_loop(x, delta, A, B, C)) < 1e-5
    else:
        x = mimetic.ssm_inputs(layer, h)[0]  # (b, L, H, P): every channel of a head shares its M
        P = layer.headdim
        y = mimetic.selective_scan_loop(x.permute(0, 2, 3, 1).flatten(1, 2), delta.repeat_interleave(P, 1),
                                        A.repeat_interleave(P, 0), B, C)
        assert rel_err(torch.einsum("bhij,bjhp->bihp", M, x), y.unflatten(1, (-1, P)).permute(0, 3, 1, 2)) < 1e-5


def test_attention_matrix_is_stable_for_long_sequences():
    torch.manual_seed(0)
    layer = Mamba2(16, d_state=4, headdim=8)
    with torch.no_grad():
        layer.dt_bias.fill_(3.0)  # Δ ≈ 3, A up to −16: Σ ΔA over 2000 steps reaches −10⁵
        M = mimetic.attention_matrix(layer, torch.randn(1, 2000, 16))
        mask = mimetic.attention_mask(layer, torch.randn(1, 2000, 16))
    assert torch.isfinite(M).all() and torch.isfinite(mask).all()
    assert mask.max() <= 1 and torch.equal(mask.triu(1), torch.zeros_like(mask))


def test_mimetic_mask_reaches_further_than_default():
    torch.manual_seed(0)
    h = torch.randn(1, 64, 32)
    layer = Mamba1(32)
    far = lambda mask: mask[0, -1, 0].item()  # how much of token 0 the last token still sees
    default = far(mimetic.attention_mask(layer, h))
    mimetic_init_(layer)
    # Δ = 1 and A_n = −n⁻⁸: the mask over 63 steps is exp(−63 n⁻⁸), averaged over n = 1..16
    expected = sum(math.exp(-63 * n ** -8.0) for n in range(1, 17)) / 16
    assert default < 0.2 and abs(far(mimetic.attention_mask(layer, h)) - expected) < 1e-5 and expected > 0.9


# ---------------------------------------------------------------------------------------------------
# Synthetic tasks and evaluate

LENGTHS = {"copy": 12, "stack": 12, "mqar": 16, "sort": 40, "selective_copy": 40, "induction": 30}


def batch(task, batch_size=32, length=None, seed=0, **kw):
    length = LENGTHS[task] if length is None else length
    return make_batch(task, batch_size, length, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("task", TASKS)
def test_task_vocab_size_is_the_tokens_a_batch_uses(task):
    """task_vocab_size(task, V) leaves no token out and none unused: a batch writes content tokens
    below V and every one of the task's special tokens, V, V+1, ..., up to task_vocab_size - 1."""
    V = 64
    inputs, targets = batch(task, vocab_size=V)
    used = set(inputs.unique().tolist()) | set(targets[targets != -100].unique().tolist())
    assert max(used) + 1 == task_vocab_size(task, V)
    assert set(range(V, task_vocab_size(task, V))) <= used


@pytest.mark.parametrize("task", TASKS)
def test_shapes_dtypes_and_vocab_covers_tokens(task):
    n, B = LENGTHS[task], 8
    T = {"copy": 2 * n + 1, "stack": 2 * n + 1, "sort": 2 * n + 1, "mqar": 6 * n,
         "selective_copy": n + SELECTIVE_COPY_TOKENS, "induction": n}[task]
    for vocab_size in (None, 64):
        inputs, targets = batch(task, B, vocab_size=vocab_size)
        assert inputs.shape == targets.shape == (B, T)
        assert inputs.dtype == targets.dtype == torch.long
        assert inputs.device.type == "cpu"
        assert inputs.min() >= 0 and (targets[targets != -100] >= 0).all()
        top = max(inputs.max().item(), targets.max().item())
        assert top + 1 <= task_vocab_size(task, vocab_size)


@pytest.mark.parametrize("task", ["copy", "stack", "sort"])
def test_copy_stack_sort_labels(task):
    n = LENGTHS[task]
    V = {"copy": 26, "stack": 26, "sort": 512}[task]
    inputs, targets = batch(task)
    string = inputs[:, :n]
    assert (inputs[:, n] == V).all()  # SEP
    assert (targets[:, :n] == -100).all()
    labels = targets[:, n:]
    assert labels.shape[1] == n + 1 and (labels[:, -1] == V + 1).all()  # STOP ends every label run
    expected = {"copy": string, "stack": string.flip(1), "sort": string.sort(1).values}[task]
    assert torch.equal(labels[:, :-1], expected)
    assert torch.equal(inputs[:, n + 1:], labels[:, :-1])  # teacher forcing: next input = previous label
    assert string.max() < V
    if task == "sort":
        assert all(len(set(row.tolist())) == n for row in string)  # no repeats
        assert (labels[:, 1:-1] > labels[:, :-2]).all()


def test_sort_can_use_the_whole_vocabulary():
    inputs, targets = make_batch("sort", 4, 10, vocab_size=10, generator=torch.Generator().manual_seed(1))
    assert (targets[:, 10:20] == torch.arange(10)).all()


def test_mqar_layout():
    n, V, B = 16, 8192, 64
    inputs, targets = batch("mqar", B, n)
    keys, values = inputs[:, 0:2 * n:2], inputs[:, 1:2 * n:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    assert (targets[:, :2 * n] == -100).all()
    assert ((targets != -100).sum(1) == n).all()
    for b in range(B):
        assert len(set(keys[b].tolist())) == n and len(set(values[b].tolist())) == n
        pairs = dict(zip(keys[b].tolist(), values[b].tolist()))
        where = (targets[b] != -100).nonzero().squeeze(1)
        assert ((where - 2 * n) % 2 == 0).all()  # queries sit at even offsets of the query region
        queried = inputs[b, where].tolist()
        assert sorted(queried) == sorted(pairs)  # every key queried exactly once
        assert targets[b, where].tolist() == [pairs[k] for k in queried]


def test_mqar_key_and_value_ranges_at_the_smallest_vocabulary():
    inputs, targets = make_batch("mqar", 16, 3, vocab_size=8, generator=torch.Generator().manual_seed(0))
    assert inputs.shape == (16, 18)
    assert (inputs[:, 0:6:2].sort(1).values == torch.tensor([1, 2, 3])).all()  # keys: all of [1, 4)
    assert ((inputs[:, 1:6:2] >= 4) & (inputs[:, 1:6:2] < 8)).all()  # values: [4, 8)
    assert (inputs[:, 6:] < 8).all() and inputs[:, 6:].unique().numel() == 8  # fillers span [0, 8)


def test_mqar_queries_follow_a_power_law():
    n = 16
    inputs, targets = batch("mqar", 512, n)
    offset = ((targets != -100).nonzero()[:, 1] - 2 * n) // 2  # slot in 0..2n-1
    # p(slot) ∝ (slot + 1)^-0.99: the first half of the slots gets far more than half of the queries
    assert (offset < n).float().mean() > 0.6
    assert offset.max() < 2 * n


def test_selective_copy():
    L, V, k = 40, 16, SELECTIVE_COPY_TOKENS
    inputs, targets = batch("selective_copy", length=L)
    region = inputs[:, :L]
    assert ((region != V).sum(1) == k).all()  # exactly 16 non-BLANK tokens
    assert (inputs[:, L] == V + 1).all()  # SEP
    assert (targets[:, :L] == -100).all()
    content = region[region != V].view(-1, k)  # row-major: the region's tokens in order
    assert torch.equal(targets[:, L:], content)
    assert torch.equal(inputs[:, L + 1:], content[:, :-1])
    assert make_batch("selective_copy", 2, k)[0][:, :k].ne(V).all()  # length 16: no blanks at all


def test_induction():
    L, V = 30, 16
    inputs, targets = batch("induction", 256, L)
    assert ((inputs == V).sum(1) == 2).all() and (inputs[:, -1] == V).all()
    first = (inputs == V).int().argmax(1)
    assert (first <= L - 3).all() and first.unique().numel() > 20  # spread over [0, L-3]
    assert (targets[:, :-1] == -100).all()
    assert torch.equal(targets[:, -1], inputs[torch.arange(256), first + 1])


@pytest.mark.parametrize("task", TASKS)
def test_determinism_and_global_rng_untouched(task):
    state = torch.random.get_rng_state()
    a, b, c = batch(task, seed=3), batch(task, seed=3), batch(task, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(make_batch(task, 4, LENGTHS[task])[0], make_batch(task, 4, LENGTHS[task])[0])
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("task, kwargs, name", [
    ("cpy", dict(batch_size=2, length=4), "cpy"),
    ("copy", dict(batch_size=0, length=4), "batch_size"),
    ("mqar", dict(batch_size=-1, length=4), "batch_size"),
    ("copy", dict(batch_size=2, length=0), "length"),
    ("induction", dict(batch_size=2, length=-3), "length"),
    ("copy", dict(batch_size=2, length=4, vocab_size=0), "vocab_size"),
    ("sort", dict(batch_size=2, length=513), "sort"),
    ("sort", dict(batch_size=2, length=11, vocab_size=10), "vocab_size"),
    ("mqar", dict(batch_size=2, length=4, vocab_size=8), "mqar"),
    ("selective_copy", dict(batch_size=2, length=15), "selective_copy"),
    ("induction", dict(batch_size=2, length=3), "induction"),
])
def test_bad_inputs_raise(task, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_batch(task, **kwargs)


def test_unknown_task_lists_valid_ones():
    for call in (lambda: task_vocab_size("nope"), lambda: evaluate(nn.Linear(1, 1), "nope", 4)):
        with pytest.raises(ValueError, match="nope") as err:
            call()
        assert all(t in str(err.value) for t in TASKS)


class Oracle(nn.Module):
    """Looks up the targets of each input row (collected from the same seeded batches)."""

    def __init__(self, answers, vocab):
        super().__init__()
        self.answers, self.vocab = answers, vocab
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, inputs):
        targets = torch.stack([self.answers[tuple(row.tolist())] for row in inputs]).clamp(min=0)
        return nn.functional.one_hot(targets, self.vocab).float() * self.scale


class Constant(nn.Module):
    def __init__(self, token, vocab):
        super().__init__()
        self.token, self.vocab = token, vocab

    def forward(self, inputs):
        return nn.functional.one_hot(torch.full_like(inputs, self.token), self.vocab).float()


@pytest.mark.parametrize("task", TASKS)
def test_evaluate_oracle_is_perfect(task):
    n, g = LENGTHS[task], torch.Generator().manual_seed(5)
    answers = {}
    for _ in range(3):
        inputs, targets = make_batch(task, 8, n, generator=g)
        answers.update({tuple(i.tolist()): t for i, t in zip(inputs, targets)})
    model = Oracle(answers, task_vocab_size(task)).train()
    result = evaluate(model, task, n, batch_size=8, n_batches=3, generator=torch.Generator().manual_seed(5))
    assert result == dict(token_acc=1.0, exact_match=1.0, string_acc=1.0)
    assert set(result) == set(mimetic.METRICS)  # the names tables and plots read
    assert model.training  # training mode restored


def test_evaluate_constant_model():
    # predicting STOP everywhere gets exactly the one STOP label of each copy sequence right
    n = 9
    model = Constant(27, task_vocab_size("copy")).eval()
    assert evaluate(model, "copy", n) == dict(token_acc=1 / (n + 1), exact_match=0.0, string_acc=0.0)
    assert not model.training
    # induction has one label per sequence: a constant guess is right exactly when it equals the answer
    g = torch.Generator().manual_seed(2)
    answers = torch.cat([make_batch("induction", 64, 20, generator=g)[1][:, -1] for _ in range(4)])
    hit = (answers == 3).float().mean().item()
    result = evaluate(Constant(3, 17), "induction", 20, generator=torch.Generator().manual_seed(2))
    assert result["token_acc"] == pytest.approx(hit) and result["exact_match"] == pytest.approx(hit)
    assert result["string_acc"] == result["exact_match"]  # no STOP to leave out
    assert 0.0 < hit < 0.15


def test_string_accuracy_leaves_out_stop_as_jelassi_et_al_do():
    """An oracle that misses STOP on every other example: exact match 1/2, the pipeline's string accuracy 1."""
    n, g = 5, torch.Generator().manual_seed(5)
    inputs, targets = make_batch("copy", 8, n, generator=g)
    wrong_stop = targets.clone()
    wrong_stop[::2, -1] = 0  # STOP (27) predicted as token 0
    model = Oracle({tuple(i.tolist()): t for i, t in zip(inputs, wrong_stop)}, task_vocab_size("copy"))
    result = evaluate(model, "copy", n, batch_size=8, n_batches=1, generator=torch.Generator().manual_seed(5))
    assert result == dict(token_acc=1 - 4 / (8 * (n + 1)), exact_match=0.5, string_acc=1.0)


def test_mqar_sequence_length_is_set_apart_from_the_pairs_as_in_zoology():
    n, T = 4, 64  # zoology's (64, 4)
    inputs, targets = make_batch("mqar", 32, n, seq_len=T, generator=torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (32, T) and ((targets != -100).sum(1) == n).all()
    slots = ((targets != -100).nonzero()[:, 1] - 2 * n) // 2
    assert slots.max() < (T - 2 * n) // 2 and slots.max() >= 2 * n  # queries reach past the 6n layout's slots
    default = make_batch("mqar", 4, n, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(default, make_batch("mqar", 4, n, seq_len=6 * n,
                                                                        generator=torch.Generator().manual_seed(1))))
    with pytest.raises(ValueError, match="seq_len"):
        make_batch("mqar", 4, n, seq_len=4 * n - 1)
    with pytest.raises(ValueError, match="seq_len"):
        make_batch("copy", 4, n, seq_len=20)


def test_evaluate_runs_under_no_grad_in_eval_mode():
    seen = []

    class Spy(Constant):
        def forward(self, inputs):
            seen.append((self.training, torch.is_grad_enabled()))
            return super().forward(inputs)

    model = Spy(0, 28).train()
    evaluate(model, "copy", 5, n_batches=2)
    assert seen == [(False, False)] * 2 and model.training


# ---------------------------------------------------------------------------------------------------
# Bad input gets a clear error

def test_one_layer_can_have_its_own_state_size():
    """Fig. 5 compares one layer's N while the others keep theirs."""
    model = LM(ModelConfig(vocab_size=10, d_model=16, n_layers=3, arch="mamba2", headdim=8, d_state=16,
                           layer_d_state={"1": 4}))  # as config.json stores it
    assert [block.mixer.d_state for block in model.layers] == [16, 4, 16]
    with pytest.raises(ValueError, match="layer_d_state"):
        ModelConfig(n_layers=2, pattern="MA", layer_d_state={1: 8})


def test_model_config_fills_each_architectures_defaults_from_the_table():
    """The paper's N per architecture (§5): 32 for Mamba 1, 128 and head dimension 64 for Mamba 2; what the
    caller passes wins; the pattern defaults to the arch's letter in every layer."""
    m1, m2 = ModelConfig(arch="mamba1", n_layers=2), ModelConfig(arch="mamba2", n_layers=2)
    assert (m1.d_state, m1.expand, m1.d_conv, m1.pattern) == (32, 2, 4, "MM")
    assert (m2.d_state, m2.headdim, m2.expand, m2.d_conv) == (128, 64, 2, 4)
    assert ModelConfig(arch="mamba1", d_state=8).d_state == 8
    assert [b.mixer.d_state for b in LM(ModelConfig(arch="mamba1", d_model=16, n_layers=2)).layers] == [32, 32]
    assert ModelConfig(arch="attention", n_layers=3).pattern == "AAA"
    assert ModelConfig(arch="linear", n_layers=2).pattern == "LL"
    assert ModelConfig(arch="mamba2", n_layers=2, pattern="MA").arch_of("M") == "mamba2"
    with pytest.raises(ValueError, match="M, which stands for one of mamba1, mamba2: set arch"):
        ModelConfig(arch="attention", n_layers=2, pattern="MA")  # not silently a Mamba 1


class ToyMixer(nn.Module):
    """A new architecture in a few lines: each channel mixes the last `width` tokens (a causal depthwise conv),
    a fixed-lag memory, which is all a copy of a string shorter than `width` needs."""

    def __init__(self, d_model, width):
        super().__init__()
        self.taps = nn.Parameter(torch.randn(d_model, 1, width) / width)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, hidden_states):
        x = F.conv1d(hidden_states.transpose(1, 2), self.taps, padding=self.taps.shape[-1] - 1,
                     groups=self.taps.shape[0])
        return self.out_proj(x[..., :hidden_states.shape[1]].transpose(1, 2))


def test_a_new_architecture_is_one_registry_entry_and_its_class(monkeypatch):
    monkeypatch.setitem(mimetic.ARCHS, "toy", mimetic.Arch("T", lambda cfg, i: ToyMixer(cfg.d_model, cfg.d_state),
                                                           dict(d_state=6)))
    config = ModelConfig(vocab_size=task_vocab_size("copy", 8), d_model=32, n_layers=2, arch="toy")
    assert config.pattern == "TT" and config.d_state == 6
    torch.manual_seed(0)
    model = LM(config)
    assert all(isinstance(block.mixer, ToyMixer) for block in model.layers)
    hybrid = LM(ModelConfig(vocab_size=10, d_model=16, n_layers=3, arch="mamba2", pattern="MTA", headdim=8))
    assert [type(block.mixer) for block in hybrid.layers] == [Mamba2, ToyMixer, Attention]
    losses = copy_steps(model, torch.optim.AdamW(model.parameters(), lr=3e-2), [4] * 20, 16, 8,
                        torch.Generator().manual_seed(0))  # (test_train.py: its --arch flag and run folder)
    assert losses[0] > 2 and losses[-1] < 0.1, losses  # from chance (ln 8 ≈ 2.08 a token) to copying
    monkeypatch.undo()
    assert "toy" not in mimetic.ARCHS
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(arch="toy")


def test_bad_configs_and_inputs_raise():
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(arch="mamba3")
    with pytest.raises(ValueError, match="pattern"):
        ModelConfig(n_layers=3, pattern="MMX")
    with pytest.raises(ValueError, match="pattern"):
        ModelConfig(n_layers=3, pattern="MM")
    with pytest.raises(ValueError, match="d_model"):
        ModelConfig(d_model=0)
    with pytest.raises(ValueError, match="d_state"):
        ModelConfig(d_state=0)
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(48, headdim=64)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2(32, headdim=16, ngroups=3)
    with pytest.raises(ValueError, match="hidden_states"):
        Mamba1(16)(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="input_ids"):
        LM(ModelConfig(vocab_size=10, d_model=16, n_layers=1))(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="c must be positive"):
        mimetic_init_(Mamba1(16), c=0)
    with pytest.raises(TypeError, match="Attention"):
        mimetic_init_(Attention(16))
    with pytest.raises(TypeError, match="mask"):
        mimetic.attention_mask(Attention(16), torch.randn(1, 4, 16))
