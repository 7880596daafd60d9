"""train.py — train Mamba, hybrids and attention baselines on the recall tasks, with or without mimetic init.

    python train.py --task copy --mimetic              # the main job: about 2 minutes on a 2-core CPU
    python train.py --task copy                        # the same model with the default init, for contrast
    python train.py --preset fig1 --scale cpu --sweep  # a paper setup at the main job's size: configs × seeds
    python train.py --preset fig1 --dry-run            # every run of the paper-sized grid and its size; no training
    torchrun --nproc_per_node 2 train.py --preset fig1 --scale cpu --sweep   # the sweep shared by 2 processes
    python train.py eval runs/RUN --lens 32,64,128     # a finished run at new lengths, and its attention maps
    python train.py plot runs/A runs/B --out cmp.png   # overlay runs (mean ± std over the seeds a folder holds)

A run folder gets config.json, metrics.jsonl / metrics.csv (one row per eval), checkpoint.pt (every
--checkpoint-every steps and at the end), accuracy.png (dotted: train length, solid: longer),
attention_init.png / attention_final.png (each layer's average attention map and mask ∏Ā, §2 of
Trockman et al. 2024) and report_init.json / report_final.json (how mimetic each Mamba layer is:
mimetic_report on the maps' example, also printed). The same command again resumes an unfinished run from
its last checkpoint, and a sweep skips finished runs. Ctrl-C (or SIGTERM) stops at the next step boundary
and writes it all; a loss that turns NaN or Inf marks the run failed.

The defaults are the CPU main job: a 2-layer Mamba 2 (d_model 64, N 128) copying strings of 2–16 of 64
tokens for 4000 steps, evaluated at lengths 16, 32 and 64. --preset NAME sets the paper's setups (§3–§5),
at the paper's size (--scale paper, for a GPU; values the paper leaves open come from the training
pipeline it names, Jelassi et al.'s transformers_ssm_copy, or from zoology for MQAR) or at the main job's
(--scale cpu); `--preset NAME --dry-run` lists a grid's runs and their sizes, and the comments beside the
preset definitions below name each value's source.
"""
import argparse
import copy
import datetime
import json
import math
import os
import signal
import string
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (read once, as torch loads): with spinning, a step on 2 threads
# while another process keeps one core busy was 16-40× slower than on 1 (bench.py --only threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
import torch.nn as nn
import torch.nn.functional as F

import figures
import mimetic
from mimetic import (COPY_TASKS, LM, TASK_VOCAB, TASKS, ModelConfig, evaluate, format_report, make_batch,
                     mimetic_init_, mimetic_report, task_vocab_size)

PARTS = ("A", "dt", "bc", "conv")
ARCHS = ("mamba1", "mamba2", "attention", "linear")


# ----------------------------------------------------------------------------------------------------
# The paper's setups. Beside each value: where it comes from.

PAPER_COPY = dict(  # the copying pipeline at the paper's size (Jelassi et al.'s transformers_ssm_copy)
    task="copy", vocab_size=26,         # pipeline: main.py --vocab_size 26 (the letters a-z)
    d_model=1024,                       # §3 Fig. 3 "hidden size 1024 as in Jelassi et al."; main.py --hidden_size
    train_len=50, min_train_len=5,      # §3 "copy 50-character strings"; main.py --min_train_len 5
    pack=220, batch_size=8,             # pipeline: examples packed into --context_len 220, --train_batch_size 8
    steps=5000,                         # §5 "All trials are for 5000 steps unless otherwise noted"
    lrs=[1e-3, 5e-4, 1e-4],             # §8 "We swept learning rates over {0.001, 0.0005, 0.0001}"
    seeds=[0, 1, 2, 3, 4],              # §5 "Error bars are computed over five seeds"
    c=8.0,                              # §3 "We choose c from {2,4,8}"; Fig. 3 "we fix c = 8"
    weight_decay=0.1, weight_decay_on="all", beta2=0.999,  # pipeline: train_utils.py AdamW(..., weight_decay=0.1)
    schedule="linear", warmup=100, grad_clip=1.0,          # pipeline: get_scheduler("linear", 100 warmup), clip 1.0
    eval_batches=4,                     # our choice: 256 examples per length (the pipeline evaluates 24)
)
PAPER_MQAR = dict(  # MQAR at the paper's size: zoology, which §8 names for it
    task="mqar", vocab_size=8192,       # zoology: VOCAB_SIZE = 8_192
    mqar_tokens_per_pair=16,            # zoology: (64, 4), (128, 8), (256, 16) tokens and pairs
    pack=0, min_train_len=None, batch_size=64,  # our choice: one fixed length per run, as zoology trains
    schedule="cosine",                  # zoology: cosine schedule
)
CPU = dict(  # the README's main job: the train.py defaults
    task="copy", vocab_size=64, d_model=64, train_len=16, min_train_len=2, pack=0, batch_size=32, steps=4000,
    lrs=[3e-3], seeds=[0, 1, 2], c=8.0, weight_decay=0.1, weight_decay_on="matrices", beta2=0.95,
    schedule="cosine", warmup=100, grad_clip=1.0, eval_batches=4)
CPU_MQAR = dict(task="mqar", vocab_size=128, train_len=8, min_train_len=None, mqar_tokens_per_pair=6)
MAMBA1 = dict(arch="mamba1", d_state=32)  # §5 "For all Mamba 1 experiments, we use state size 32"
MAMBA2 = dict(arch="mamba2", d_state=128, headdim=64)  # §5 "state size 128 unless otherwise noted", "head dimension 64"
MAMBA2_CPU = dict(arch="mamba2", d_state=128, headdim=32)  # the main job's Mamba 2


def presets(scale):
    """{name: (description, shared flags, {config name: flags})} at `scale`, "paper" or "cpu"."""
    paper = scale == "paper"
    base, m1, m2 = (PAPER_COPY, MAMBA1, MAMBA2) if paper else (CPU, MAMBA1, MAMBA2_CPU)
    # MQAR's "training length (50)" (Fig. 4's caption, one for all its tasks) counts tokens, as §5's "baseline
    # breaks down around 900-long strings" does: at zoology's 16 tokens per pair that is 3 pairs in 48 tokens,
    # evaluated at 6 and 12 (not 50 pairs: 800 tokens, near §5's breakdown). Our reading; the paper gives no pairs.
    mqar = {**PAPER_MQAR, "train_len": 3} if paper else CPU_MQAR
    depth, target = (8, 3) if paper else (2, 1)  # §4 "just one layer ... (Layer 4) of an 8-layer Mamba"; 0-based
    hybrid = lambda letter: "M" * target + letter + "M" * (depth - target - 1)  # e.g. MMMAMMMM
    one = dict(mimetic=True, mimetic_layers=[target])
    inits = {"default": {}, f"mimetic_l{target}": one, "hybrid": dict(pattern=hybrid("A"))}
    long_eval = dict(eval_lens=[50, 100, 150, 200, 250, 300, 400, 500] if paper else [16, 24, 32, 48, 64, 96, 128])
    return {
        "fig1": ("Fig. 1: §4 'mimetic initialization allows a small 4-layer Mamba to learn to copy strings with "
                 "twice the training length'; Mamba 1 and 2, default vs mimetic on every layer",
                 {**base, "n_layers": 4 if paper else 2},
                 {"mamba1_default": m1, "mamba1_mimetic": {**m1, "mimetic": True},
                  "mamba2_default": m2, "mamba2_mimetic": {**m2, "mimetic": True}}),
        "fig2": (f"Fig. 2 and §4: a {depth}-layer Mamba 2 with softmax attention as layer {target + 1}, vs mimetic "
                 "init of that layer only ('one mimetic init is all you need?'), vs default",
                 {**base, **m2, "n_layers": depth}, inits),
        "ablation": ("Fig. 3: the 16 on/off combinations of A, Δ, W_CᵀW_B and conv for Mamba 1 and 2; "
                     + ("'a 24-layer Mamba with hidden size 1024', strings of 50, evaluated at 100 and 300, 10 seeds"
                        if paper else "2000 steps, evaluated at 2× and 6× as the paper's 100 and 300")
                     + "; add --cs 2,4,8 to sweep c as §3 did",
                     {**base, "n_layers": 24, "eval_lens": [50, 100, 300], "seeds": list(range(10))} if paper else
                     {**base, "steps": 2000, "eval_lens": [16, 32, 96]},
                     {f"{arch}_{'+'.join(parts) or 'none'}": {**flags, "mimetic_parts": list(parts)}
                      for arch, flags in (("mamba1", m1), ("mamba2", m2)) for parts in _subsets(PARTS)}),
        "tasks": (f"Fig. 4: stack-order copy, MQAR and sorting (vocab 512, no repeats), {depth}-layer Mamba 2: "
                  f"default, mimetic init of layer {target + 1} only, the attention hybrid, and (ours, extra) "
                  "mimetic init of every layer",
                  {**base, **m2, "n_layers": depth},
                  {f"{task}_{init}": {**flags, **init_flags}
                   for task, flags in (("stack", dict(task="stack")), ("sort", dict(task="sort", vocab_size=512)),
                                       ("mqar", mqar))
                   for init, init_flags in {**inits, "mimetic_all": dict(mimetic=True)}.items()}),
        "linattn": (f"Fig. 5: layer {target + 1} of a {depth}-layer Mamba 2 (the others default, N = 128) is "
                    "causal linear attention with head dim 8 / 32 / 1024, or mimetic Mamba 2 with N = 32 / 64. "
                    "Mamba 2 because Mamba 1 always has N = 32 (§5) and this figure varies N; the configs differ "
                    "in that one layer only",
                    {**base, **m2, "n_layers": depth, "eval_lens": [50, 100, 200] if paper else [16, 32, 64]},
                    {**{f"linear{k}": dict(pattern=hybrid("L"), linear_head_dim=k) for k in (8, 32, 1024)},
                     **{f"mamba_N{n}_mimetic_l{target}": {**one, "layer_d_state": {target: n}} for n in (32, 64)}}),
        "vocab": ("Fig. 6: vocabulary size, Mamba 1 and 2, default vs mimetic (the paper does not list its "
                  "vocabularies: ours, from the pipeline's 26 up)", {**base, "n_layers": 4 if paper else 2},
                  {f"{arch}_V{v}_{init}": {**flags, "vocab_size": v, **({"mimetic": True} if init == "mimetic" else {})}
                   for arch, flags in (("mamba1", m1), ("mamba2", m2)) for v in ((26, 128, 512, 2048) if paper
                                                                                 else (16, 64, 256, 1024))
                   for init in ("default", "mimetic")}),
        "statesize": ("Fig. 7: Mamba 2 state size N = 16 … 512, default vs mimetic, evaluated over a range of "
                      "lengths for the area under accuracy vs length and the longest length above 99%",
                      {**base, **m2, "n_layers": 4 if paper else 2, **long_eval},
                      {f"N{n}_{init}": {"d_state": n, **({"mimetic": True} if init == "mimetic" else {})}
                       for n in (16, 32, 64, 128, 256, 512) for init in ("default", "mimetic")}),
        "size": ("Fig. 8: width × depth on copy (Mamba 1 and 2) and MQAR (Mamba 2), default vs mimetic ('a mere two "
                 "layers seems to be sufficient'); the paper does not list its sizes: ours"
                 + ("" if paper else "; at cpu scale a cross of widths at depth 2 and depths at width 64"), base,
                 {f"{task}_{arch}_d{d}_L{n}_{init}": {**flags, **task_flags, "d_model": d, "n_layers": n,
                                                      **({"mimetic": True} if init == "mimetic" else {})}
                  for task, arch, flags, task_flags in (("copy", "mamba1", m1, {}), ("copy", "mamba2", m2, {}),
                                                         ("mqar", "mamba2", m2, mqar))
                  for d, n in ([(d, n) for d in (256, 512, 1024) for n in (2, 4, 8)] if paper else
                               [(64, 1), (64, 2), (64, 4), (32, 2), (128, 2)])
                  for init in ("default", "mimetic")}),
        "long": ("Fig. 9: a 2-layer Mamba 2 (d_model " + ("1024" if paper else "64") + ") trained on long strings "
                 "(the paper: copying ~4000, MQAR ~1800) and on MQAR with many pairs, default vs mimetic; one "
                 "example per row (the pipeline's 220-token rows cannot hold them)",
                 {**base, **m2, "n_layers": 2, "pack": 0, **({"batch_size": 8} if paper else {})},
                 {f"{task}_{n}_{init}": {**flags, "train_len": n, "eval_lens": [n, 2 * n],
                                         **({"mimetic": True} if init == "mimetic" else {})}
                  for task, flags, lengths in (("copy", {}, (500, 1000, 2000, 4000) if paper else (16, 32, 64, 128)),
                                               ("mqar", mqar if paper else {**mqar, "vocab_size": 1024},
                                                (16, 32, 64, 128) if paper else (8, 16, 32, 64)))
                  for n in lengths for init in ("default", "mimetic")}),
        "pretrained": ("§6, Fig. 10: a pretrained 130M Mamba (24 layers, d_model 768, N 16) fine-tuned to copy and "
                       "for MQAR, vs the same size trained from scratch with mimetic init; needs the model hub. "
                       "MQAR: 8 pairs in 48 tokens of a-z, A-Z, 0-9 (ours; the paper: '50-character strings')",
                       base, {f"{task}_{start}": {**flags, **start_flags}
                              for task, flags in (("copy", {"vocab_size": 26}),
                                                  ("mqar", {**mqar, "vocab_size": 62, "train_len": 8,
                                                            "eval_lens": [8, 16], "mqar_tokens_per_pair": 6}))
                              for start, start_flags in (("pretrained", {"pretrained": "state-spaces/mamba-130m-hf"}),
                                                         ("scratch_mimetic", {**MAMBA1, "d_state": 16, "d_model": 768,
                                                                              "n_layers": 24, "mimetic": True}))}),
        "student": ("§6, Fig. 11: 'L=48, M=12': for each layer i of a pretrained 370M Mamba (48 layers), a student "
                    "of 12 copies of it learns to copy; needs the model hub",
                    {**base, "vocab_size": 26, "pretrained": "state-spaces/mamba-370m-hf", "n_layers": 12},
                    {f"teacher_layer{i}": {"teacher_layer": i} for i in range(48)}),
        "mamba41": ("Mamba paper §4.1: selective copying and induction heads with its 2-layer Mamba 1 (d_model 64, "
                    "N 16, 16 tokens), default init" + ("" if paper else "; sequences of 64, not 256 and 4096"),
                    {**base, **MAMBA1, "n_layers": 2, "d_model": 64, "d_state": 16, "vocab_size": 16, "pack": 0},
                    {"selective_copy": dict(task="selective_copy", min_train_len=None,
                                            train_len=4096 if paper else 64),
                     "induction": dict(task="induction", min_train_len=None, train_len=256 if paper else 64,
                                       eval_lens=[256, 1024, 4096, 16384] if paper else [64, 256, 1024])}),
    }


def _subsets(items):
    return [tuple(x for i, x in enumerate(items) if mask >> i & 1) for mask in range(2 ** len(items))]


PRESETS = presets("paper")
SCALES = ("paper", "cpu")

# ----------------------------------------------------------------------------------------------------
# Command line: (flag, default, parser, help); list flags parse once, into lists

def int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def float_list(text):
    return [float(v) for v in text.split(",") if v.strip()]


def part_list(text):
    return [p.strip() for p in text.split(",") if p.strip()]


def layer_states(text):
    """'3:32,5:64' → {3: 32, 5: 64}"""
    return {int(i): int(n) for i, n in (item.split(":") for item in text.split(",") if item.strip())}


OPTIONS = [
    ("task", "copy", str, "recall task: " + ", ".join(TASKS)),
    ("arch", "mamba2", str, "layer type of every layer: mamba1, mamba2, attention (softmax) or linear (attention)"),
    ("pattern", None, str, "one letter per layer for hybrids, M Mamba / A attention / L linear, e.g. MMMAMMMM"),
    ("mimetic", False, None, "mimetic init with the paper's parts for the arch: A, dt, bc (+ conv for mamba2)"),
    ("mimetic_parts", None, part_list, "comma-separated subset of A,dt,bc,conv to apply (implies --mimetic)"),
    ("mimetic_layers", None, int_list, "comma-separated 0-based layer indices to initialize (default: all Mamba)"),
    ("c", 8.0, float, "mimetic A reparameterization A = -exp(-c·A_log)"),
    ("cs", None, float_list, "sweep c over these values (with --sweep); default: --c"),
    ("d_model", 64, int, "model width"),
    ("n_layers", 2, int, "number of layers"),
    ("d_state", 128, int, "state size N (paper: 32 for mamba1, 128 for mamba2)"),
    ("layer_d_state", None, layer_states, "state sizes of particular layers, e.g. 1:32 (Fig. 5)"),
    ("headdim", 32, int, "mamba2 head dimension (paper: 64)"),
    ("expand", 2, int, "Mamba inner width = expand · d_model"),
    ("n_heads", 1, int, "heads of attention / linear attention layers"),
    ("linear_head_dim", 32, int, "query/key features per head of linear attention layers"),
    ("vocab_size", 64, int, "number of content tokens of the task (the LM adds the task's special tokens)"),
    ("train_len", 16, int, "task length used for training (copy: string length; mqar: key-value pairs)"),
    ("min_train_len", None, int, "draw each batch's (with --pack: each example's) length uniformly from [this, "
     "train_len] (default: 2 for copy, stack and sort, since one fixed length teaches copying by position, which "
     "fails at 2x; train_len for the other tasks)"),
    ("mqar_tokens_per_pair", 6, int, "mqar sequence length per key-value pair (zoology's configs: 16)"),
    ("pretrained", None, str, "train (fine-tune) a transformers Mamba LM, a hub id or a folder, instead of ours "
     "(§6, Fig. 10); the size flags then do not apply"),
    ("teacher_layer", None, int, "with --pretrained: a student of --n-layers copies of this teacher layer (Fig. 11)"),
    ("pack", 0, int, "Jelassi et al.'s rows: examples BOS x SEP y STOP packed into this many tokens, lengths drawn "
     "per example (their --context_len 220); 0: one example per row (copy, stack, sort only)"),
    ("eval_lens", None, int_list, "comma-separated eval lengths (default: 1×, 2× and 4× the train length)"),
    ("steps", 4000, int, "optimizer steps"),
    ("batch_size", 32, int, "training batch size (rows)"),
    ("lr", 3e-3, float, "peak learning rate"),
    ("lrs", None, float_list, "sweep the learning rate over these values (with --sweep); default: --lr"),
    ("schedule", "cosine", str, "linear warmup, then cosine (ours) or linear (Jelassi et al.'s) decay to 0"),
    ("warmup", 100, int, "warmup steps"),
    ("weight_decay", 0.1, float, "AdamW weight decay"),
    ("weight_decay_on", "matrices", str, "matrices: none on 1-D params or those marked _no_weight_decay (A_log, "
     "D, dt_bias), as mamba_ssm; all: every parameter, as Jelassi et al.'s pipeline"),
    ("beta2", 0.95, float, "AdamW β2 (β1 = 0.9; the pipeline: torch's default 0.999)"),
    ("grad_clip", 1.0, float, "gradient norm clip (0: off)"),
    ("stop_at", None, int, "pause at this step, checkpoint and exit 0, keeping --steps' schedule; the same command "
     "with a larger --stop-at, or without it, goes on (step K equals step K of a run never paused)"),
    ("eval_every", 250, int, "evaluate every this many steps (and at the end)"),
    ("eval_batches", 4, int, "batches of 64 examples per eval length"),
    ("checkpoint_every", 1000, int, "write checkpoint.pt every this many steps (and at the end)"),
    ("seed", 0, int, "random seed"),
    ("seeds", None, int_list, "comma-separated seeds (a sweep); default: --seed"),
    ("device", "auto", str, "auto, cpu or cuda (under torchrun: process k on GPU k mod the number of GPUs)"),
    ("dtype", "fp32", str, "fp32 or bf16 (bf16 autocast of the forward pass; the scans compute in fp32)"),
    ("scan_backend", "auto", str, "selective scans: auto (Triton for Mamba 1 on CUDA once a self-check passes, "
     "else PyTorch; Mamba 2's chunked PyTorch SSD), triton (both layers) or torch"),
    ("no_tf32", False, None, "CUDA: fp32 matmuls without TF32 (default: TF32 on)"),
    ("sync_every", None, int, "read the loss (a GPU sync) and check it for NaN/Inf every this many steps "
     "(default: 1 on CPU, 10 on CUDA); a diverged run stops within that many steps"),
    ("threads", None, int, "torch.set_num_threads (default: 1 for a model under 1M parameters, else the cores no "
     "other process keeps busy, under torchrun shared among the processes)"),
    ("out", None, str, "run folder (default: runs/<task>_<arch>_<init>_s<seed>, or runs/<preset>_<scale> for sweeps)"),
    ("preset", None, str, "the paper's setups (your flags override): "
     + "; ".join(f"{k}: {v[0]}" for k, v in PRESETS.items())),
    ("scale", None, str, "size of the --preset setups: paper (for a GPU; the default) or cpu (the main job's size)"),
    ("configs", None, part_list, "only these configs of the --preset (comma-separated names)"),
    ("sweep", False, None, "run every config × lr × c × seed into subfolders of --out, skipping finished runs"),
    ("dry_run", False, None, "print every run of the grid (JSON lines) and its parameter count; train nothing"),
]
CHOICES = {"task": TASKS, "arch": ARCHS, "device": ("auto", "cpu", "cuda"), "dtype": ("fp32", "bf16"),
           "scan_backend": ("auto", "triton", "torch"),
           "preset": tuple(PRESETS), "scale": SCALES, "schedule": ("cosine", "linear"),
           "weight_decay_on": ("matrices", "all")}
DEFAULTS = {name: default for name, default, _, _ in OPTIONS}
SWEEP_KEYS = ("lrs", "cs", "seeds")  # lists a run's config holds one value of (lr, c, seed)
GRID_KEYS = SWEEP_KEYS + ("out", "preset", "scale", "configs", "sweep", "dry_run")  # flags of the grid, not of one run


def build_parser(with_defaults=True):
    """The CLI; without defaults it reports only the flags the user typed (so they can override presets)."""
    head, _, tail = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=head, epilog=tail, argument_default=None if with_defaults else
                                     argparse.SUPPRESS, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default, kind, help_text in OPTIONS:
        flag, help_text = "--" + name.replace("_", "-"), help_text.replace("%", "%%")  # argparse formats help
        extra = {"default": default} if with_defaults else {}
        if kind is None:
            parser.add_argument(flag, action="store_true", help=help_text, **extra)
        else:
            parser.add_argument(flag, type=kind, choices=CHOICES.get(name), help=f"{help_text} (default: {default})",
                                **extra)
    return parser


def resolve_config(config):
    """One run's config: defaults filled in, derived fields set, combinations checked (ValueError naming the
    problem)."""
    c = {k: v for k, v in dict(DEFAULTS, **config).items() if k not in GRID_KEYS}
    if c["arch"] in ("attention", "linear"):
        c["pattern"] = c["pattern"] or ("A" if c["arch"] == "attention" else "L") * c["n_layers"]
    c["n_layers"] = len(c["pattern"]) if c["pattern"] else c["n_layers"]
    if c["mimetic_parts"] is not None:
        if bad := [p for p in c["mimetic_parts"] if p not in PARTS]:
            raise ValueError(f"unknown --mimetic-parts {bad}; choose from {','.join(PARTS)}")
        c["mimetic"] = bool(c["mimetic_parts"])
    if c["mimetic_layers"] is not None:
        c["mimetic"] = True
    if c["mimetic"] and c["pattern"] and "M" not in c["pattern"]:
        raise ValueError(f"mimetic init needs Mamba layers, but pattern {c['pattern']} has none")
    c["eval_lens"] = c["eval_lens"] or [c["train_len"], 2 * c["train_len"], 4 * c["train_len"]]
    if c["stop_at"] is not None and c["stop_at"] <= 0:
        raise ValueError(f"--stop-at must be a positive step, got {c['stop_at']}")
    for name in ("train_len", "steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every", "d_model",
                 "n_layers", "vocab_size", "mqar_tokens_per_pair", "lr"):
        if c[name] <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {c[name]}")
    if c["min_train_len"] is None:  # a range of lengths teaches copying by content, not by position
        c["min_train_len"] = min(2, c["train_len"]) if c["task"] in COPY_TASKS else c["train_len"]
    if not 0 < c["min_train_len"] <= c["train_len"]:
        raise ValueError(f"--min-train-len must be in [1, --train-len={c['train_len']}], got {c['min_train_len']}")
    if min(c["eval_lens"]) <= 0:
        raise ValueError(f"--eval-lens must be positive lengths, got {c['eval_lens']}")
    if c["pack"] and c["task"] not in COPY_TASKS:
        raise ValueError(f"--pack is Jelassi et al.'s copying pipeline: for {', '.join(COPY_TASKS)}, not {c['task']}")
    if c["pack"] and c["pack"] < 2 * c["train_len"] + 3:
        raise ValueError(f"--pack {c['pack']} cannot hold one example of length {c['train_len']} "
                         f"({2 * c['train_len'] + 3} tokens with BOS, SEP and STOP)")
    for length in {c["min_train_len"], c["train_len"], *c["eval_lens"]}:
        try:  # the task's own limits, e.g. mqar's distinct keys: fail now, not at the first eval
            make_batch(c["task"], 1, length, vocab_size=c["vocab_size"], seq_len=mqar_seq_len(c, length))
        except ValueError as e:
            raise ValueError(f"{c['task']} at length {length} with --vocab-size {c['vocab_size']}: {e}") from None
    if c["teacher_layer"] is not None and not c["pretrained"]:
        raise ValueError("--teacher-layer picks a layer of the --pretrained model; name one")
    if c["pretrained"] and c["vocab_size"] > len(CONTENT_CHARACTERS):
        raise ValueError(f"--pretrained maps content tokens to the characters a-z, A-Z, 0-9: --vocab-size "
                         f"{c['vocab_size']} > {len(CONTENT_CHARACTERS)}")
    if not c["pretrained"]:
        ModelConfig(**model_config_kwargs(c))  # the model's own checks (pattern, layer_d_state, ...)
    if c["device"] == "auto":
        c["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if c["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device found; use --device cpu or auto")
    c["sync_every"] = c["sync_every"] or (10 if c["device"].startswith("cuda") else 1)
    return c


def mqar_seq_len(c, length):
    return c["mqar_tokens_per_pair"] * length if c["task"] == "mqar" else None


def run_name(c):
    arch = f"{c['arch']}-{c['pattern']}" if c["arch"] in ("mamba1", "mamba2") and c["pattern"] else c["arch"]
    if c["pretrained"]:
        arch = f"pretrained-{Path(c['pretrained']).name}" + (f"-student{c['n_layers']}xl{c['teacher_layer']}"
                                                             if c["teacher_layer"] is not None else "")
    init = "default"
    if c["mimetic"]:
        init = "mimetic" + (f"-{'+'.join(c['mimetic_parts'])}" if c["mimetic_parts"] else "")
        init += f"-l{'+'.join(map(str, c['mimetic_layers']))}" if c["mimetic_layers"] else ""
    return f"{c['task']}_{arch}_{init}"


# ----------------------------------------------------------------------------------------------------
# Model, optimizer, schedule, batches

def model_config_kwargs(c):
    arch = c["arch"] if c["arch"] in ("mamba1", "mamba2") else "mamba1"  # no M layers: the block type is unused
    return dict(vocab_size=task_vocab_size(c["task"], c["vocab_size"]) + (1 if c["pack"] else 0),  # + BOS
                d_model=c["d_model"], n_layers=c["n_layers"], arch=arch, pattern=c["pattern"], d_state=c["d_state"],
                expand=c["expand"], headdim=c["headdim"], n_heads=c["n_heads"], linear_head_dim=c["linear_head_dim"],
                layer_d_state=c["layer_d_state"])


def build_model(c):
    """LM for the config (or --pretrained's model), mimetic-initialized as asked (conv follows the paper's
    per-arch choice unless --mimetic-parts names it)."""
    model = Pretrained(c) if c["pretrained"] else LM(ModelConfig(**model_config_kwargs(c)))
    if c["mimetic"]:
        parts = dict(A=True, dt=True, bc=True, conv=None)
        if c["mimetic_parts"]:
            parts = {p: p in c["mimetic_parts"] for p in PARTS}
        mimetic_init_(model, c=c["c"], layers=c["mimetic_layers"], **parts)
    return model


SPECIAL_CHARACTERS = {"SEP": "|", "STOP": ".", "BOS": "$", "BLANK": "_", "TRIGGER": "#"}  # the pipeline's |, ., $
CONTENT_CHARACTERS = string.ascii_lowercase + string.ascii_uppercase + string.digits  # a-z first, as the pipeline


class Pretrained(nn.Module):
    """A transformers Mamba LM from --pretrained (a hub id or a saved folder) on a task's tokens (§6, Fig. 10):
    content token i is the model's token for the i-th of a-z, A-Z, 0-9 and SEP, STOP, BOS are '|', '.', '$',
    Jelassi et al.'s characters (without a tokenizer: the model's ids 0, 1, ...); the logits are those of the
    task's tokens. With --teacher-layer i, the model is a student of --n-layers copies of the teacher's layer
    i (mixer and norm), with the teacher's embedding and final norm (§6, Fig. 11)."""

    def __init__(self, c):
        super().__init__()
        import transformers
        self.model = transformers.AutoModelForCausalLM.from_pretrained(c["pretrained"])
        if c["teacher_layer"] is not None:
            teacher = self.model.backbone.layers
            if not 0 <= c["teacher_layer"] < len(teacher):
                raise ValueError(f"--teacher-layer {c['teacher_layer']}: the teacher has {len(teacher)} layers")
            self.model.backbone.layers = nn.ModuleList(copy.deepcopy(teacher[c["teacher_layer"]])
                                                       for _ in range(c["n_layers"]))
            for i, block in enumerate(self.model.backbone.layers):
                block.layer_idx = block.mixer.layer_idx = i
            self.model.config.num_hidden_layers = c["n_layers"]
        names = [*CONTENT_CHARACTERS[:c["vocab_size"]], *(SPECIAL_CHARACTERS[n] for n in task_specials(c))]
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(c["pretrained"])
            ids = [tokenizer.convert_tokens_to_ids(name) for name in names]
        except (OSError, ValueError):  # no tokenizer saved with the model
            ids = list(range(len(names)))
        self.register_buffer("ids", torch.tensor(ids))

    @property
    def layers(self):  # blocks with .norm and .mixer, as LM's
        return self.model.backbone.layers

    def forward(self, input_ids):
        return self.model(self.ids[input_ids]).logits[..., self.ids]


def task_specials(c):
    """The names of the task's special tokens, in id order (and BOS last, with --pack)."""
    return [*TASK_VOCAB[c["task"]][1], *(["BOS"] if c["pack"] else [])]


class WithBOS(nn.Module):
    """A model trained on --pack rows reads BOS before each example: prepend it, drop its prediction."""

    def __init__(self, model, bos):
        super().__init__()
        self.model, self.bos = model, bos

    def forward(self, input_ids):
        bos = torch.full_like(input_ids[:, :1], self.bos)
        return self.model(torch.cat([bos, input_ids], dim=1))[:, 1:]


def build_optimizer(model, c):
    """AdamW (β1 0.9, β2 --beta2) with weight decay on --weight-decay-on parameters; linear warmup, then
    cosine or linear decay to 0 at --steps."""
    decay, no_decay = [], []
    for p in model.parameters():
        skip = c["weight_decay_on"] == "matrices" and (p.dim() < 2 or getattr(p, "_no_weight_decay", False))
        (no_decay if skip else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=c["lr"], betas=(0.9, c["beta2"]))

    def lr_factor(step):
        if step < c["warmup"]:
            return (step + 1) / c["warmup"]
        progress = min(1.0, (step - c["warmup"]) / max(1, c["steps"] - c["warmup"]))
        return 1 - progress if c["schedule"] == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def free_cores(sample_s=0.2):
    """The cores this process may run on (os.sched_getaffinity) that other processes are not keeping busy
    now, from the idle time in /proc/stat over sample_s seconds; at least 1. Elsewhere than Linux: all."""
    total = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total

    def idle_and_all():  # /proc/stat's first line: cpu user nice system idle iowait irq softirq steal, in ticks
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return ticks[3] + ticks[4], sum(ticks)

    try:
        (idle0, all0), _, (idle1, all1) = idle_and_all(), time.sleep(sample_s), idle_and_all()
    except OSError:
        return allowed
    busy = total * (1 - (idle1 - idle0) / max(all1 - all0, 1))
    return max(1, min(allowed, round(total - busy)))


MANY_THREADS_FROM = 10**6  # parameters: below, one thread is fastest, quiet or busy (README, Speed)


def default_threads(n_params, local_processes=1):
    """Intra-op threads without --threads. A small model gets 1: at the main job's 91k parameters 2 threads
    were 1.4× slower than 1 on a quiet machine, as its ~1000 ops per step are too small to share. A large one
    gets the free cores, shared among torchrun's processes here (paper-size fig1: 1.7× faster on 2 than on 1).
    Never torch's default (every core): when another process keeps a core busy, each op waits for the
    descheduled thread (the main job took 692 s instead of 130 s). The 1M threshold between the two measured
    sizes is our choice."""
    return 1 if n_params < MANY_THREADS_FROM else max(1, free_cores() // local_processes)


def training_batch(c, g):
    """One batch: with --pack, Jelassi et al.'s packed rows; else batch_size examples of one length drawn
    from [min_train_len, train_len]."""
    if c["pack"]:
        return packed_batch(c, g)
    length = int(torch.randint(c["min_train_len"], c["train_len"] + 1, (), generator=g))
    return make_batch(c["task"], c["batch_size"], length, vocab_size=c["vocab_size"], generator=g,
                      seq_len=mqar_seq_len(c, length))


def packed_batch(c, g):
    """Jelassi et al.'s training rows (data_utils.py): examples BOS x SEP y STOP, lengths drawn per example
    from [min_train_len, train_len], joined until the row has c["pack"] tokens; the example the row's end
    cuts is not labeled. (inputs, targets) of shape (batch_size, pack − 1)."""
    bos = task_vocab_size(c["task"], c["vocab_size"])
    rows = []
    for _ in range(c["batch_size"]):
        seq, labeled = [], []
        while len(seq) < c["pack"]:
            n = int(torch.randint(c["min_train_len"], c["train_len"] + 1, (), generator=g))
            inputs, targets = make_batch(c["task"], 1, n, vocab_size=c["vocab_size"], generator=g)
            start = len(seq)
            seq += [bos, *inputs[0].tolist(), targets[0, -1].item()]  # targets end with STOP
            labeled += [False, False, *(targets[0] != -100).tolist()]  # token t+1 is labeled where targets[t] is
        labeled[start:] = [False] * (len(seq) - start) if len(seq) > c["pack"] else labeled[start:]
        row, mask = torch.tensor(seq[:c["pack"]]), torch.tensor(labeled[:c["pack"]])
        rows.append((row[:-1], torch.where(mask[1:], row[1:], -100)))
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def evaluation_model(model, c):
    return WithBOS(model, task_vocab_size(c["task"], c["vocab_size"])) if c["pack"] else model


def evaluate_lengths(model, c, device, lens=None, task=None):
    """{length: evaluate(...)} on fixed held-out batches (seed 1) at each eval length."""
    task = task or c["task"]
    return {n: evaluate(evaluation_model(model, c), task, n, vocab_size=c["vocab_size"], n_batches=c["eval_batches"],
                        generator=torch.Generator().manual_seed(1), device=device,
                        seq_len=c["mqar_tokens_per_pair"] * n if task == "mqar" else None)
            for n in lens or c["eval_lens"]}


def example_inputs(c, length=None, seed=0, task=None):
    """The one example the attention maps show (BOS-prefixed for --pack runs): (1, T)."""
    task, length = task or c["task"], length or c["train_len"]
    inputs, _ = make_batch(task, 1, length, vocab_size=c["vocab_size"], generator=torch.Generator().manual_seed(seed),
                           seq_len=c["mqar_tokens_per_pair"] * length if task == "mqar" else None)
    bos = task_vocab_size(c["task"], c["vocab_size"])
    return torch.cat([torch.tensor([[bos]]), inputs], dim=1) if c["pack"] else inputs


# ----------------------------------------------------------------------------------------------------
# Checkpoints: written atomically; the previous one is kept until the next is safely on disk

class Diverged(RuntimeError):
    """The loss became NaN or Inf."""


def save_checkpoint(out, payload):
    tmp = out / "checkpoint.pt.tmp"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    if (out / "checkpoint.pt").exists():
        os.replace(out / "checkpoint.pt", out / "checkpoint_prev.pt")
    os.replace(tmp, out / "checkpoint.pt")


def load_checkpoint(out):
    """The newest readable checkpoint of a run folder, or None; says so when it has to fall back."""
    for name in ("checkpoint.pt", "checkpoint_prev.pt"):
        if (out / name).exists():
            try:
                return torch.load(out / name, map_location="cpu", weights_only=False)
            except Exception as e:  # a file cut short by a crash or a full disk: try the one before
                print(f"{out / name} is unreadable ({type(e).__name__}); trying the previous checkpoint", flush=True)
    return None


# may differ between the run that wrote a checkpoint and the one resuming
RUN_ONLY = ("threads", "device", "stop_at", "scan_backend", "scan_backends", "no_tf32", "sync_every")


def check_same_run(saved, c, out):
    if diff := [k for k in c if k not in RUN_ONLY and saved.get(k) != c[k]]:
        details = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} there, {c[k]} here" for k in diff[:3])
        raise ValueError(f"{out} holds a run of another config ({details}); use another --out or delete it")


# ----------------------------------------------------------------------------------------------------
# One run

class StopRequest:
    """Ctrl-C or SIGTERM (preemption) during training: finish the step, then stop. A second Ctrl-C stops at once."""

    def __enter__(self):
        self.requested, self.previous = False, {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self.request)
            except ValueError:  # not the main thread: keep the default handlers
                pass
        return self

    def request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Run:
    """One training run: the model, optimizer, schedule and batch stream of a config, its progress (step,
    running loss, times, metrics rows) and its folder, if any; resumed from the folder's last checkpoint."""

    def __init__(self, config):
        self.c, self.out = resolve_config(config), Path(config["out"]) if config.get("out") else None
        c = self.c
        self.device = torch.device(c["device"])
        if self.device.type == "cuda":
            if self.device.index is not None:
                torch.cuda.set_device(self.device)  # this process's GPU, where Triton launches and allocates
            torch.set_float32_matmul_precision("highest" if c["no_tf32"] else "high")  # high: TF32
        mimetic.kernels.SCAN_BACKEND = c["scan_backend"]
        try:  # on CUDA, "auto" checks Triton here, at the first call
            c["scan_backends"] = mimetic.kernels.backends_in_use(self.device)
        except RuntimeError as e:  # e.g. --scan-backend triton without CUDA
            raise ValueError(f"--scan-backend {c['scan_backend']}: {e}") from None
        torch.manual_seed(c["seed"])
        self.model = build_model(c).to(self.device)
        n_params = sum(p.numel() for p in self.model.parameters())
        torch.set_num_threads(c["threads"] or default_threads(n_params, distributed()[3]))
        self.opt, self.schedule = build_optimizer(self.model, c)
        self.batches = torch.Generator().manual_seed(c["seed"])
        self.prefetch = self.device.type == "cuda"  # build the next batch while the GPU works on this one
        self.prefetched, self.unread_losses = None, []
        self.progress = dict(step=0, loss_sum=0.0, loss_count=0, train_time=0.0, wall_time=0.0, tokens=0, rows=[])
        self.resumed = load_checkpoint(self.out) if self.out and not (self.out / "done").exists() else None
        if self.resumed:
            check_same_run(self.resumed["config"], c, self.out)
            self.model.load_state_dict(self.resumed["model"])
            self.opt.load_state_dict(self.resumed["optimizer"])
            self.schedule.load_state_dict(self.resumed["schedule"])
            self.batches.set_state(self.resumed["batches"])
            torch.set_rng_state(self.resumed["rng"])
            self.progress = self.resumed["run"]
        self.started = time.time()

    @property
    def step(self):
        return self.progress["step"]

    def elapsed(self):
        """Wall seconds over every process that trained this run."""
        return self.progress["wall_time"] + time.time() - self.started

    def start(self):
        """Say what trains where, write config.json and the metrics so far, and the first eval (step 0)."""
        c, out = self.c, self.out
        if self.resumed:
            print(f"resuming {out} from step {self.step}", flush=True)
        n_params = sum(p.numel() for p in self.model.parameters())
        backends = ", ".join(f"{k} {v}" for k, v in c["scan_backends"].items())
        print(f"{run_name(c)}: {n_params / 1e3:.1f}k parameters on {self.device} ({c['dtype']}; scan backends: "
              f"{backends})", flush=True)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(c, indent=2))
            for name in ("done", "failed"):
                (out / name).unlink(missing_ok=True)
            write_metrics(out, self.progress["rows"], c["eval_lens"])  # a resumed run drops rows after its checkpoint
            if not self.resumed:
                self.plot_attention("at init", "attention_init.png")
        if not self.resumed:
            self.report("at init", "report_init.json")
        if not self.progress["rows"]:
            self.log_eval()  # the init point of the accuracy curves

    def train_step(self):
        """One optimizer step on the next batch; its loss stays on the device until read_losses()."""
        c, p = self.c, self.progress
        start = time.time()
        inputs, targets = self.prefetched or (t.to(self.device) for t in training_batch(c, self.batches))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c["dtype"] == "bf16"):
            logits = self.model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if c["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c["grad_clip"])
        self.opt.step()
        self.schedule.step()
        if self.prefetch:  # a checkpoint saves the generator as it was before the prefetched batch
            self.batches_before = self.batches.get_state()
            self.prefetched = tuple(t.to(self.device) for t in training_batch(c, self.batches))
        self.unread_losses.append(loss.detach())
        p["step"], p["tokens"] = p["step"] + 1, p["tokens"] + inputs.numel()
        p["train_time"] += time.time() - start

    def read_losses(self):
        """{step: loss} of the steps since the last read: one wait for the GPU."""
        p, start = self.progress, time.time()
        values = torch.stack(self.unread_losses).tolist()
        for value in values:
            p["loss_sum"], p["loss_count"] = p["loss_sum"] + value, p["loss_count"] + 1
        p["train_time"] += time.time() - start
        steps = range(p["step"] - len(values) + 1, p["step"] + 1)
        self.unread_losses = []
        return dict(zip(steps, values))

    def note_backends(self):
        """A Triton launch that raised has sent the scans to PyTorch: say so in the config."""
        if (now := mimetic.kernels.backends_in_use(self.device)) != self.c["scan_backends"]:
            self.c["scan_backends"] = now
            if self.out:
                (self.out / "config.json").write_text(json.dumps(self.c, indent=2))

    def evaluate(self):
        """A metrics row: step, mean training loss since the last row, times, and accuracy per eval length."""
        c, p = self.c, self.progress
        results = evaluate_lengths(self.model, c, self.device)
        loss = p["loss_sum"] / p["loss_count"] if p["loss_count"] else None
        row = {"step": p["step"], "loss": loss, "time": round(p["train_time"], 2),  # time: training only
               "wall_time": round(self.elapsed(), 2), "tokens_per_s": round(p["tokens"] / max(p["train_time"], 1e-9)),
               **{metric: {str(n): r[metric] for n, r in results.items()} for metric in figures.METRICS}}
        p["loss_sum"], p["loss_count"] = 0.0, 0
        eta = p["train_time"] / max(p["step"], 1) * (c["steps"] - p["step"])
        accs = " | ".join(f"acc@{n} {r['exact_match']:.2f}" for n, r in results.items())
        print(f"step {p['step']}/{c['steps']} | loss {'-' if loss is None else f'{loss:.3f}'} | {accs} | "
              f"{row['tokens_per_s'] / 1e3:.1f}k tok/s | eta {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
        return row

    def log_eval(self):
        self.progress["rows"].append(self.evaluate())
        append_metrics(self.out, self.progress["rows"][-1], self.c["eval_lens"])

    def checkpoint(self):
        save_checkpoint(self.out, dict(
            model=self.model.state_dict(), optimizer=self.opt.state_dict(), schedule=self.schedule.state_dict(),
            batches=self.batches_before if self.prefetched else self.batches.get_state(), rng=torch.get_rng_state(),
            config=self.c,
            run={**self.progress, "wall_time": self.elapsed()}))

    def report(self, when, name):
        """Print how mimetic each Mamba layer is (mimetic_report on the attention maps' example), save it as `name`."""
        rows = mimetic_report(self.model, example_inputs(self.c).to(self.device))
        if rows:
            print(f"how mimetic each Mamba layer is {when}:\n{format_report(rows)}", flush=True)
        if rows and self.out:
            (self.out / name).write_text(json.dumps(rows, indent=2))

    def plot_attention(self, when, name):
        panels = figures.attention_panels(self.model, example_inputs(self.c).to(self.device))
        figures.plot_attention(panels, f"{run_name(self.c)} {when}", self.out / name)

    def finish(self, stopped, failure, paused=False):
        """Print the final table and write the outputs: the last checkpoint and `done` (finished), `failed`
        (diverged), or, when stopped early (or paused by --stop-at), an eval row at the stopping step that a
        resumed run drops."""
        c, out, rows = self.c, self.out, self.progress["rows"]
        final = rows[-1]
        if failure:
            print(failure, flush=True)
        elif stopped:
            print(f"paused at step {stopped} of {c['steps']} (--stop-at); the same command with a larger --stop-at, "
                  "or without it, goes on" if paused else
                  f"interrupted at step {stopped}; the same command resumes from there", flush=True)
            final = final if final["step"] == stopped else self.evaluate()
        print_table(final, c["train_len"])
        self.report(f"at step {self.step}", "report_final.json")
        if not out:
            return final
        if final is not rows[-1]:
            append_metrics(out, final, c["eval_lens"])
        if not (stopped or failure):
            self.checkpoint()
            (out / "checkpoint_prev.pt").unlink(missing_ok=True)
        self.plot_attention(f"at step {self.step}", "attention_final.png")
        shown = rows + ([final] if final is not rows[-1] else [])
        figures.plot_accuracy([(run_name(c), c["train_len"], [shown])], out / "accuracy.png", run_name(c))
        if failure or not stopped:
            (out / ("failed" if failure else "done")).write_text((failure or "finished") + "\n")
        return final


def train(config):
    """Train one run (a dict of the CLI flags; missing ones take their defaults). With config["out"], it writes
    the run folder, checkpoints every --checkpoint-every steps and resumes from the folder's last checkpoint.
    Returns the final metrics row (also when paused by --stop-at, leaving the run unfinished). Raises Diverged
    when the loss turns NaN or Inf, and KeyboardInterrupt when stopped early, after writing the outputs."""
    run = Run(config)
    c, stopped, failure = run.c, None, None
    pause_at = c["stop_at"] if c["stop_at"] is not None and c["stop_at"] < c["steps"] else None
    run.start()
    if pause_at is not None and run.step >= pause_at:  # resumed at or past the pause: nothing to train
        stopped = run.step
    with StopRequest() as stop:
        while run.step < c["steps"] and not stopped:
            run.train_step()
            step, requested = run.step, stop.requested
            if step % c["sync_every"] and step % c["eval_every"] and step % c["checkpoint_every"] and not (
                    step in (c["steps"], pause_at) or requested):
                continue  # the losses stay on the GPU a while longer
            if bad := [(i, v) for i, v in run.read_losses().items() if not math.isfinite(v)]:
                failure = (f"step {bad[0][0]}: loss {bad[0][1]} at lr {run.schedule.get_last_lr()[0]:.3g} (peak "
                           f"--lr {c['lr']:g}): the run diverged; try a lower --lr or a --grad-clip")
                break
            run.note_backends()
            if run.step % c["eval_every"] == 0 or run.step == c["steps"]:
                run.log_eval()
            if (requested or run.step == pause_at) and run.step < c["steps"]:
                stopped = run.step
            if run.out and (run.step % c["checkpoint_every"] == 0 or stopped) and run.step < c["steps"]:
                run.checkpoint()  # its rows end at the last regular eval, as an uninterrupted run's do
            if stopped:
                break
    paused = stopped is not None and not stop.requested
    final = run.finish(stopped, failure, paused)
    if failure:
        raise Diverged(failure)
    if stopped and not paused:
        raise KeyboardInterrupt
    return final


def metrics_header(eval_lens):
    per_length = [f"{metric}@{n}" for metric in figures.METRICS for n in eval_lens]
    return ["step", "loss", "time", "wall_time", "tokens_per_s"] + per_length


def metrics_line(row, eval_lens):
    return ",".join(str(v) for v in [row["step"], row["loss"], row["time"], row["wall_time"], row["tokens_per_s"]]
                    + [row[m][str(n)] for m in figures.METRICS for n in eval_lens])


def write_metrics(out, rows, eval_lens):
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "metrics.csv").write_text("\n".join([",".join(metrics_header(eval_lens))]
                                               + [metrics_line(r, eval_lens) for r in rows]) + "\n")


def append_metrics(out, row, eval_lens):
    if out:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(out / "metrics.csv", "a") as f:
            f.write(metrics_line(row, eval_lens) + "\n")


def print_table(row, train_len):
    print(f"final (step {row['step']}):\n  length | exact match | token acc | string acc")
    for n, em in row["exact_match"].items():
        print(f"  {n:>6}{'*' if int(n) == train_len else ' '}|  {em:10.3f} | {row['token_acc'][n]:9.3f} | "
              f"{row['string_acc'][n]:10.3f}")


# ----------------------------------------------------------------------------------------------------
# Grids and sweeps: preset configs × lrs × cs × seeds, shared between torchrun's processes

def grid(argv):
    """(description, out folder, config names, [(run folder, config)], sweep?) of a command line."""
    args = build_parser().parse_args(argv)
    typed = vars(build_parser(with_defaults=False).parse_args(argv))
    if (args.scale or args.configs) and not args.preset:
        raise ValueError(f"--{'scale' if args.scale else 'configs'} goes with a --preset; name one")
    scale = args.scale or "paper"
    description, shared, configs = presets(scale)[args.preset] if args.preset else ("", {}, {"": {}})
    if args.configs:
        if unknown := [name for name in args.configs if name not in configs]:
            raise ValueError(f"--configs {unknown} are not configs of --preset {args.preset}: {', '.join(configs)}")
        configs = {name: configs[name] for name in args.configs}
    axes = {}
    for many, one in (("lrs", "lr"), ("cs", "c"), ("seeds", "seed")):  # typed beats preset beats default
        axes[one] = typed.get(many) or ([typed[one]] if one in typed else None) or shared.get(many) or [DEFAULTS[one]]
    resolved = {name: resolve_config({**shared, **flags, **typed, "lr": axes["lr"][0], "c": axes["c"][0]})
                for name, flags in configs.items()}
    sweep = args.sweep or len(resolved) * len(axes["lr"]) * len(axes["c"]) * len(axes["seed"]) > 1
    first = next(iter(resolved.values()))
    out = Path(args.out or "runs/" + (f"{args.preset}_{scale}" if args.preset else run_name(first))
               + ("" if sweep else f"_s{axes['seed'][0]}"))
    runs = []
    for name, config in resolved.items():
        name = name or run_name(config)
        for lr in axes["lr"]:
            for c in axes["c"]:
                for seed in axes["seed"]:
                    swept = "_".join(f"{k}{v:g}" for k, v in (("lr", lr), ("c", c)) if len(axes[k]) > 1)
                    folder = out / name / swept / f"seed{seed}" if sweep else out  # swept: lr, c folders
                    runs.append((folder, dict(config, lr=lr, c=c, seed=seed)))
    label = f"preset {args.preset}, {scale} scale: {description}" if args.preset else run_name(first)
    return label, out, [name or run_name(cfg) for name, cfg in resolved.items()], runs, sweep, args


def dry_run(runs):
    """One JSON line per run (its folder and resolved config) with the model's parameter count."""
    sizes = {}
    for folder, c in runs:
        key = json.dumps(model_config_kwargs(c), sort_keys=True)
        if key not in sizes:  # a --pretrained model is not downloaded for this
            sizes[key] = None if c["pretrained"] else sum(p.numel() for p in build_model(c).parameters())
        print(json.dumps({"run": str(folder), "params": sizes[key], **c}))
    print(f"{len(runs)} runs", file=sys.stderr)


def distributed():
    """(rank, world size, local rank, local world size) under torchrun, else (0, 1, 0, 1)."""
    env = lambda name, default: int(os.environ.get(name, default))
    return env("RANK", 0), env("WORLD_SIZE", 1), env("LOCAL_RANK", 0), env("LOCAL_WORLD_SIZE", 1)


def rank_device(device, local_rank, n_gpus):
    """The device of torchrun's process local_rank: the GPUs in turn, so that more processes than GPUs share
    them (--nproc_per_node 16 on 8 GPUs: two runs on each GPU at a time); CPU runs stay on the CPU."""
    if not device.startswith("cuda"):
        return "cpu"
    if n_gpus < 1:
        raise ValueError(f"--device {device} under torchrun, but no GPU is visible")
    return f"cuda:{local_rank % n_gpus}"


def run_sweep(runs, out, names, title):
    """Train every unfinished run; under torchrun each process takes every world-th of them. Rank 0 writes
    the summary once every process is done. A diverged run is marked failed and the sweep goes on."""
    rank, world, local_rank, local_world = distributed()
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=30))  # a share may take days
    pending = []
    for folder, c in runs:
        if (folder / "done").exists() or (folder / "failed").exists():
            if rank == 0:
                print(f"skip {folder} ({'done' if (folder / 'done').exists() else 'failed'})")
        else:
            pending.append((folder, c))
    if world > 1:
        dist.barrier()  # every process has listed the unfinished runs before any starts one
        if 0 < len(pending) < world:
            raise ValueError(f"{world} processes for {len(pending)} unfinished run{'s' * (len(pending) > 1)}; use "
                             f"--nproc_per_node {len(pending)} or fewer")
    for folder, c in pending[rank::world]:
        if world > 1:
            c = dict(c, device=rank_device(c["device"], local_rank, torch.cuda.device_count()))
        print(f"=== {folder}" + (f" (rank {rank} of {world})" if world > 1 else ""), flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "trained_by", "a") as f:
            f.write(f"rank {rank} of {world}\n")
        try:
            train(dict(c, out=str(folder)))
        except Diverged as e:
            print(f"failed: {folder}: {e}; the sweep goes on", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0 and any((folder / "done").exists() or (folder / "failed").exists() for folder, _ in runs):
        figures.write_summary(out, names, title)
    elif rank == 0:  # every run paused by --stop-at (or stopped): nothing to summarize yet, and no error
        print(f"no run under {out} has finished yet: no summary; the same command goes on", flush=True)


# ----------------------------------------------------------------------------------------------------
# Entry points: train (default), eval, plot

def fail(message, code=2):
    """A user mistake: one line, exit status 2 (as argparse does), no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def eval_command(argv):
    parser = argparse.ArgumentParser(prog="train.py eval", description="evaluate a finished (or stopped) run "
                                     "at new lengths and redraw its attention maps on one example")
    parser.add_argument("run", help="a run folder with checkpoint.pt")
    parser.add_argument("--lens", type=int_list, help="comma-separated lengths (default: the run's eval lengths)")
    parser.add_argument("--task", choices=TASKS, help="another task with the same tokens (e.g. stack for a copy model)")
    parser.add_argument("--example-len", type=int, help="length of the example the maps show (default: train length)")
    parser.add_argument("--example-seed", type=int, default=0, help="which example (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=CHOICES["device"], help="auto: CUDA if there is a GPU")
    args = parser.parse_args(argv)
    folder = Path(args.run)
    saved = load_checkpoint(folder)
    if saved is None:
        fail(f"no readable checkpoint.pt in {folder}: train the run first (or resume it)")
    c = resolve_config(dict(saved["config"], device=args.device))  # fills flags added since the run trained
    model = build_model(c)  # mimetic init included: a mimetic state dict loads into a mimetic model
    model.load_state_dict(saved["model"])
    task = args.task or c["task"]
    have, need = (task_vocab_size(t, c["vocab_size"]) for t in (c["task"], task))
    if need != have:
        fail(f"{folder} was trained on {c['task']} with {have} tokens; {task} with its --vocab-size "
             f"{c['vocab_size']} needs {need}: evaluate a task with the same tokens")
    device = torch.device(c["device"])
    model.to(device)
    try:
        results = evaluate_lengths(model, c, device, args.lens, task)
        example = example_inputs(c, args.example_len, args.example_seed, task).to(device)
    except ValueError as e:
        fail(e)
    row = {"step": saved["run"]["step"], **{m: {str(n): r[m] for n, r in results.items()} for m in figures.METRICS}}
    print(f"{folder} ({task}):")
    print_table(row, c["train_len"])
    path = folder / "eval.json"
    evals = json.loads(path.read_text()) if path.exists() else {}
    evals.setdefault(task, {}).update({str(n): r for n, r in results.items()})
    path.write_text(json.dumps(evals, indent=2))
    figures.plot_attention(figures.attention_panels(model, example), f"{folder.name}: {task}, length "
                           f"{args.example_len or c['train_len']}, step {row['step']}", folder / "attention_eval.png")
    print(f"wrote {path} and {folder / 'attention_eval.png'}")


def plot_command(argv):
    parser = argparse.ArgumentParser(prog="train.py plot", description="overlay the accuracy of run folders")
    parser.add_argument("runs", nargs="+", help="run folders, or config folders of seed subfolders (mean ± std)")
    parser.add_argument("--out", default="accuracy_compare.png", help="figure path (default: %(default)s)")
    parser.add_argument("--final", action="store_true", help="bars of the final values, not curves")
    parser.add_argument("--lengths", action="store_true", help="final accuracy vs evaluation length")
    parser.add_argument("--metric", default="exact_match", choices=tuple(figures.METRICS))
    parser.add_argument("--at-steps", type=int_list, help="instead: print a markdown table of every run at these "
                        "steps, with --metric and token accuracy at --length (default: 2x the train length)")
    parser.add_argument("--length", type=int, help="with --at-steps: the evaluation length")
    parser.add_argument("--maps", type=int, metavar="LAYER", help="instead: this layer's attention map in each run "
                        "(run folders with checkpoint.pt), side by side, on one example of the train length")
    args = parser.parse_args(argv)
    plot = figures.plot_final if args.final else figures.plot_lengths if args.lengths else figures.plot_accuracy
    try:
        if args.at_steps:
            metrics = dict.fromkeys((args.metric, "token_acc"))
            return print("\n".join(figures.steps_table(args.runs, args.at_steps, args.length, tuple(metrics))))
        if args.maps is not None:
            figures.plot_maps([(Path(r).parent.name if Path(r).name.startswith("seed") else Path(r).name,
                                *layer_map(Path(r), args.maps)) for r in args.runs], args.out)
        else:
            plot([figures.load_run_group(r) for r in args.runs], args.out, metric=args.metric)
    except (ValueError, OSError, KeyError, IndexError) as e:
        fail(e)
    print(f"wrote {args.out}")


def layer_map(folder, layer):
    """(attention map, mask or None) of one layer of a finished run, on its attention-map example."""
    saved = load_checkpoint(folder)
    if saved is None:
        raise ValueError(f"no readable checkpoint.pt in {folder}")
    c = resolve_config(dict(saved["config"], device="cpu"))
    model = build_model(c)
    model.load_state_dict(saved["model"])
    return figures.attention_panels(model, example_inputs(c))[layer]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["eval"], ["plot"]):
        return (eval_command if argv[0] == "eval" else plot_command)(argv[1:])
    try:
        label, out, names, runs, sweep, args = grid(argv)
    except ValueError as e:
        fail(e)
    if args.dry_run:
        return dry_run(runs)
    if distributed()[1] > 1 and not sweep:
        fail("torchrun shares the runs of a sweep between processes; this command is one run (add --sweep)")
    if distributed()[0] == 0:
        print(f"{label}: {len(runs)} run{'s' * (len(runs) > 1)} into {out}")
    try:
        if sweep:
            run_sweep(runs, out, names, label)
        elif (out / "done").exists():
            print(f"{out} is finished (delete it to train again):")
            print_table(figures.load_runs(out)[0]["rows"][-1], runs[0][1]["train_len"])
        else:
            train(dict(runs[0][1], out=str(out)))
    except Diverged:
        sys.exit(1)  # train() printed why
    except ValueError as e:  # e.g. a checkpoint of another config in the run folder
        fail(e)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
