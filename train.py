"""train.py — train Mamba, hybrids and attention baselines on the recall tasks, with or without mimetic init.

    python train.py --task copy --mimetic              # the main job: a few minutes on a laptop CPU
    python train.py --task copy                        # the same model with the default init, for contrast
    python train.py --preset ablation --sweep          # a grid of the paper's setups (GPU-sized), seeds × configs
    python train.py --preset ablation --scale cpu --sweep   # the same grid at the main job's CPU size
    python train.py plot runs/A runs/B --out cmp.png   # overlay runs (mean ± std over the seeds a folder holds)

A run folder gets config.json, metrics.jsonl / metrics.csv (one row per eval), checkpoint.pt, accuracy.png
(dotted: train length, solid: longer) and attention_init.png / attention_final.png (each layer's average
attention map and average mask ∏Ā, §2 of Trockman et al. 2024). Ctrl-C stops early and still writes them all.

The defaults are the CPU main job: a 2-layer Mamba 2 (d_model 64, N 128) copying strings of 2–16 of 64
tokens for 4000 steps, evaluated at lengths 16, 32 and 64 (a few minutes on 2 cores). The presets set the
paper's GPU-sized setups instead (d_model 256, length 50, 5000 steps), or with --scale cpu the same grids at
the main job's size.
"""
import argparse
import csv
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # figures go to files; no display needed
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from mimetic import (LM, TASKS, ModelConfig, SelectiveSSM, attention_map, attention_mask, evaluate, make_batch,
                     mimetic_init_, task_vocab_size)

PARTS = ("A", "dt", "bc", "conv")
ARCHS = ("mamba1", "mamba2", "attention", "linear")

# ----------------------------------------------------------------------------------------------------
# Command line and presets

# The paper's setups (§3–§5) as name: (description, shared flags, grid: {config name: flags}), at two scales.
# "paper" is the paper's size, for a GPU: Mamba 1 with N = 32, Mamba 2 with N = 128 and head dim 64, strings
# of 50, 5000 steps (the paper swept lr over {1e-3, 5e-4, 1e-4}). "cpu" is the README's main job: 2 layers
# of width 64, strings of 2–16 of 64 tokens, 4000 steps; the paper's "layer 4 of 8" becomes layer 2 of 2.
SCALES = {"paper": dict(d_model=256, train_len=50, vocab_size=26, steps=5000, batch_size=64, lr=1e-3),
          "cpu": dict(d_model=64, train_len=16, vocab_size=64, steps=4000, batch_size=32, lr=3e-3)}


def presets(scale):
    paper = scale == "paper"
    base = dict(SCALES[scale], task="copy", n_layers=4 if paper else 2)
    m1, m2 = dict(arch="mamba1", d_state=32), dict(arch="mamba2", d_state=128, headdim=64 if paper else 32)
    depth, target = (8, 3) if paper else (2, 1)  # the hybrids' depth and their one non-Mamba layer (0-based)

    def hybrid(letter):  # e.g. MMMAMMMM
        return "M" * target + letter + "M" * (depth - target - 1)
    inits = {"default": {}, "mimetic": dict(mimetic=True), "hybrid": dict(pattern=hybrid("A"))}
    task_flags = {"stack": {}, "sort": dict(vocab_size=512),  # the paper's sort vocabulary
                  "mqar": dict(vocab_size=8192) if paper else dict(vocab_size=128, train_len=8)}  # 6 tokens a pair
    return {
        "fig1": ("Fig. 1: Mamba 1 and Mamba 2 on copy, default vs mimetic", base,
                 {f"{arch}_{init}": dict(flags, **inits[init]) for arch, flags in (("mamba1", m1), ("mamba2", m2))
                  for init in ("default", "mimetic")}),
        "fig2": (f"Fig. 2: {depth}-layer Mamba 2 with attention as layer {target + 1}, vs mimetic init of that "
                 "layer only", dict(base, n_layers=depth, **m2),
                 {"hybrid": inits["hybrid"], "default": {}, f"mimetic_l{target}": dict(mimetic_layers=str(target))}),
        "ablation": ("Fig. 3: the 16 on/off combinations of A, dt, bc, conv for Mamba 1 and 2, "
                     + ("4 layers (the paper: 24 × d_model 1024)" if paper else "2000 steps"),
                     dict(base, **({} if paper else dict(steps=2000))),
                     {f"{arch}_{'+'.join(parts) or 'none'}": dict(arch_flags, mimetic_parts=",".join(parts))
                      for arch, arch_flags in (("mamba1", m1), ("mamba2", m2))
                      for k in range(len(PARTS) + 1) for parts in itertools.combinations(PARTS, k)}),
        "tasks": ("Fig. 4: stack-order copy, MQAR and sorting: Mamba 2 default vs mimetic vs the attention hybrid",
                  dict(base, n_layers=depth, **m2),
                  {f"{task}_{init}": dict(flags, task=task, **inits[init])
                   for task, flags in task_flags.items() for init in inits}),
        "linattn": (f"Fig. 5: layer {target + 1} of {depth} as linear attention (head dim 8/32/1024) vs mimetic "
                    "Mamba 2 there with N = 32 / 64", dict(base, n_layers=depth, **m2),
                    {**{f"linear{k}": dict(pattern=hybrid("L"), linear_head_dim=k) for k in (8, 32, 1024)},
                     **{f"mamba_N{n}_mimetic_l{target}": dict(d_state=n, mimetic_layers=str(target))
                        for n in (32, 64)}}),
        "statesize": ("Fig. 7: Mamba 2 with state size N = 16…256, default vs mimetic", dict(base, **m2),
                      {f"N{n}_{init}": dict(d_state=n, **inits[init])
                       for n in (16, 32, 64, 128, 256) for init in ("default", "mimetic")}),
        "mamba41": ("Mamba paper §4.1: selective copying and induction heads, 2-layer Mamba 1 (d_model 64, N 16), "
                    "default init", dict(base, n_layers=2, d_model=64, arch="mamba1", d_state=16, vocab_size=16),
                    {"selective_copy": dict(task="selective_copy", train_len=4096 if paper else 64),
                     "induction": dict(task="induction", train_len=256 if paper else 64,
                                       eval_lens="256,1024,4096,16384" if paper else "64,256,1024")}),
    }


PRESETS = presets("paper")

# (flag, default, type, help); None defaults are resolved in resolve_config
OPTIONS = [
    ("task", "copy", str, "recall task: " + ", ".join(TASKS)),
    ("arch", "mamba2", str, "layer type of every layer: mamba1, mamba2, attention (softmax) or linear (attention)"),
    ("pattern", None, str, "one letter per layer for hybrids, M Mamba / A attention / L linear, e.g. MMMAMMMM"),
    ("mimetic", False, None, "mimetic init with the paper's parts for the arch: A, dt, bc (+ conv for mamba2)"),
    ("mimetic_parts", None, str, "comma-separated subset of A,dt,bc,conv to apply (implies --mimetic)"),
    ("mimetic_layers", None, str, "comma-separated 0-based layer indices to initialize (default: all Mamba layers)"),
    ("c", 8.0, float, "mimetic A reparameterization A = -exp(-c·A_log)"),
    ("d_model", 64, int, "model width"),
    ("n_layers", 2, int, "number of layers"),
    ("d_state", 128, int, "state size N (paper: 32 for mamba1, 128 for mamba2)"),
    ("headdim", 32, int, "mamba2 head dimension (paper: 64)"),
    ("expand", 2, int, "Mamba inner width = expand · d_model"),
    ("n_heads", 1, int, "heads of attention / linear attention layers"),
    ("linear_head_dim", 32, int, "query/key features per head of linear attention layers"),
    ("vocab_size", 64, int, "number of content tokens of the task (the LM adds the task's special tokens)"),
    ("train_len", 16, int, "task length used for training (copy: string length)"),
    ("min_train_len", None, int, "draw each batch's length uniformly from [this, train_len] (default: 2 for copy, "
     "stack and sort, since one fixed length teaches copying by position, which fails at 2x (README); train_len "
     "for the other tasks)"),
    ("eval_lens", None, str, "comma-separated eval lengths (default: 1×, 2× and 4× the train length)"),
    ("steps", 4000, int, "optimizer steps"),
    ("batch_size", 32, int, "training batch size"),
    ("lr", 3e-3, float, "peak learning rate (AdamW, linear warmup then cosine decay to 0)"),
    ("warmup", 100, int, "warmup steps"),
    ("weight_decay", 0.1, float, "AdamW weight decay (none on 1-D params or those marked _no_weight_decay)"),
    ("grad_clip", 1.0, float, "gradient norm clip (0: off)"),
    ("eval_every", 250, int, "evaluate every this many steps (and at the end)"),
    ("eval_batches", 4, int, "batches of 64 examples per eval length"),
    ("seed", 0, int, "random seed"),
    ("seeds", None, str, "comma-separated seeds, run one after another (sweep layout)"),
    ("device", "auto", str, "auto, cpu or cuda"),
    ("dtype", "fp32", str, "fp32 or bf16 (bf16 autocast, CUDA only)"),
    ("threads", None, int, "torch.set_num_threads (default: torch's choice)"),
    ("out", None, str, "run folder (default: runs/<task>_<arch>_<init>_s<seed>, or runs/<preset>_<scale> for sweeps)"),
    ("preset", None, str, "the paper's setups (your flags override): "
     + "; ".join(f"{k}: {v[0]}" for k, v in PRESETS.items())),
    ("scale", None, str, "size of the --preset setups: paper (for a GPU; the default) or cpu (README's CPU size)"),
    ("sweep", False, None, "run every config of the preset × every seed into subfolders of --out, skip finished ones"),
]
CHOICES = {"task": TASKS, "arch": ARCHS, "device": ("auto", "cpu", "cuda"), "dtype": ("fp32", "bf16"),
           "preset": tuple(PRESETS), "scale": tuple(SCALES)}

DEFAULTS = {name: default for name, default, _, _ in OPTIONS}


def build_parser(with_defaults=True):
    """The CLI; without defaults it reports only the flags the user typed (so they can override presets)."""
    head, _, tail = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=head, epilog=tail, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=None if with_defaults else argparse.SUPPRESS)
    for name, default, kind, help_text in OPTIONS:
        flag = "--" + name.replace("_", "-")
        extra = {"default": default} if with_defaults else {}
        if kind is None:
            parser.add_argument(flag, action="store_true", help=help_text, **extra)
        else:
            parser.add_argument(flag, type=kind, choices=CHOICES.get(name), help=f"{help_text} (default: {default})",
                                **extra)
    return parser


def int_list(text, what):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{what} is empty")
    return values


def resolve_config(config):
    """Fill in derived fields and check combinations; raises ValueError naming the problem."""
    c = dict(DEFAULTS, **config)
    if c["arch"] in ("attention", "linear"):
        c["pattern"] = c["pattern"] or ("A" if c["arch"] == "attention" else "L") * c["n_layers"]
    c["n_layers"] = len(c["pattern"]) if c["pattern"] else c["n_layers"]
    if c["mimetic_parts"] is not None:
        parts = [p.strip() for p in c["mimetic_parts"].split(",") if p.strip()]
        if bad := [p for p in parts if p not in PARTS]:
            raise ValueError(f"unknown --mimetic-parts {bad}; choose from {','.join(PARTS)}")
        c["mimetic"] = bool(parts)
    if c["mimetic_layers"] is not None:
        int_list(c["mimetic_layers"], "--mimetic-layers")
        c["mimetic"] = True
    if c["mimetic"] and c["pattern"] and "M" not in c["pattern"]:
        raise ValueError(f"mimetic init needs Mamba layers, but pattern {c['pattern']} has none")
    c["eval_lens"] = c["eval_lens"] or f"{c['train_len']},{2 * c['train_len']},{4 * c['train_len']}"
    for name in ("train_len", "steps", "batch_size", "eval_every", "eval_batches", "d_model", "n_layers", "vocab_size"):
        if c[name] <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {c[name]}")
    if c["min_train_len"] is None:  # a range of lengths teaches copying by content, not by position
        c["min_train_len"] = min(2, c["train_len"]) if c["task"] in ("copy", "stack", "sort") else c["train_len"]
    if not 0 < c["min_train_len"] <= c["train_len"]:
        raise ValueError(f"--min-train-len must be in [1, --train-len={c['train_len']}], got {c['min_train_len']}")
    if min(int_list(c["eval_lens"], "--eval-lens")) <= 0:
        raise ValueError(f"--eval-lens must be positive lengths, got {c['eval_lens']}")
    for length in {c["min_train_len"], c["train_len"], *int_list(c["eval_lens"], "--eval-lens")}:
        try:  # the task's own limits, e.g. mqar's distinct keys: fail now, not at the first eval
            make_batch(c["task"], 1, length, vocab_size=c["vocab_size"])
        except ValueError as e:
            raise ValueError(f"{c['task']} at length {length} with --vocab-size {c['vocab_size']}: {e}") from None
    if c["device"] == "auto":
        c["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if c["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device found; use --device cpu or auto")
    if c["dtype"] == "bf16" and c["device"] != "cuda":
        raise ValueError("--dtype bf16 is autocast on CUDA only; use --dtype fp32 on CPU")
    return c


def run_name(c):
    arch = f"{c['arch']}-{c['pattern']}" if c["arch"] in ("mamba1", "mamba2") and c["pattern"] else c["arch"]
    init = "default"
    if c["mimetic"]:
        init = "mimetic" + (f"-{c['mimetic_parts'].replace(',', '+')}" if c["mimetic_parts"] else "")
        init += f"-l{c['mimetic_layers'].replace(',', '+')}" if c["mimetic_layers"] else ""
    return f"{c['task']}_{arch}_{init}"


# ----------------------------------------------------------------------------------------------------
# Model, optimizer, schedule

def build_model(c):
    """LM for the config, mimetic-initialized as asked (conv follows the paper's per-arch choice unless
    --mimetic-parts names it)."""
    arch = c["arch"] if c["arch"] in ("mamba1", "mamba2") else "mamba1"  # no M layers: the block type is unused
    model = LM(ModelConfig(vocab_size=task_vocab_size(c["task"], c["vocab_size"]), d_model=c["d_model"],
                           n_layers=c["n_layers"], arch=arch, pattern=c["pattern"], d_state=c["d_state"],
                           expand=c["expand"], headdim=c["headdim"], n_heads=c["n_heads"],
                           linear_head_dim=c["linear_head_dim"]))
    if c["mimetic"]:
        parts = dict(A=True, dt=True, bc=True, conv=None)
        if c["mimetic_parts"]:
            chosen = c["mimetic_parts"].split(",")
            parts = {p: p in chosen for p in PARTS}
        layers = int_list(c["mimetic_layers"], "--mimetic-layers") if c["mimetic_layers"] else None
        mimetic_init_(model, c=c["c"], layers=layers, **parts)
    return model


def build_optimizer(model, c):
    """AdamW as in the Mamba reference: no decay on 1-D params (norms, biases) or on those marked
    _no_weight_decay (A_log, D, dt_bias: decaying A_log would pull a mimetic A = −exp(−c·A_log) back to
    −1); linear warmup, then cosine decay to 0."""
    decay, no_decay = [], []
    for p in model.parameters():
        skip = p.dim() < 2 or getattr(p, "_no_weight_decay", False)
        (no_decay if skip else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=c["lr"], betas=(0.9, 0.95))

    def lr_factor(step):
        if step < c["warmup"]:
            return (step + 1) / c["warmup"]
        progress = (step - c["warmup"]) / max(1, c["steps"] - c["warmup"])
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


# ----------------------------------------------------------------------------------------------------
# Attention-map figures (§2)

@torch.no_grad()
def attention_panels(model, inputs):
    """Per layer: (average attention map, average mask or None) on one example, as numpy arrays."""
    panels = []
    for block, h in zip(model.layers, model.mixer_inputs(inputs)):
        is_ssm = isinstance(block.mixer, SelectiveSSM)
        mask = attention_mask(block.mixer, h)[0].float().cpu().numpy() if is_ssm else None
        panels.append((attention_map(block.mixer, h)[0].float().cpu().numpy(), mask))
    return panels


def plot_attention(panels, title, path):
    fig, axes = plt.subplots(2, len(panels), figsize=(2.6 * len(panels), 5.2), squeeze=False)
    for i, (amap, mask) in enumerate(panels):
        axes[0, i].imshow(amap, cmap="viridis")
        axes[0, i].set_title(f"layer {i} map", fontsize=9)
        if mask is not None:
            axes[1, i].imshow(mask, cmap="magma", vmin=0, vmax=1)
            axes[1, i].set_title(f"layer {i} mask ∏Ā", fontsize=9)
        else:
            axes[1, i].text(0.5, 0.5, "attention:\nno mask", ha="center", va="center")
        for ax in axes[:, i]:
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Accuracy figures: one panel per longer length, train length dotted, that length solid, colour per run

def load_run_group(folder):
    """(label, train length, [metrics rows per seed]) for a run folder or a folder of seed subfolders."""
    folder = Path(folder)
    seeds = [folder] if (folder / "metrics.jsonl").exists() else sorted(p.parent for p in folder.glob("*/metrics.jsonl"))
    if not seeds:
        raise ValueError(f"no metrics.jsonl in {folder} or its subfolders")
    train_len = json.loads((seeds[0] / "config.json").read_text())["train_len"]
    return folder.name, train_len, [[json.loads(line) for line in (s / "metrics.jsonl").read_text().splitlines()
                                     if line.strip()] for s in seeds]


def plot_accuracy(groups, path, title="", metric="exact_match"):
    """groups: (label, train_len, [rows per seed]); mean ± std band over seeds (truncated to the shortest).
    Panel k shows each group's k-th eval length beyond its train length (solid) and its train length (dotted);
    metric: exact_match or token_acc."""
    def longer(train_len, runs):
        return [int(n) for n in runs[0][0]["exact_match"] if int(n) != train_len] or [train_len]
    shown = [longer(train_len, runs) for _, train_len, runs in groups]
    fig, axes = plt.subplots(1, max(map(len, shown)), figsize=(5 * max(map(len, shown)), 3.8), squeeze=False)
    colours = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for colour, (label, train_len, runs), lengths in zip(colours, groups, shown):
        n = min(len(rows) for rows in runs)
        steps = [r["step"] for r in runs[0][:n]]
        for ax, length in zip(axes[0], lengths):
            for at, style in ((train_len, ":"), (length, "-")):
                if str(at) not in runs[0][0]["exact_match"]:
                    continue
                acc = torch.tensor([[r[metric][str(at)] for r in rows[:n]] for rows in runs])
                mean, std = acc.mean(0), acc.std(0) if len(runs) > 1 else torch.zeros(n)
                ax.plot(steps, mean, style, color=colour, label=f"{label} @{at}")
                ax.fill_between(steps, (mean - std).clamp(min=0), (mean + std).clamp(max=1), color=colour, alpha=0.15)
    for k, ax in enumerate(axes[0]):
        at = {(train_len, lengths[k]) for (_, train_len, _), lengths in zip(groups, shown) if k < len(lengths)}
        ax.set(xlabel="step", ylabel=metric.replace("_", " "), ylim=(-0.02, 1.02),
               title="dotted: {}, solid: {}".format(*next(iter(at))) if len(at) == 1 else "dotted: train length")
        ax.legend(fontsize=6, ncol=1 + len(groups) // 8)  # a 32-config grid still fits
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def final_mean_std(runs, metric, length):
    """Mean and std over seeds of the last row's metric at `length` (std 0 for one seed, nan if not evaluated)."""
    values = torch.tensor([rows[-1][metric].get(str(length), float("nan")) for rows in runs])
    return values.mean().item(), values.std().item() if len(values) > 1 else 0.0


def plot_final(groups, path, title="", metric="exact_match"):
    """Final exact match (or token_acc) per group, mean ± std over seeds, one bar per eval length: for grids
    such as the ablation, where curves would overlap."""
    lens = sorted({int(n) for _, _, runs in groups for n in runs[0][-1]["exact_match"]})
    fig, ax = plt.subplots(figsize=(max(5.0, 1 + 0.18 * len(groups) * len(lens)), 4))
    width = 0.8 / len(lens)
    for i, length in enumerate(lens):
        means, stds = zip(*(final_mean_std(runs, metric, length) for _, _, runs in groups))
        ax.bar([g + (i - (len(lens) - 1) / 2) * width for g in range(len(groups))], means, width, yerr=stds,
               capsize=2, label=f"@{length}")
    ax.set_xticks(range(len(groups)), [label for label, _, _ in groups], rotation=60, ha="right", fontsize=8)
    ax.set(ylabel=f"final {metric.replace('_', ' ')}", ylim=(0, 1.02), title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Training

def train(config):
    """Train one run (a dict or argparse Namespace of the CLI flags; missing ones take their defaults).
    Writes the run folder given by config["out"], if any. Returns the final metrics row."""
    c = resolve_config(vars(config) if isinstance(config, argparse.Namespace) else dict(config))
    out = Path(c["out"]) if c["out"] else None
    if c["threads"]:
        torch.set_num_threads(c["threads"])
    torch.manual_seed(c["seed"])
    device = torch.device(c["device"])
    model = build_model(c).to(device)
    opt, schedule = build_optimizer(model, c)
    eval_lens = int_list(c["eval_lens"], "--eval-lens")
    batches = torch.Generator().manual_seed(c["seed"])
    example, _ = make_batch(c["task"], 1, c["train_len"], vocab_size=c["vocab_size"],
                            generator=torch.Generator().manual_seed(0))  # the one example the attention maps show
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(c, indent=2))
        for name in ("metrics.jsonl", "metrics.csv", "done"):
            (out / name).unlink(missing_ok=True)
        plot_attention(attention_panels(model, example.to(device)), f"{run_name(c)} at init",
                       out / "attention_init.png")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{run_name(c)}: {n_params / 1e3:.1f}k parameters on {device}", flush=True)

    def evaluate_all(step, loss, train_time, tokens):
        results = {n: evaluate(model, c["task"], n, vocab_size=c["vocab_size"], n_batches=c["eval_batches"],
                               generator=torch.Generator().manual_seed(1), device=device) for n in eval_lens}
        row = {"step": step, "loss": loss, "time": round(train_time, 2),  # time: training only, no evals
               "wall_time": round(time.time() - wall_start, 2), "tokens_per_s": round(tokens / max(train_time, 1e-9)),
               "exact_match": {str(n): r["exact_match"] for n, r in results.items()},
               "token_acc": {str(n): r["token_acc"] for n, r in results.items()}}
        eta = train_time / max(step, 1) * (c["steps"] - step)
        accs = " | ".join(f"acc@{n} {r['exact_match']:.2f}" for n, r in results.items())
        print(f"step {step}/{c['steps']} | loss {'-' if loss is None else f'{loss:.3f}'} | {accs} | "
              f"{row['tokens_per_s'] / 1e3:.1f}k tok/s | eta {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
        if out:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            write_csv_row(out / "metrics.csv", row, eval_lens)
        return row

    step, loss_sum, loss_count, train_time, tokens, row, finished = 0, 0.0, 0, 0.0, 0, None, False
    wall_start = time.time()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=c["dtype"] == "bf16")
    try:
        row = evaluate_all(0, None, 0.0, 0)  # the init point of the accuracy curves
        while step < c["steps"]:
            start = time.time()
            length = int(torch.randint(c["min_train_len"], c["train_len"] + 1, (), generator=batches))
            inputs, targets = (t.to(device) for t in make_batch(c["task"], c["batch_size"], length,
                                                                 vocab_size=c["vocab_size"], generator=batches))
            with autocast:
                logits = model(inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if c["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
            opt.step()
            schedule.step()
            step, tokens = step + 1, tokens + inputs.numel()
            loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
            train_time += time.time() - start
            if step % c["eval_every"] == 0 or step == c["steps"]:
                row = evaluate_all(step, loss_sum / loss_count, train_time, tokens)
                loss_sum, loss_count = 0.0, 0
        finished = True
    except KeyboardInterrupt:  # stop early but keep what was learned: final eval, figures and checkpoint
        print(f"interrupted at step {step}; writing outputs", flush=True)
        if row is None or row["step"] != step:
            row = evaluate_all(step, loss_sum / loss_count if loss_count else None, train_time, tokens)
    print_table(row, c["train_len"])
    if out:
        torch.save({"model": model.state_dict(), "config": c, "model_config": dataclasses.asdict(model.config),
                    "step": step}, out / "checkpoint.pt")
        plot_attention(attention_panels(model, example.to(device)), f"{run_name(c)} at step {step}",
                       out / "attention_final.png")
        plot_accuracy([load_run_group(out)], out / "accuracy.png", run_name(c))
        if finished:
            (out / "done").write_text("finished\n")
    if not finished:
        raise KeyboardInterrupt
    return row


def write_csv_row(path, row, eval_lens):
    header = (["step", "loss", "time", "wall_time", "tokens_per_s"]
              + [f"{key}@{n}" for key in ("exact_match", "token_acc") for n in eval_lens])
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        writer.writerow([row["step"], row["loss"], row["time"], row["wall_time"], row["tokens_per_s"]]
                        + [row[key][str(n)] for key in ("exact_match", "token_acc") for n in eval_lens])


def print_table(row, train_len):
    print(f"final (step {row['step']}):\n  length | exact match | token acc")
    for n, em in row["exact_match"].items():
        print(f"  {n:>6}{'*' if int(n) == train_len else ' '}|  {em:10.3f} | {row['token_acc'][n]:9.3f}")


# ----------------------------------------------------------------------------------------------------
# Sweeps: seeds × preset configs, one subfolder each, restartable

def run_sweep(configs, seeds, out):
    """configs: {name: config}; runs out/<name>/seed<k> unless it has a `done` marker; writes summaries."""
    for name, config in configs.items():
        for seed in seeds:
            run_dir = out / name / f"seed{seed}"
            if (run_dir / "done").exists():
                print(f"skip {run_dir} (done)")
                continue
            print(f"=== {run_dir}", flush=True)
            train(dict(config, seed=seed, out=str(run_dir)))
    write_summary(out, list(configs))


def write_summary(out, names):
    """summary.csv / summary.md: mean ± std over seeds of the final exact match and token accuracy per eval
    length; summary.png (curves) and summary_final.png (bars)."""
    groups = [load_run_group(out / name) for name in names if list((out / name).glob("*/metrics.jsonl"))]
    lens = [list(runs[0][-1]["exact_match"]) for _, _, runs in groups]
    same = all(group_lens == lens[0] for group_lens in lens)  # else each cell names its length (e.g. mqar's)
    rows, table = [], []
    for (label, _, runs), group_lens in zip(groups, lens):
        row, cells = {"config": label, "seeds": len(runs)}, [label, str(len(runs))]
        for metric in ("exact_match", "token_acc"):
            for n in group_lens:
                mean, std = final_mean_std(runs, metric, n)
                row[f"{metric}@{n}_mean"], row[f"{metric}@{n}_std"] = round(mean, 4), round(std, 4)
                cells.append(f"{mean:.3f} ± {std:.3f}" + ("" if same else f" @{n}"))
        rows.append(row)
        table.append("| " + " | ".join(cells) + " |")
    columns = [f"{metric} @{n}" if same else f"{metric}, eval length {k + 1}" for metric in ("exact match", "token acc")
               for k, n in enumerate(lens[0])]
    table = ["| config | seeds | " + " | ".join(columns) + " |", "|---" * (2 + len(columns)) + "|"] + table
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    heading = "Final exact match and token accuracy, mean ± std over seeds"
    (out / "summary.md").write_text(heading + "\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))
    plot_accuracy(groups, out / "summary.png", out.name)
    plot_final(groups, out / "summary_final.png", f"{out.name}: mean ± std over seeds")


# ----------------------------------------------------------------------------------------------------
# Entry points

def fail(message):
    """A user mistake: one line, exit status 2 (as argparse does), no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        parser = argparse.ArgumentParser(prog="train.py plot", description="overlay the accuracy of run folders")
        parser.add_argument("runs", nargs="+", help="run folders, or folders of seed subfolders (mean ± std)")
        parser.add_argument("--out", default="accuracy_compare.png", help="figure path (default: %(default)s)")
        parser.add_argument("--final", action="store_true", help="bars of the final values, not curves")
        parser.add_argument("--metric", default="exact_match", choices=("exact_match", "token_acc"))
        args = parser.parse_args(argv[1:])
        try:
            plot = plot_final if args.final else plot_accuracy
            plot([load_run_group(r) for r in args.runs], args.out, metric=args.metric)
        except (ValueError, OSError) as e:
            fail(e)
        print(f"wrote {args.out}")
        return
    args = build_parser().parse_args(argv)
    typed = vars(build_parser(with_defaults=False).parse_args(argv))
    if args.scale and not args.preset:
        fail("--scale sizes the --preset setups; name one with --preset")
    scale = args.scale or "paper"
    description, shared, grid = presets(scale)[args.preset] if args.preset else ("", {}, {"": {}})
    try:
        seeds = int_list(args.seeds, "--seeds") if args.seeds else [args.seed]
        configs = {name: resolve_config({**shared, **flags, **typed}) for name, flags in grid.items()}
    except ValueError as e:
        fail(e)
    first = next(iter(configs.values()))
    sweep = args.sweep or len(seeds) > 1 or len(configs) > 1
    default_out = f"{args.preset}_{scale}" if args.preset else run_name(first)
    out = Path(args.out or f"runs/{default_out}" + ("" if sweep else f"_s{args.seed}"))
    print(f"config{f' (preset {args.preset}, {scale} scale: {description})' if args.preset else ''}:")
    print(json.dumps(first if len(configs) == 1 else {k: v for k, v in first.items() if all(
        cfg[k] == v for cfg in configs.values())}, indent=None))
    if len(configs) > 1:
        print(f"grid of {len(configs)} configs: {', '.join(configs)}; seeds {seeds}")
    try:
        if sweep:
            run_sweep({name or run_name(cfg): cfg for name, cfg in configs.items()}, seeds, out)
        else:
            train(dict(first, out=str(out)))
    except ValueError as e:  # a combination only the model or task can reject, e.g. mimetic on an attention layer
        fail(e)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
