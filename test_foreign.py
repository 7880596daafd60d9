"""mimetic_init_ and the attention maps on the Mamba models people train: Hugging Face transformers'
(MambaForCausalLM, Mamba2ForCausalLM and their mixers) and mamba_ssm's (Mamba, Mamba2, MambaLMHeadModel,
which need CUDA: here stand-ins with exactly their parameter names and shapes, and a GPU-only test)."""
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mimetic
from conftest import HERE, copy_steps, rel_err
from mimetic import (SOFTPLUS_INV_1, attention_map, attention_matrix, bake_mimetic_A_, format_report, make_batch,
                     mimetic_init_, mimetic_report, mixer_inputs)

transformers = pytest.importorskip("transformers")
from packaging.version import Version  # noqa: E402 (a dependency of transformers)
from transformers.models.mamba import modeling_mamba  # noqa: E402
from transformers.models.mamba2 import modeling_mamba2  # noqa: E402

TRANSFORMERS = Version(transformers.__version__)  # pyproject's hf extra declares the floor, 5.15: CI tests it too

transformers.logging.set_verbosity_error()  # not its note, on every call, that mamba_ssm is missing
VOCAB = 20


def hf_model(version, seed=0, **config):
    torch.manual_seed(seed)
    config = {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 2, "state_size": 8, "expand": 2, **config}
    if version == 1:
        return transformers.MambaForCausalLM(transformers.MambaConfig(**config))
    return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        **{"head_dim": 8, "num_heads": 4, "chunk_size": 8, "n_groups": 1, **config}))


@pytest.fixture
def scan_spy(monkeypatch):
    """What transformers' own forward hands its scan: the SSM input x, dt, its bias, A, B, C, D, z and the output.
    The scans are module-level functions of these names from transformers 5.15 on (our floor)."""
    seen = []

    def spy_on(module, name):
        original = getattr(module, name)

        def spy(hidden_states, dt, A, B, C, *args, **kwargs):
            out = original(hidden_states, dt, A, B, C, *args, **kwargs)
            y = out[0] if isinstance(out, tuple) else out  # (y, last state) when asked for the state (a cache)
            seen.append(dict(x=hidden_states, dt=dt, A=A, B=B, C=C, out=y, **kwargs))
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
    assert len(scan_spy) == 2  # one scan per layer: the loop below checks something
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


GROUPED_NORM = pytest.mark.skipif(TRANSFORMERS < Version("5.23"), reason="before 5.23, transformers' gated RMSNorm "
                                  "normalizes across all groups (mamba_ssm's and ours: within each group)")


@pytest.mark.parametrize("version, groups", [(1, 1), (2, 1), pytest.param(2, 2, marks=GROUPED_NORM)])
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
    with pytest.raises(TypeError, match="mamba_ssm.Mamba, mamba_ssm.Mamba2, transformers.MambaMixer, "
                                        "transformers.Mamba2Mixer"):
        mimetic_init_(nn.Sequential(nn.Linear(2, 2)))


# ---------------------------------------------------------------------------------------------------
# Hooked mixer inputs, all-or-nothing and repeatable mimetic_init_, deep copies, and the report

def true_mixer_inputs(model, ids):
    """What each block's mixer reads, by running transformers' blocks one at a time."""
    h, inputs = model.backbone.embeddings(ids), []
    for block in model.backbone.layers:
        inputs.append(block.norm(h))
        h = block(h)
    return inputs


@pytest.mark.parametrize("version", [1, 2])
def test_mixer_inputs_are_each_blocks_true_input(version):
    model, ids = hf_model(version, num_hidden_layers=4), torch.randint(0, VOCAB, (2, 9))
    true, seen = true_mixer_inputs(model, ids), mixer_inputs(model, ids)
    assert list(seen) == [0, 1, 2, 3] and all(torch.equal(seen[k], true[k]) for k in range(4))
    mimetic_init_(model)
    assert all(torch.equal(h, t) for h, t in zip(mixer_inputs(model, ids).values(), true_mixer_inputs(model, ids)))


def test_mixer_inputs_of_our_hybrid_lm_include_its_attention_layer():
    torch.manual_seed(0)
    model = mimetic.LM(mimetic.ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=3, pattern="MAM", d_state=8))
    ids, h, true = torch.randint(0, VOCAB, (2, 7)), None, []
    h = model.embedding(ids)
    for block in model.layers:
        true.append(block.norm(h))
        h = block(h)
    seen = mixer_inputs(model, ids)
    assert list(seen) == [0, 1, 2] and all(torch.equal(seen[k], true[k]) for k in range(3))
    assert sorted(mimetic.mamba_layers(model)) == [0, 2]


def test_mimetic_init_checks_every_layer_before_it_changes_one_and_names_the_users_class():
    model = mimetic_init_(hf_model(2, time_step_limit=(0.0, 0.5)), dt=False)  # layers now ParametrizedMamba2Mixer
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^Mamba2Mixer clamps Δ to \(0.0, 0.5\): Δ = 1 is impossible"):
        mimetic_init_(model, c=2.0, layers=[0, 1])
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())
    fresh = hf_model(2, time_step_limit=(0.0, 0.5))
    before = {k: t.clone() for k, t in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="Δ = 1 is impossible"):
        mimetic_init_(fresh)
    assert fresh.state_dict().keys() == before.keys()  # no layer got its A_log parametrized
    assert all(torch.equal(t, before[k]) for k, t in fresh.state_dict().items())


@pytest.mark.parametrize("version", [1, 2])
def test_baking_a_deep_copy_leaves_the_original_mimetic_and_working(version):
    model, ids = mimetic_init_(hf_model(version), c=2.0), torch.randint(0, VOCAB, (2, 9))
    want = model(ids).logits.detach()
    baked = bake_mimetic_A_(copy.deepcopy(model))  # torch shares the Parametrized… class with the copy
    assert torch.equal(model(ids).logits, want)
    assert torch.allclose(baked(ids).logits, want, atol=1e-6, rtol=0)
    assert "backbone.layers.0.mixer.A_log" in baked.state_dict()
    assert "backbone.layers.0.mixer.parametrizations.A_log.original" in model.state_dict()
    twin = copy.deepcopy(model)
    bake_mimetic_A_(model)  # and the other way round
    assert torch.equal(twin(ids).logits, want)
    assert type(twin.backbone.layers[0].mixer).__name__.startswith("Parametrized")  # still mimetic


@pytest.mark.parametrize("version", [1, 2])
def test_mimetic_init_twice_is_mimetic_init_once(version):
    once, twice = mimetic_init_(hf_model(version)), mimetic_init_(mimetic_init_(hf_model(version)))
    ids = torch.randint(0, VOCAB, (2, 9))
    assert once.state_dict().keys() == twice.state_dict().keys()
    assert all(torch.equal(t, twice.state_dict()[k]) for k, t in once.state_dict().items())
    assert torch.equal(once(ids).logits, twice(ids).logits)
    mimetic_init_(copy.deepcopy(once))  # a deep copy remembers too
    mimetic_init_(mimetic_init_(copy.deepcopy(once), layers=[1]), layers=[1])
    assert all(torch.equal(t, once.state_dict()[k]) for k, t in mimetic_init_(copy.deepcopy(once)).state_dict().items())
    with pytest.raises(ValueError, match=r"layers \[0, 0\] names a layer more than once"):
        mimetic_init_(hf_model(version), layers=[0, 0])


def test_mimetic_init_after_w_c_was_written_averages_it_again():
    """Idempotent, not stuck: when something re-draws in_proj (transformers' init, or a user), W_C is averaged anew."""
    model = mimetic_init_(hf_model(2))
    mixer = model.backbone.layers[0].mixer
    mixer.in_proj.reset_parameters()
    W = mixer.in_proj.weight.detach().clone()
    mimetic_init_(model)
    torch.testing.assert_close(mixer.in_proj.weight[72:80], 0.5 * (W[72:80] + W[64:72]))


@pytest.mark.parametrize("version", [1, 2])
def test_report_moves_to_the_mimetic_side_and_shows_what_transformers_init_undoes(version):
    """On 8 heads: transformers' Mamba 2 head 0 keeps A = −1 (A_log = log 1), which caps its mean mask at 7/8."""
    model = hf_model(version, **({"num_heads": 8, "head_dim": 4} if version == 2 else {}))
    ids = torch.randint(0, VOCAB, (2, 48))
    default = mimetic_report(model, ids)
    mimetic_init_(model)
    mimetic, no_ids = mimetic_report(model, ids), mimetic_report(model)
    for d, m, n in zip(default, mimetic, no_ids):
        assert d["delta"] < 0.2 and abs(m["delta"] - 1) < 1e-6 and m["delta_std"] < 1e-6
        assert n["delta"] == pytest.approx(1) and n["delta_std"] == 0
        assert abs(d["bc_cos"]) < 0.3 and 0.55 < m["bc_cos"] < 0.85 and n["bc_cos"] == m["bc_cos"]
        assert m["mask"] > d["mask"] + 0.05 and n["mask"] is None and m["A_bar"] > 0.8
        assert d["conv_err"] > 0.5 and (m["conv_err"] == 0) == (version == 2)
    model._init_weights(model.backbone.layers[0].mixer)  # transformers' own init: dt bias, conv and out_proj
    reset = mimetic_report(model, ids)
    assert reset[0]["delta"] < 0.2 and reset[0]["conv_err"] > 0.5 and reset[0]["bc_cos"] == mimetic[0]["bc_cos"]
    assert reset[1] == mimetic[1]
    again = mimetic_report(mimetic_init_(model), ids)  # a second mimetic_init_ sets it all again
    assert [dict(r, conv_err=None) for r in again] == [dict(r, conv_err=None) for r in mimetic]  # Mamba 1: no conv
    assert again[0]["conv_err"] == 0 if version == 2 else again[0]["conv_err"] == reset[0]["conv_err"]
    table = format_report(no_ids).splitlines()
    assert len(table) == 3 and table[0].split()[:3] == ["layer", "mask", "∏Ā"] and table[1].split()[:2] == ["0", "-"]


@pytest.mark.parametrize("arch, steps", [("mamba1", 0), ("mamba2", 0),
                                         pytest.param("mamba2", 60, marks=pytest.mark.long)])
def test_report_tells_the_one_mimetic_layer_of_our_lm_from_the_others(arch, steps):
    torch.manual_seed(0)
    config = mimetic.ModelConfig(vocab_size=mimetic.task_vocab_size("copy", 8), d_model=32, n_layers=3, arch=arch,
                                 headdim=16, d_state=16)
    model = mimetic_init_(mimetic.LM(config), layers=[1])
    copy_steps(model, torch.optim.AdamW(model.parameters(), lr=3e-3), [8] * steps, 16, 8,
               torch.Generator().manual_seed(0))
    report = mimetic_report(model, make_batch("copy", 4, 16, vocab_size=8)[0])
    others = [report[0], report[2]]
    assert all(report[1]["mask"] > r["mask"] + 0.2 and report[1]["bc_cos"] > r["bc_cos"] + 0.3 for r in others), report
    assert all(abs(report[1]["delta"] - 1) < 0.05 and r["delta"] < 0.1 for r in others), report


def hf_mamba2_with(**attributes):
    """A transformers Mamba 2 whose config is changed after transformers 5.24 validated it (5.23 did not)."""
    config = transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, state_size=8, expand=2,
                                       head_dim=8, num_heads=4, chunk_size=8, n_groups=1)
    for name, value in attributes.items():
        setattr(config, name, value)
    return transformers.Mamba2ForCausalLM(config)


@pytest.mark.parametrize("attributes, message", [
    (dict(num_heads=3), "3 heads × head_dim 8 for d_inner 32 and 1 groups"),
    (dict(n_groups=3), "4 heads × head_dim 8 for d_inner 32 and 3 groups"),
])
def test_impossible_head_layouts_are_clear_errors(attributes, message):
    model = hf_mamba2_with(**attributes)
    with pytest.raises(RuntimeError):
        model(torch.randint(0, VOCAB, (1, 8)))  # transformers itself cannot run it
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"^Mamba2Mixer has {message}"):
        mimetic_init_(model)
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())
    with pytest.raises(ValueError, match=message):
        attention_map(model.backbone.layers[0].mixer, torch.randn(1, 8, 16))


@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "attention"])
def test_maps_are_fp32_under_bf16_weights_and_under_bf16_autocast(kind):
    torch.manual_seed(0)
    if kind == "attention":
        layer = mimetic.Attention(16, n_heads=2)
    else:
        layer = mimetic_init_(hf_model(1 if kind == "mamba1" else 2)).backbone.layers[0].mixer
    h = torch.randn(2, 12, 16)
    want = attention_map(layer, h).detach()
    assert want.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = attention_map(layer, h)
    bf16 = attention_map(copy.deepcopy(layer).bfloat16(), h.bfloat16()).detach()
    for got in (autocast, bf16):
        assert got.dtype == torch.float32 and rel_err(got, want) < 0.05, rel_err(got, want)
    if kind != "attention":  # under autocast the projections are bf16, as in the layer's forward; Eq. 8 is fp32
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            params, mask = mimetic.ssm_params(layer, h), mimetic.attention_mask(layer, h)
        assert torch.equal(autocast, mimetic.ssm_matrix(*params).mean(1)) and mask.dtype == torch.float32
        assert mimetic.attention_mask(copy.deepcopy(layer).bfloat16(), h.bfloat16()).dtype == torch.float32
    assert attention_map(copy.deepcopy(layer).double(), h.double()).dtype == torch.float64


# ---------------------------------------------------------------------------------------------------
# mamba_ssm: stand-ins with its names and shapes (its modules need CUDA to run)

class Mamba(nn.Module):  # named, and in a module named, as mamba_ssm's: that is how mimetic_init_ knows them
    """mamba_ssm.modules.mamba_simple.Mamba's parameters: in_proj [x, z], conv1d, x_proj [dt, B, C], dt_proj,
    A_log (D, N) marked _no_weight_decay, D, out_proj."""
    __module__ = "mamba_ssm.modules.mamba_simple"

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
    __module__ = "mamba_ssm.modules.mamba2"

    def __init__(self, d_model=16, d_state=8, expand=2, headdim=8, ngroups=2, d_ssm=None, bias=False,
                 dt_limit=(0.0, float("inf"))):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        self.d_state, self.ngroups, self.nheads, self.dt_limit = d_state, ngroups, self.d_ssm // headdim, dt_limit
        self.headdim = headdim
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
    __module__ = "mamba_ssm.models.mixer_seq_simple"

    def __init__(self, n_layer=4, attn_layer_idx=(2,), layer=Mamba2):
        super().__init__()
        block = lambda i: nn.Module()
        self.backbone = nn.Module()
        self.backbone.layers = nn.ModuleList(block(i) for i in range(n_layer))
        for i, b in enumerate(self.backbone.layers):
            b.mixer = nn.MultiheadAttention(16, 1) if i in attn_layer_idx else layer()


def test_a_class_named_as_mamba_ssms_but_from_elsewhere_is_not_taken_for_it():
    """Layouts are keyed by the library and the class name: a user's own Mamba2 is not mamba_ssm's."""
    theirs, elsewhere = Mamba2(), type("Mamba2", (nn.Module,), {"__module__": "my_project.layers"})()
    assert mimetic.layout_of(theirs) is not None and mimetic.layout_of(elsewhere) is None
    with pytest.raises(TypeError, match="no Mamba layer in Mamba2"):
        mimetic_init_(elsewhere)


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


def test_an_impossible_mamba_ssm_head_layout_is_a_clear_error():
    layer = Mamba2(ngroups=1)
    layer.headdim = 4  # its 4 heads of 4 channels cannot fill d_ssm = 32
    with pytest.raises(ValueError, match="^Mamba2 has 4 heads × head_dim 4 for d_inner 32 and 1 groups"):
        mimetic_init_(layer)


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
def test_from_the_checkout_transformers_finds_its_own_kernels_package_and_train_py_fine_tunes(tmp_path):
    """Python started in the checkout has it first on sys.path, so no module of ours may shadow a package that
    transformers imports: Hugging Face's `kernels`, a dependency of transformers ≥ 5.25 (where it is installed,
    `import kernels` must find it, not a file of ours)."""
    hf_model(1).save_pretrained(tmp_path / "tiny")
    code = ("import importlib.util, os; spec = importlib.util.find_spec('kernels'); "
            "assert spec is None or not spec.origin.startswith(os.getcwd()), spec.origin; "
            "import transformers.models.mamba.modeling_mamba, transformers.models.mamba2.modeling_mamba2; "
            "print('ok', spec is not None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "train.py", "--pretrained", str(tmp_path / "tiny"), "--vocab-size", "4",
                          "--train-len", "4", "--steps", "3", "--eval-every", "3", "--batch-size", "4",
                          "--eval-batches", "1", "--threads", "1", "--out", str(run)], cwd=HERE,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0 and (run / "done").exists(), out.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 3]

@pytest.mark.long
def test_train_py_pretrained_maps_read_each_blocks_true_input(tmp_path):
    import train
    from experiments import figures, pipeline
    hf_model(1, num_hidden_layers=3).save_pretrained(tmp_path)
    args = train.build_parser().parse_args(["--pretrained", str(tmp_path), "--vocab-size", "4"])
    c = train.resolve_config(vars(args))
    model, inputs = pipeline.Pretrained(c), train.example_inputs(c)
    true = true_mixer_inputs(model.model, model.ids[inputs])
    for (amap, mask), block, h in zip(figures.attention_panels(model, inputs), model.layers, true, strict=True):
        assert torch.equal(torch.from_numpy(amap), attention_map(block.mixer, h)[0].detach())
        assert torch.equal(torch.from_numpy(mask), mimetic.attention_mask(block.mixer, h)[0].detach())


@pytest.mark.long
def test_train_py_fine_tunes_a_saved_model_and_trains_a_student_of_one_of_its_layers(tmp_path, capsys):
    import train
    from experiments import pipeline, sweep
    teacher = tmp_path / "teacher"
    hf_model(1).save_pretrained(teacher)  # no tokenizer saved: task tokens are the model's ids 0, 1, ...
    tiny = ["--pretrained", str(teacher), "--vocab-size", "4", "--train-len", "4", "--steps", "4", "--eval-every", "2",
            "--batch-size", "8", "--eval-batches", "1", "--threads", "1", "--device", "cpu"]
    for name, extra in (("finetune", []), ("mimetic", ["--mimetic"]), ("student", ["--teacher-layer", "1",
                                                                                    "--n-layers", "3"])):
        train.main([*tiny, *extra, "--out", str(tmp_path / name)])
        for output in ("done", "attention_init.png", "attention_final.png", "checkpoint.pt", "report_final.json"):
            assert (tmp_path / name / output).exists(), (name, output)
    report = json.loads((tmp_path / "mimetic" / "report_init.json").read_text())
    assert [r["layer"] for r in report] == [0, 1] and all(abs(r["delta"] - 1) < 1e-6 for r in report)
    c = train.resolve_config({**vars(train.build_parser().parse_args(tiny)), "teacher_layer": 1, "n_layers": 3})
    student, source = pipeline.Pretrained(c), hf_model(1).backbone.layers[1]
    assert len(student.layers) == 3 and all(torch.equal(block.mixer.in_proj.weight, source.mixer.in_proj.weight)
                                            for block in student.layers)
    mimetic_model = train.build_model(dataclasses.replace(c, teacher_layer=None, mimetic=True))
    assert all(hasattr(block.mixer, "parametrizations") for block in mimetic_model.layers)
    capsys.readouterr()
    sweep.main(["eval", str(tmp_path / "mimetic"), "--lens", "6"])  # rebuilt from the folder, then loaded
    assert "6 |" in capsys.readouterr().out
