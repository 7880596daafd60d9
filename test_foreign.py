"""mimetic_init_ and the attention maps on the Mamba models people train: Hugging Face transformers'
(MambaForCausalLM, Mamba2ForCausalLM and their mixers) and mamba_ssm's (Mamba, Mamba2, MambaLMHeadModel,
which need CUDA: here stand-ins with exactly their parameter names and shapes, and a GPU-only test)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mimetic
from conftest import rel_err
from mimetic import SOFTPLUS_INV_1, attention_matrix, bake_mimetic_A_, make_batch, mimetic_init_

transformers = pytest.importorskip("transformers")
from transformers.models.mamba import modeling_mamba  # noqa: E402
from transformers.models.mamba2 import modeling_mamba2  # noqa: E402

transformers.logging.set_verbosity_error()  # not its note, on every call, that mamba_ssm is missing
VOCAB = 20


def hf_model(version, seed=0, **config):
    torch.manual_seed(seed)
    if version == 1:
        return transformers.MambaForCausalLM(transformers.MambaConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, state_size=8, expand=2, **config))
    return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, state_size=8, expand=2, head_dim=8, num_heads=4,
        chunk_size=8, **{"n_groups": 1, **config}))


@pytest.fixture
def scan_spy(monkeypatch):
    """What transformers' own forward hands its scan: the SSM input x, dt, its bias, A, B, C, D, z and the output."""
    seen = []

    def spy_on(module, name):
        original = getattr(module, name)

        def spy(hidden_states, dt, A, B, C, *args, **kwargs):
            out = original(hidden_states, dt, A, B, C, *args, **kwargs)
            seen.append(dict(x=hidden_states, dt=dt, A=A, B=B, C=C, out=out, **kwargs))
            return out
        monkeypatch.setattr(module, name, spy)
    spy_on(modeling_mamba, "mamba_selective_scan")
    spy_on(modeling_mamba2, "mamba2_chunk_scan")
    return seen


@pytest.mark.parametrize("version", [1, 2])
def test_inside_transformers_own_forward_the_layer_is_mimetic(version, scan_spy):
    """A = −exp(−c · A_log), Δ = 1 exactly, W_C = ½(W_C′ + W_B), identity conv for Mamba 2."""
    model = hf_model(version)
    mixers = [block.mixer for block in model.backbone.layers]
    A_log = [m.A_log.detach().clone() for m in mixers]
    proj = [m.x_proj if version == 1 else m.in_proj for m in mixers]
    W = [p.weight.detach().clone() for p in proj]
    mimetic_init_(model, c=4.0)
    model(torch.randint(0, VOCAB, (2, 9)))
    for k, seen in enumerate(scan_spy):
        bias = seen["delta_bias"][:, None] if version == 1 else seen["dt_bias"]
        delta = F.softplus(seen["dt"] + bias)
        assert torch.equal(delta, torch.ones_like(delta))
        torch.testing.assert_close(seen["A"], -torch.exp(-4.0 * A_log[k]))
    N, R = 8, mixers[0].time_step_rank
    b, c = (slice(R, R + N), slice(R + N, R + 2 * N)) if version == 1 else (slice(64, 72), slice(72, 80))
    torch.testing.assert_close(proj[0].weight[c], 0.5 * (W[0][c] + W[0][b]))
    assert torch.equal(proj[0].weight[b], W[0][b])
    taps = mixers[0].conv1d.weight[:, 0]
    assert torch.equal(taps[:, -1], torch.ones_like(taps[:, -1])) == (version == 2)


@pytest.mark.parametrize("version", [1, 2])
def test_a_mimetic_transformers_model_trains_and_its_raw_A_log_learns(version):
    model = mimetic_init_(hf_model(version))
    raw = model.backbone.layers[0].mixer.parametrizations.A_log.original
    start = raw.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g, losses = torch.Generator().manual_seed(0), []
    for _ in range(60):
        inputs, targets = make_batch("copy", 16, 3, vocab_size=4, generator=g)  # chance: ln 4 ≈ 1.39 a token
        loss = F.cross_entropy(model(inputs).logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        assert raw.grad is not None and raw.grad.abs().sum() > 0  # gradients reach the parametrized A_log
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert not torch.equal(raw, start)


@pytest.mark.parametrize("version", [1, 2])
def test_state_dicts_round_trip_and_baking_gives_a_plain_model(version, tmp_path):
    model = mimetic_init_(hf_model(version), c=2.0)
    ids = torch.randint(0, VOCAB, (2, 11))
    want = model(ids).logits.detach()
    keys = set(model.state_dict())
    assert "backbone.layers.0.mixer.parametrizations.A_log.original" in keys
    assert "backbone.layers.0.mixer.parametrizations.A_log.0.c" in keys and "backbone.layers.0.mixer.A_log" not in keys
    twin = mimetic_init_(hf_model(version, seed=1))  # the same mimetic_init_: then its state dict loads
    twin.load_state_dict(model.state_dict())
    assert torch.equal(twin(ids).logits, want)
    with pytest.raises(RuntimeError, match="A_log"):
        hf_model(version).load_state_dict(model.state_dict())  # an unmodified model cannot take it
    bake_mimetic_A_(model)
    assert torch.allclose(model(ids).logits, want, atol=1e-6, rtol=0)  # the same A, written into A_log
    plain = hf_model(version, seed=2)
    plain.load_state_dict(model.state_dict())  # strict
    assert torch.allclose(plain(ids).logits, want, atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert torch.allclose(loaded(ids).logits, want, atol=1e-6, rtol=0)


def test_from_pretrained_without_baking_redraws_A_and_rerunning_inits_leaves_raw_alone(tmp_path):
    """The two pitfalls the docstring names, shown."""
    model = mimetic_init_(hf_model(2))
    ids = torch.randint(0, VOCAB, (2, 11))
    model.save_pretrained(tmp_path)
    redrawn = type(model).from_pretrained(tmp_path)  # it only warns that A_log is missing
    assert not torch.allclose(redrawn(ids).logits, model(ids).logits, atol=1e-3)
    mixer = model.backbone.layers[0].mixer
    raw = mixer.parametrizations.A_log.original.detach().clone()
    mixer.init_mamba2_weights()  # transformers' own init writes into the computed A_log, not into raw
    assert torch.equal(mixer.parametrizations.A_log.original, raw)


@pytest.mark.parametrize("version", [1, 2])
def test_attention_matrix_times_the_ssm_input_is_transformers_ssm_output(version, scan_spy):
    model = mimetic_init_(hf_model(version))
    mixer = model.backbone.layers[1].mixer
    captured = {}
    mixer.register_forward_pre_hook(lambda module, args: captured.update(h=args[0]))
    model(torch.randint(0, VOCAB, (2, 13)))
    seen, M = scan_spy[1], attention_matrix(mixer, captured["h"]).detach()
    if version == 1:  # x (b, D, L); out = (M x + D x) ⊙ SiLU(z)
        y = (torch.einsum("bdij,bdj->bdi", M, seen["x"]) + seen["D"][:, None] * seen["x"]) * F.silu(seen["z"])
    else:  # x (b, L, H, P); out = M_h x_h + D_h x_h
        y = torch.einsum("bhij,bjhp->bihp", M, seen["x"]) + seen["D"][:, None] * seen["x"]
    assert rel_err(y, seen["out"].detach()) < 1e-5
    mask = mimetic.attention_mask(mixer, captured["h"])
    assert mask.shape == (2, 13, 13) and mask.max() <= 1


@pytest.mark.parametrize("version, groups", [(1, 1), (2, 1), (2, 2)])
def test_our_blocks_with_transformers_weights_are_the_same_layer(version, groups):
    """fp64 forward output and input gradient of transformers' mixer and of our block with its weights. One
    difference: transformers' Mamba 2 torch path computes its scan in fp32 (`hidden_states.float()` in
    mamba2_chunk_scan) whatever the input dtype, so there the two agree to fp32 rounding only."""
    model = hf_model(version, **({"n_groups": groups} if version == 2 else {})).double()
    mixer = model.backbone.layers[0].mixer
    ours = mimetic.Mamba1(16, d_state=8) if version == 1 else mimetic.Mamba2(16, d_state=8, headdim=8, ngroups=groups)
    ours.double().load_state_dict(mixer.state_dict())  # strict: the same names, shapes and row layouts
    h = torch.randn(2, 19, 16, dtype=torch.float64, requires_grad=True)
    outputs = []
    for layer in (mixer, ours):
        out = layer(h)
        grad, = torch.autograd.grad(out.square().sum(), h)
        outputs.append((out, grad))
    tol = 1e-10 if version == 1 else 1e-6
    assert rel_err(outputs[1][0], outputs[0][0]) < tol and rel_err(outputs[1][1], outputs[0][1]) < tol


def test_where_A_log_is_zero_A_stays_minus_one_whatever_c():
    """Documented counts: every Mamba 1 channel's first state dimension; transformers' Mamba 2 head 0."""
    m1, m2 = mimetic_init_(hf_model(1), c=8.0), mimetic_init_(hf_model(2), c=8.0)
    A1 = -torch.exp(m1.backbone.layers[0].mixer.A_log)
    A2 = -torch.exp(m2.backbone.layers[0].mixer.A_log)
    assert (A1 == -1).sum() == A1.shape[0] and torch.equal(A1[:, 0], -torch.ones(A1.shape[0]))
    assert (A2 == -1).sum() == 1 and A2[0] == -1 and (A2[1:] > -2 ** -7).all()


def test_an_unknown_module_is_a_clear_error():
    with pytest.raises(TypeError, match="MambaMixer, Mamba2, Mamba2Mixer"):
        mimetic_init_(nn.Sequential(nn.Linear(2, 2)))


# ---------------------------------------------------------------------------------------------------
# mamba_ssm: stand-ins with its names and shapes (its modules need CUDA to run)

class Mamba(nn.Module):  # named as mamba_ssm's classes are, which is how mimetic_init_ knows them
    """mamba_ssm.modules.mamba_simple.Mamba's parameters: in_proj [x, z], conv1d, x_proj [dt, B, C], dt_proj,
    A_log (D, N) marked _no_weight_decay, D, out_proj."""

    def __init__(self, d_model=16, d_state=8, expand=2, d_conv=4):
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank = expand * d_model, d_state, math.ceil(d_model / 16)
        D = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * D, bias=False)
        self.conv1d = nn.Conv1d(D, D, d_conv, groups=D, padding=d_conv - 1)
        self.x_proj = nn.Linear(D, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, D)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1.0)).repeat(D, 1))
        self.D = nn.Parameter(torch.ones(D))
        self.A_log._no_weight_decay = self.D._no_weight_decay = True
        self.out_proj = nn.Linear(D, d_model, bias=False)


class Mamba2(nn.Module):
    """mamba_ssm.modules.mamba2.Mamba2's parameters: in_proj [z0, x0, z, x, B, C, dt] (z0, x0: the MLP when
    d_ssm < d_inner), conv1d over x, B, C, dt_bias, A_log (H,), D, norm, out_proj; dt_limit."""

    def __init__(self, d_model=16, d_state=8, expand=2, headdim=8, ngroups=2, d_ssm=None, bias=False,
                 dt_limit=(0.0, float("inf"))):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        self.d_state, self.ngroups, self.nheads, self.dt_limit = d_state, ngroups, self.d_ssm // headdim, dt_limit
        d_mlp = self.d_inner - self.d_ssm
        conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, 2 * d_mlp + self.d_ssm + conv_dim + self.nheads, bias=bias)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, 4, groups=conv_dim, padding=3)
        self.dt_bias = nn.Parameter(torch.rand(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(self.d_ssm))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)


class MambaLMHeadModel(nn.Module):
    """backbone.layers[i].mixer, a mamba_ssm.modules.mha.MHA where attn_layer_idx says."""

    def __init__(self, n_layer=4, attn_layer_idx=(2,), layer=Mamba2):
        super().__init__()
        block = lambda i: nn.Module()
        self.backbone = nn.Module()
        self.backbone.layers = nn.ModuleList(block(i) for i in range(n_layer))
        for i, b in enumerate(self.backbone.layers):
            b.mixer = nn.MultiheadAttention(16, 1) if i in attn_layer_idx else layer()


@pytest.mark.parametrize("d_ssm", [None, 16])
def test_mamba_ssm_mamba2_rows_shift_by_its_mlp(d_ssm):
    torch.manual_seed(0)
    layer = Mamba2(d_ssm=d_ssm, bias=True)
    before = layer.in_proj.weight.detach().clone(), layer.in_proj.bias.detach().clone()
    mimetic_init_(layer)
    start = 2 * (32 - layer.d_ssm) + 2 * layer.d_ssm  # z0, x0, z, x
    for g in range(2):
        b, c = slice(start + 8 * g, start + 8 * g + 8), slice(start + 16 + 8 * g, start + 16 + 8 * g + 8)
        for now, was in zip((layer.in_proj.weight, layer.in_proj.bias), before):
            torch.testing.assert_close(now[c], 0.5 * (was[c] + was[b]))
    assert torch.equal(layer.in_proj.weight[:start], before[0][:start])  # z0, x0, z, x untouched
    assert layer.in_proj.weight[-layer.nheads:].abs().sum() == 0 and layer.in_proj.bias[-layer.nheads:].abs().sum() == 0
    assert torch.allclose(layer.dt_bias, torch.full_like(layer.dt_bias, SOFTPLUS_INV_1))


def test_mamba_ssm_mamba1_keeps_no_weight_decay_on_its_raw_A_log():
    layer = mimetic_init_(Mamba())
    assert layer.parametrizations.A_log.original._no_weight_decay
    torch.testing.assert_close(layer.A_log, -8.0 * torch.log(torch.arange(1, 9.0)).repeat(32, 1))
    assert layer.dt_proj.weight.abs().sum() == 0 and layer.conv1d.weight[:, 0, :-1].abs().sum() > 0  # conv: Mamba 1 off
    assert bake_mimetic_A_(layer).A_log._no_weight_decay


def test_a_dt_limit_below_one_makes_delta_one_impossible_and_the_maps_clamp_as_the_layer_does():
    with pytest.raises(ValueError, match="Δ = 1 is impossible"):
        mimetic_init_(Mamba2(dt_limit=(0.001, 0.1)))
    layer = mimetic_init_(Mamba2(dt_limit=(0.001, 0.1)), dt=False)
    delta = mimetic.ssm_params(layer, torch.randn(2, 7, 16) * 100)[0]
    assert delta.min() >= 0.001 and delta.max() <= 0.1


@pytest.mark.parametrize("d_ssm", [None, 16])
def test_ssm_inputs_of_mamba_ssm_mamba2_skip_its_mlp_rows(d_ssm):
    """x, B, C, dt, z come from their rows of in_proj, wherever its MLP rows put them (Eq. 8 holds)."""
    torch.manual_seed(0)
    layer, h = Mamba2(d_ssm=d_ssm), torch.randn(2, 9, 16)
    x, dt, B, C, z = mimetic.ssm_inputs(layer, h)
    D, rows = layer.d_ssm, layer.in_proj(h)
    mlp = 2 * (32 - D)
    assert torch.equal(z, rows[..., mlp:mlp + D]) and torch.equal(dt, rows[..., -layer.nheads:])
    assert x.shape == (2, 9, layer.nheads, 8) and B.shape == C.shape == (2, 9, 2, 8) and z.shape == (2, 9, D)
    M = attention_matrix(layer, h)
    assert M.shape == (2, layer.nheads, 9, 9) and torch.equal(M.triu(1), torch.zeros_like(M))


def test_layers_index_mamba_ssm_blocks_attention_included():
    model = MambaLMHeadModel()
    mimetic_init_(model, layers=[3])
    assert [hasattr(b.mixer, "parametrizations") for b in model.backbone.layers] == [False, False, False, True]
    with pytest.raises(ValueError, match=r"layers \[2\] are not Mamba layers of this model; its .* are \[0, 1, 3\]"):
        mimetic_init_(model, layers=[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mamba_ssm's modules run on CUDA")
def test_gpu_real_mamba_ssm_modules():
    mamba_ssm = pytest.importorskip("mamba_ssm")
    for cls in (mamba_ssm.Mamba, mamba_ssm.Mamba2):
        layer = cls(d_model=64).cuda()
        mimetic_init_(layer)
        h = torch.randn(2, 64, 64, device="cuda")
        ours = (mimetic.Mamba1(64) if cls is mamba_ssm.Mamba else mimetic.Mamba2(64, chunk_size=256)).cuda()
        ours.load_state_dict(bake_mimetic_A_(layer).state_dict())
        assert rel_err(ours(h), layer(h)) < 1e-3  # fused kernels in their precision
        assert attention_matrix(layer, h).isfinite().all()


# ---------------------------------------------------------------------------------------------------
# train.py --pretrained (§6): the loading path, on a tiny random model saved to a folder

@pytest.mark.long
def test_train_py_fine_tunes_a_saved_model_and_trains_a_student_of_one_of_its_layers(tmp_path, capsys):
    import train
    teacher = tmp_path / "teacher"
    hf_model(1).save_pretrained(teacher)  # no tokenizer saved: task tokens are the model's ids 0, 1, ...
    tiny = ["--pretrained", str(teacher), "--vocab-size", "4", "--train-len", "4", "--steps", "4", "--eval-every", "2",
            "--batch-size", "8", "--eval-batches", "1", "--threads", "1", "--device", "cpu"]
    for name, extra in (("finetune", []), ("mimetic", ["--mimetic"]), ("student", ["--teacher-layer", "1",
                                                                                    "--n-layers", "3"])):
        train.main([*tiny, *extra, "--out", str(tmp_path / name)])
        for output in ("done", "attention_init.png", "attention_final.png", "checkpoint.pt"):
            assert (tmp_path / name / output).exists(), (name, output)
    c = train.resolve_config({**vars(train.build_parser().parse_args(tiny)), "teacher_layer": 1, "n_layers": 3})
    student, source = train.Pretrained(c), hf_model(1).backbone.layers[1]
    assert len(student.layers) == 3 and all(torch.equal(block.mixer.in_proj.weight, source.mixer.in_proj.weight)
                                            for block in student.layers)
    mimetic_model = train.build_model({**c, "teacher_layer": None, "mimetic": True})
    assert all(hasattr(block.mixer, "parametrizations") for block in mimetic_model.layers)
    capsys.readouterr()
    train.main(["eval", str(tmp_path / "mimetic"), "--lens", "6"])  # rebuilt from the folder, then loaded
    assert "6 |" in capsys.readouterr().out
