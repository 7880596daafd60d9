"""mimetic_init_ and the attention maps on the Mamba models people train: Hugging Face transformers'
(MambaForCausalLM, Mamba2ForCausalLM and their mixers) and mamba_ssm's (Mamba, Mamba2, MambaLMHeadModel: its real
classes from its pinned sdist, their forward passes on CPU through mamba_ssm's own reference functions; a GPU-only
test for its fused kernels)."""
import copy
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mimetic
from conftest import HERE, copy_steps, rel_err
from mimetic import (SOFTPLUS_INV_1, attention_map, attention_mask, attention_matrix, bake_mimetic_A_, format_report,
                     make_batch, mimetic_init_, mimetic_report, mixer_inputs)

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
# mamba_ssm's real Mamba, Mamba2 and MambaLMHeadModel: their Python source from the pinned sdist; their forward
# passes on CPU, where its fused CUDA and Triton ops are replaced by mamba_ssm's own reference functions

MAMBA_SSM = "2.3.2.post1"  # the version these tests ran with
MAMBA_SSM_SHA256 = "104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028"  # of its sdist on PyPI


def download_mamba_ssm_sdist(to):
    """pip downloads the sdist and runs its setup.py for the metadata: that imports torch, setuptools (torch 2.13
    requires it) and wheel (setuptools >= 71 carries it), and compiles nothing with MAMBA_SKIP_CUDA_BUILD. Failing
    to get it is a skip (CI has the package index; a machine without a network skips), a different file a failure."""
    with tempfile.TemporaryDirectory(dir=to.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                   "--no-binary", "mamba-ssm", "--timeout", "20", "--retries", "1", "--dest", tmp,
                   f"mamba-ssm=={MAMBA_SSM}"]
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "MAMBA_SKIP_CUDA_BUILD": "TRUE", "PIP_NO_INPUT": "1"})
        except subprocess.TimeoutExpired:
            pytest.skip(f"cannot download mamba-ssm {MAMBA_SSM}'s sdist: pip took over 300 s (no network?)")
        got = Path(tmp, f"mamba_ssm-{MAMBA_SSM}.tar.gz")
        if out.returncode or not got.exists():
            said = [line for line in out.stderr.splitlines() if "error" in line.lower()] or out.stderr.splitlines()
            pytest.skip(f"cannot download mamba-ssm {MAMBA_SSM}'s sdist (no network?): pip: {said[-1] if said else ''}")
        digest = hashlib.sha256(got.read_bytes()).hexdigest()
        if digest != MAMBA_SSM_SHA256:
            pytest.fail(f"mamba_ssm-{MAMBA_SSM}.tar.gz has sha256 {digest}, not the pinned {MAMBA_SSM_SHA256}")
        os.replace(got, to)


def extract_mamba_ssm(sdist, to):
    """Only its package folder, mamba_ssm/ (not its setup.py or tests/), into `to`."""
    top = f"mamba_ssm-{MAMBA_SSM}/"
    with tempfile.TemporaryDirectory(dir=to.parent) as tmp, tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(top + "mamba_ssm/")]
        tar.extractall(tmp, members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        try:
            os.replace(Path(tmp, top), to)
        except OSError:  # another run extracted it first
            assert (to / "mamba_ssm" / "__init__.py").exists()


@pytest.fixture(scope="module")
def mamba_ssm(request, tmp_path_factory):
    """mamba_ssm 2.3.2.post1's Python source, downloaded once into pytest's cache folder (.pytest_cache/d/mamba_ssm/,
    reused across runs), imported from there. 2.3.2 imports its compiled CUDA scan, selective_scan_cuda, unguarded:
    where that is not installed, an empty stand-in takes its place (mamba_cpu then stands in for what calls it).
    Skips with the reason when einops is missing or the sdist cannot be downloaded. Module scope: after this file,
    mamba_ssm and the stand-in leave sys.modules (transformers imports mamba_ssm's kernels where it finds them)."""
    pytest.importorskip("einops", reason="mamba_ssm imports einops: pip install -e '.[test]'")
    cache = Path(request.config.cache.mkdir("mamba_ssm") if request.config.cache else tmp_path_factory.mktemp("m"))
    source, sdist = cache / f"src-{MAMBA_SSM}", cache / f"mamba_ssm-{MAMBA_SSM}.tar.gz"
    if not (source / "mamba_ssm" / "__init__.py").exists():
        if not sdist.exists():
            download_mamba_ssm_sdist(sdist)
        extract_mamba_ssm(sdist, source)
    before = set(sys.modules)
    try:
        if importlib.util.find_spec("selective_scan_cuda") is None:
            stand_in = types.ModuleType("selective_scan_cuda", "a stand-in: mamba_ssm's compiled scan is not installed")
            stand_in.STAND_IN = True
            sys.modules["selective_scan_cuda"] = stand_in
        sys.path.insert(0, str(source))
        try:
            import mamba_ssm
            from mamba_ssm.models import mixer_seq_simple
            from mamba_ssm.models.config_mamba import MambaConfig
            from mamba_ssm.modules import block, mamba2, mamba_simple, ssd_minimal
            from mamba_ssm.ops import selective_scan_interface
            from mamba_ssm.ops.triton import layer_norm, layernorm_gated, ssd_combined
        finally:
            sys.path.remove(str(source))  # mamba_ssm's own imports go through its package's __path__
        if mamba_ssm.__version__ != MAMBA_SSM or not mamba_ssm.__file__.startswith(str(source)):
            pytest.skip(f"mamba_ssm {mamba_ssm.__version__} from {mamba_ssm.__file__} was imported before ours")
        yield types.SimpleNamespace(mamba_ssm=mamba_ssm, MambaConfig=MambaConfig, mixer_seq_simple=mixer_seq_simple,
                                    block=block, mamba2=mamba2, mamba_simple=mamba_simple, ssd_minimal=ssd_minimal,
                                    selective_scan_interface=selective_scan_interface, layer_norm=layer_norm,
                                    layernorm_gated=layernorm_gated, ssd_combined=ssd_combined)
    finally:
        for name in set(sys.modules) - before:
            if name == "selective_scan_cuda" or name.partition(".")[0] == "mamba_ssm":
                del sys.modules[name]


@pytest.fixture
def mamba_cpu(mamba_ssm, monkeypatch):
    """mamba_ssm's forward passes on CPU: each fused CUDA or Triton op its layers call is replaced by mamba_ssm's own
    reference function for it. Returns what they hand these ops: .scans, the arguments (by name) and the output of
    each scan, .norms, those of each gated RMSNorm, in call order.

      Mamba           selective_scan_fn (CUDA)             → selective_scan_ref
      Mamba2          mamba_chunk_scan_combined (Triton)   → ssd_selective_scan, its reference (on selective_scan_ref)
                      its gated RMSNorm, rmsnorm_fn        → layernorm_gated.rms_norm_ref
      Block, the LM   the fused add + norm, layer_norm_fn  → layer_norm.rms_norm_ref (or layer_norm_ref)

    Mamba2 must be built with use_mem_eff_path=False: its unfused path (conv1d, scan, gated norm: the one it takes
    when decoding) runs here; its fused path is one CUDA op from in_proj's output to out_proj's, with no reference
    that covers d_ssm < d_inner, and it needs the causal_conv1d package. Mamba 1's path is the one it takes without
    causal_conv1d."""
    ms, seen = mamba_ssm, types.SimpleNamespace(scans=[], norms=[])

    def spying(reference, log):
        signature = inspect.signature(reference)

        def spy(*args, **kwargs):
            out = reference(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            log.append(dict(bound.arguments, out=out))
            return out
        return spy

    def chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                   cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
                   return_varlen_states=False):  # mamba_chunk_scan_combined's signature
        assert initial_states is seq_idx is cu_seqlens is None and not (return_final_states or return_varlen_states)
        return ms.ssd_combined.ssd_selective_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                                  dt_limit=dt_limit)

    def add_norm(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
                 is_rms_norm=False):  # layer_norm_fn's, as Block and MixerModel call it
        out = (ms.layer_norm.rms_norm_ref if is_rms_norm else ms.layer_norm.layer_norm_ref)(
            x, weight, bias, residual=residual, eps=eps, prenorm=prenorm, upcast=True)
        return (out[0].to(x.dtype), out[1].float() if residual_in_fp32 else out[1]) if prenorm else out.to(x.dtype)

    monkeypatch.setattr(ms.mamba_simple, "selective_scan_fn", spying(ms.selective_scan_interface.selective_scan_ref,
                                                                     seen.scans))
    monkeypatch.setattr(ms.selective_scan_interface, "selective_scan_fn",  # what ssd_selective_scan calls
                        ms.selective_scan_interface.selective_scan_ref)
    monkeypatch.setattr(ms.mamba2, "mamba_chunk_scan_combined", spying(chunk_scan, seen.scans))
    monkeypatch.setattr(ms.layernorm_gated, "rmsnorm_fn", spying(ms.layernorm_gated.rms_norm_ref, seen.norms))
    monkeypatch.setattr(ms.block, "layer_norm_fn", add_norm)
    monkeypatch.setattr(ms.mixer_seq_simple, "layer_norm_fn", add_norm)
    return seen


def ssm_layer(ms, version, d_model=16, **kwargs):
    """A mamba_ssm Mamba or Mamba2 (4 heads of 8, 2 groups) as small as these tests need."""
    if version == 1:
        return ms.mamba_ssm.Mamba(d_model, **{"d_state": 8, **kwargs})
    return ms.mamba_ssm.Mamba2(d_model, **{"d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8,
                                           "use_mem_eff_path": False, **kwargs})


def mamba_ssm_lm(ms, version, seed=0, n_layer=2, ssm=None, **config):
    """A mamba_ssm MambaLMHeadModel with its default blocks (RMSNorm, fused add + norm, fp32 residual)."""
    torch.manual_seed(seed)
    ssm_cfg = dict(d_state=8) if version == 1 else dict(layer="Mamba2", d_state=8, headdim=8, ngroups=2,
                                                          chunk_size=8, use_mem_eff_path=False)
    config = ms.MambaConfig(d_model=16, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg={**ssm_cfg, **(ssm or {})},
                            pad_vocab_size_multiple=1, **config)
    return ms.mamba_ssm.MambaLMHeadModel(config, device="cpu")


def mamba_ssm_true_mixer_inputs(model, ids):
    """What each block's mixer reads, by running mamba_ssm's blocks one at a time: RMSNorm(hidden + residual)."""
    h, residual, inputs = model.backbone.embedding(ids), None, []
    for block in model.backbone.layers:
        x = h if residual is None else h + residual
        inputs.append(x * torch.rsqrt(x.square().mean(-1, keepdim=True) + block.norm.eps) * block.norm.weight)
        h, residual = block(h, residual)
    return inputs


@pytest.mark.long
def test_mamba_ssm_is_the_pinned_source_and_two_of_its_references_of_the_mamba2_scan_agree(mamba_ssm, mamba_cpu):
    """mamba_cpu's Mamba 2 scan (ssd_selective_scan: recurrent) against mamba_ssm's chunked SSD (ssd_minimal_discrete,
    the Mamba 2 paper's listing): two independent references of one scan give the same output."""
    ms = mamba_ssm
    assert ms.mamba_ssm.__version__ == MAMBA_SSM and ms.mamba_ssm.Mamba2.__module__ == "mamba_ssm.modules.mamba2"
    torch.manual_seed(0)
    b, L, H, P, G, N = 2, 16, 4, 8, 2, 8
    x, dt, B, C = torch.randn(b, L, H, P), torch.randn(b, L, H), torch.randn(b, L, G, N), torch.randn(b, L, G, N)
    A, dt_bias = -4 * torch.rand(H), torch.randn(H)
    y = ms.mamba2.mamba_chunk_scan_combined(x, dt, A, B, C, 8, dt_bias=dt_bias, dt_softplus=True)
    delta, per_head = F.softplus(dt + dt_bias), lambda t: t.repeat_interleave(H // G, dim=2)
    want, _ = ms.ssd_minimal.ssd_minimal_discrete(x * delta[..., None], A * delta, per_head(B), per_head(C), 4)
    assert len(mamba_cpu.scans) == 1 and rel_err(y, want) < 1e-5


@pytest.mark.long
@pytest.mark.parametrize("version", [1, 2])
def test_inside_mamba_ssms_own_forward_the_layer_is_mimetic(version, mamba_ssm, mamba_cpu):
    """What MambaLMHeadModel's layers hand their scans: A = −exp(−c · A_log), Δ = 1 exactly; W_C = ½(W_C′ + W_B) per
    group, identity conv for Mamba 2 only; and the gradient reaches the raw A_log through its forward."""
    model = mamba_ssm_lm(mamba_ssm, version)
    mixers = [block.mixer for block in model.backbone.layers]
    A_log = [m.A_log.detach().clone() for m in mixers]
    proj = [m.x_proj if version == 1 else m.in_proj for m in mixers]
    W = [p.weight.detach().clone() for p in proj]
    mimetic_init_(model, c=4.0)
    model(torch.randint(0, VOCAB, (2, 9))).logits.square().mean().backward()
    assert len(mamba_cpu.scans) == 2  # one scan per layer: the loop below checks something
    for k, seen in enumerate(mamba_cpu.scans):
        dt = seen["delta"] + seen["delta_bias"][:, None] if version == 1 else seen["dt"] + seen["dt_bias"]
        delta = F.softplus(dt)
        assert torch.equal(delta, torch.ones_like(delta))
        torch.testing.assert_close(seen["A"], -torch.exp(-4.0 * A_log[k]))
        assert mixers[k].parametrizations.A_log.original.grad.abs().sum() > 0
    R = mixers[0].dt_rank if version == 1 else 2 * 32  # x_proj: [dt (R), B, C]; in_proj: [z, x, B (2 groups), C, dt]
    rows_B, rows_C = (([slice(R, R + 8)], [slice(R + 8, R + 16)]) if version == 1 else
                      ([slice(R, R + 8), slice(R + 8, R + 16)], [slice(R + 16, R + 24), slice(R + 24, R + 32)]))
    for b, c in zip(rows_B, rows_C):
        torch.testing.assert_close(proj[0].weight[c], 0.5 * (W[0][c] + W[0][b]))
        assert torch.equal(proj[0].weight[b], W[0][b])
    conv = mixers[0].conv1d
    identity = torch.zeros_like(conv.weight)
    identity[:, 0, -1] = 1
    assert (torch.equal(conv.weight, identity) and conv.bias.abs().sum() == 0) == (version == 2)


@pytest.mark.long
@pytest.mark.parametrize("version", [1, 2])
def test_attention_matrix_times_the_ssm_input_is_mamba_ssms_ssm_output(version, mamba_ssm, mamba_cpu):
    """Eq. 8 against mamba_ssm's own scan, in its LM's second layer, at its default init and after mimetic_init_."""
    model = mamba_ssm_lm(mamba_ssm, version)
    mixer, captured = model.backbone.layers[1].mixer, {}
    mixer.register_forward_pre_hook(lambda module, args: captured.update(h=args[0]))
    for initialized in (False, True):
        if initialized:
            mimetic_init_(model)
        mamba_cpu.scans.clear()
        model(torch.randint(0, VOCAB, (2, 13)))
        seen, M = mamba_cpu.scans[1], attention_matrix(mixer, captured["h"]).detach()
        if version == 1:  # u (b, D, L); out = (M u + D u) ⊙ SiLU(z)
            u = seen["u"]
            y = (torch.einsum("bdij,bdj->bdi", M, u) + seen["D"][:, None] * u) * F.silu(seen["z"])
        else:  # x (b, L, H, P); out = M_h x_h + D_h x_h (its gate z is in the norm after the scan)
            x = seen["x"]
            y = torch.einsum("bhij,bjhp->bihp", M, x) + seen["D"][:, None] * x
        assert rel_err(y, seen["out"].detach()) < 1e-5, (initialized, rel_err(y, seen["out"].detach()))
    assert attention_map(mixer, captured["h"]).shape == attention_mask(mixer, captured["h"]).shape == (2, 13, 13)


@pytest.mark.long
@pytest.mark.parametrize("d_ssm", [None, 16])
def test_ssm_inputs_of_mamba_ssm_mamba2_are_what_its_forward_hands_its_scan_and_norm(d_ssm, mamba_ssm, mamba_cpu):
    """x, dt, B, C (2 groups) and the gate z come from their rows of in_proj (with a bias), wherever its MLP rows
    (d_ssm < d_inner) put them."""
    torch.manual_seed(0)
    layer, h = ssm_layer(mamba_ssm, 2, d_ssm=d_ssm, bias=True), torch.randn(2, 9, 16)
    layer(h)
    (scan,), (norm,) = mamba_cpu.scans, mamba_cpu.norms
    ours = dict(zip("x dt B C z".split(), mimetic.ssm_inputs(layer, h)))
    for name, theirs in (("x", scan["x"]), ("dt", scan["dt"]), ("B", scan["B"]), ("C", scan["C"]), ("z", norm["z"])):
        torch.testing.assert_close(ours[name], theirs, rtol=1e-6, atol=1e-6, msg=name)  # and the same shape
    assert ours["x"].shape == (2, 9, layer.nheads, 8) and ours["B"].shape == (2, 9, 2, 8)
    assert ours["z"].shape == (2, 9, layer.d_ssm) and layer.d_ssm == (d_ssm or 32)
    M = attention_matrix(layer, h)
    assert M.shape == (2, layer.nheads, 9, 9) and torch.equal(M.triu(1), torch.zeros_like(M))


@pytest.mark.long
def test_a_dt_limit_below_one_makes_delta_one_impossible_and_the_maps_clamp_as_mamba_ssm_does(mamba_ssm, mamba_cpu):
    torch.manual_seed(0)
    layer = ssm_layer(mamba_ssm, 2, dt_limit=(0.001, 0.1))
    before = {k: t.clone() for k, t in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"^Mamba2 clamps Δ to \(0.001, 0.1\): Δ = 1 is impossible"):
        mimetic_init_(layer)
    assert layer.state_dict().keys() == before.keys()  # A_log not parametrized
    assert all(torch.equal(t, before[k]) for k, t in layer.state_dict().items())
    mimetic_init_(layer, dt=False)
    h = torch.randn(2, 7, 16) * 100
    layer(h)
    seen = mamba_cpu.scans[0]
    unclamped = F.softplus(seen["dt"] + seen["dt_bias"])  # (b, L, H)
    assert unclamped.min() < 0.001 and unclamped.max() > 0.1  # both ends of the limit are in use
    torch.testing.assert_close(mimetic.ssm_params(layer, h)[0], unclamped.clamp(0.001, 0.1).transpose(1, 2))
    y = torch.einsum("bhij,bjhp->bihp", attention_matrix(layer, h), seen["x"]) + seen["D"][:, None] * seen["x"]
    assert rel_err(y, seen["out"].detach()) < 1e-5


@pytest.mark.long
@pytest.mark.parametrize("d_ssm", [None, 16])
def test_mamba_ssm_mamba2_rows_shift_by_its_mlp(d_ssm, mamba_ssm):
    torch.manual_seed(0)
    layer = ssm_layer(mamba_ssm, 2, d_ssm=d_ssm, bias=True)
    before = layer.in_proj.weight.detach().clone(), layer.in_proj.bias.detach().clone()
    mimetic_init_(layer)
    start = 2 * (32 - layer.d_ssm) + 2 * layer.d_ssm  # z0, x0 (its MLP), z, x
    for g in range(2):
        b, c = slice(start + 8 * g, start + 8 * g + 8), slice(start + 16 + 8 * g, start + 16 + 8 * g + 8)
        for now, was in zip((layer.in_proj.weight, layer.in_proj.bias), before):
            torch.testing.assert_close(now[c], 0.5 * (was[c] + was[b]))
            assert torch.equal(now[b], was[b])
    assert torch.equal(layer.in_proj.weight[:start], before[0][:start])  # z0, x0, z, x untouched
    assert layer.in_proj.weight[-layer.nheads:].abs().sum() == 0 and layer.in_proj.bias[-layer.nheads:].abs().sum() == 0
    assert torch.allclose(layer.dt_bias, torch.full_like(layer.dt_bias, SOFTPLUS_INV_1))


@pytest.mark.long
def test_mamba_ssm_mamba1_keeps_no_weight_decay_on_its_raw_A_log_and_no_reinit_on_its_dt_bias(mamba_ssm):
    layer = mimetic_init_(ssm_layer(mamba_ssm, 1))
    assert layer.parametrizations.A_log.original._no_weight_decay and layer.dt_proj.bias._no_reinit
    torch.testing.assert_close(layer.A_log, -8.0 * torch.log(torch.arange(1, 9.0)).repeat(32, 1))
    assert layer.dt_proj.weight.abs().sum() == 0 and layer.conv1d.weight[:, 0, :-1].abs().sum() > 0  # conv: Mamba 1 off
    assert bake_mimetic_A_(layer).A_log._no_weight_decay


@pytest.mark.long
@pytest.mark.parametrize("built, changed, message", [
    (dict(ngroups=3), {}, "4 heads × head_dim 8 for d_inner 32 and 3 groups"),
    (dict(ngroups=1), dict(headdim=4), "4 heads × head_dim 4 for d_inner 32 and 1 groups"),  # 4 × 4 cannot fill 32
])
def test_impossible_mamba_ssm_head_layouts_are_clear_errors(built, changed, message, mamba_ssm, mamba_cpu):
    layer = ssm_layer(mamba_ssm, 2, **built)
    for name, value in changed.items():
        setattr(layer, name, value)
    with pytest.raises(RuntimeError):
        layer(torch.randn(1, 8, 16))  # mamba_ssm itself cannot run it
    before = {k: t.clone() for k, t in layer.state_dict().items()}
    with pytest.raises(ValueError, match=f"^Mamba2 has {message}"):
        mimetic_init_(layer)
    assert all(torch.equal(t, before[k]) for k, t in layer.state_dict().items())
    with pytest.raises(ValueError, match=message):
        attention_map(layer, torch.randn(1, 8, 16))


@pytest.mark.long
def test_a_class_named_as_mamba_ssms_but_from_elsewhere_is_not_taken_for_it(mamba_ssm):
    """Layouts are keyed by the library and the class name: a user's own Mamba2 is not mamba_ssm's."""
    theirs, elsewhere = ssm_layer(mamba_ssm, 2), type("Mamba2", (nn.Module,), {"__module__": "my_project.layers"})()
    assert mimetic.layout_of(theirs) is not None and mimetic.layout_of(elsewhere) is None
    with pytest.raises(TypeError, match="no Mamba layer in Mamba2"):
        mimetic_init_(elsewhere)


@pytest.mark.long
def test_layers_index_mamba_ssm_blocks_attention_included(mamba_ssm):
    model = mamba_ssm_lm(mamba_ssm, 2, n_layer=4, attn_layer_idx=[2], attn_cfg=dict(num_heads=2))
    assert type(model.backbone.layers[2].mixer).__name__ == "MHA"
    mimetic_init_(model, layers=[3])
    assert [hasattr(b.mixer, "parametrizations") for b in model.backbone.layers] == [False, False, False, True]
    with pytest.raises(ValueError, match=r"layers \[2\] are not Mamba layers of this model; its .* are \[0, 1, 3\]"):
        mimetic_init_(model, layers=[2])


@pytest.mark.long
@pytest.mark.parametrize("version", [1, 2])
def test_mixer_inputs_are_each_mamba_ssm_blocks_true_input(version, mamba_ssm, mamba_cpu):
    """Its blocks add the residual and normalize in one fused op, and have an MLP after the mixer here; one is MHA."""
    model = mamba_ssm_lm(mamba_ssm, version, n_layer=4, attn_layer_idx=[2], attn_cfg=dict(num_heads=2),
                         d_intermediate=32)
    ids = torch.randint(0, VOCAB, (2, 9))
    for initialized in (False, True):
        if initialized:
            mimetic_init_(model)
        true, seen = mamba_ssm_true_mixer_inputs(model, ids), mixer_inputs(model, ids)
        assert list(seen) == [0, 1, 2, 3]
        for k in range(4):
            torch.testing.assert_close(seen[k], true[k], rtol=1e-6, atol=1e-6)
    assert sorted(mimetic.mamba_layers(model)) == [0, 1, 3]


@pytest.mark.long
@pytest.mark.parametrize("version", [1, 2])
def test_report_moves_to_the_mimetic_side_and_mamba_ssms_own_init_undoes_none_of_it(version, mamba_ssm, mamba_cpu):
    """mamba_ssm's own init, _init_weights (its models apply it when they are built), zeroes Linear biases except
    those marked _no_reinit (Mamba's dt_proj.bias) and re-draws out_proj and the embedding: A, Δ (dt_proj.bias,
    Mamba 2's dt_bias), W_B, W_C and the conv stay mimetic, unlike after transformers' init."""
    model = mamba_ssm_lm(mamba_ssm, version)
    ids = torch.randint(0, VOCAB, (2, 48))
    default = mimetic_report(model, ids)
    mimetic_init_(model)
    mimetic, no_ids = mimetic_report(model, ids), mimetic_report(model)
    for d, m, n in zip(default, mimetic, no_ids, strict=True):
        assert d["delta"] < 0.2 and abs(m["delta"] - 1) < 1e-6 and m["delta_std"] < 1e-6
        assert n["delta"] == pytest.approx(1) and n["delta_std"] == 0
        assert abs(d["bc_cos"]) < 0.3 and 0.55 < m["bc_cos"] < 0.85 and n["bc_cos"] == m["bc_cos"]
        assert m["mask"] > d["mask"] + 0.05 and n["mask"] is None and m["A_bar"] > 0.8
        assert d["conv_err"] > 0.5 and (m["conv_err"] == 0) == (version == 2)
    out_proj = model.backbone.layers[0].mixer.out_proj.weight.detach().clone()
    model.apply(functools.partial(mamba_ssm.mixer_seq_simple._init_weights, n_layer=2))
    assert not torch.equal(model.backbone.layers[0].mixer.out_proj.weight, out_proj)  # it did run
    assert mimetic_report(model, ids) == mimetic
    table = format_report(no_ids).splitlines()
    assert len(table) == 3 and table[0].split()[:3] == ["layer", "mask", "∏Ā"] and table[1].split()[:2] == ["0", "-"]


@pytest.mark.long
@pytest.mark.parametrize("version", [1, 2])
def test_mamba_ssm_state_dicts_round_trip_and_baking_gives_a_plain_model(version, mamba_ssm, mamba_cpu):
    model = mimetic_init_(mamba_ssm_lm(mamba_ssm, version), c=2.0)
    ids = torch.randint(0, VOCAB, (2, 11))
    want = model(ids).logits.detach()
    keys = set(model.state_dict())
    assert "backbone.layers.0.mixer.parametrizations.A_log.original" in keys
    assert "backbone.layers.0.mixer.parametrizations.A_log.0.c" in keys and "backbone.layers.0.mixer.A_log" not in keys
    again = mimetic_init_(copy.deepcopy(model), c=2.0)  # a second mimetic_init_ changes nothing
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in again.state_dict().items())
    twin = mimetic_init_(mamba_ssm_lm(mamba_ssm, version, seed=1))  # the same mimetic_init_: its state dict loads
    twin.load_state_dict(model.state_dict())
    assert torch.equal(twin(ids).logits, want)
    with pytest.raises(RuntimeError, match="A_log"):
        mamba_ssm_lm(mamba_ssm, version).load_state_dict(model.state_dict())  # an unmodified model cannot take it
    bake_mimetic_A_(model)
    assert torch.allclose(model(ids).logits, want, atol=1e-6, rtol=0)  # the same A, written into A_log
    assert model.backbone.layers[0].mixer.A_log._no_weight_decay
    plain = mamba_ssm_lm(mamba_ssm, version, seed=2)
    plain.load_state_dict(model.state_dict())  # strict
    assert torch.allclose(plain(ids).logits, want, atol=1e-6, rtol=0)


@pytest.mark.long
@pytest.mark.parametrize("version, groups", [(1, 1), (2, 1), (2, 2)])
def test_our_blocks_with_mamba_ssms_weights_are_the_same_layer(version, groups, mamba_ssm, mamba_cpu):
    """Output and input gradient of mamba_ssm's layer (on its references, fp32) and of ours with its weights (strict:
    the same names, shapes and row layouts), at its init and mimetic (baked). test_gpu_real_mamba_ssm_modules
    compares with its fused kernels."""
    torch.manual_seed(0)
    theirs = ssm_layer(mamba_ssm, version, **({"ngroups": groups} if version == 2 else {}))
    ours = (mimetic.Mamba1(16, d_state=8) if version == 1 else
            mimetic.Mamba2(16, d_state=8, headdim=8, ngroups=groups, chunk_size=8))
    for initialized in (False, True):
        if initialized:
            bake_mimetic_A_(mimetic_init_(theirs))
        ours.load_state_dict(theirs.state_dict())
        h = torch.randn(2, 19, 16, requires_grad=True)
        outputs = []
        for layer in (theirs, ours):
            out = layer(h)
            grad, = torch.autograd.grad(out.square().sum(), h)
            outputs.append((out, grad))
        assert rel_err(outputs[1][0], outputs[0][0]) < 1e-5 and rel_err(outputs[1][1], outputs[0][1]) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mamba_ssm's modules run on CUDA")
def test_gpu_real_mamba_ssm_modules():
    """With mamba_ssm installed (its compiled CUDA scan and causal_conv1d): its fused kernels, not its references."""
    if getattr(sys.modules.get("selective_scan_cuda"), "STAND_IN", False):
        pytest.skip("mamba_ssm's compiled selective_scan_cuda is not installed (the mamba_ssm fixture's stand-in)")
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
