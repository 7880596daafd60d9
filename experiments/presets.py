"""presets.py — the paper's setups as data: one entry per figure of Trockman et al. (2024), at two scales.

    python -m experiments.sweep --preset fig1 --dry-run            # the paper-sized grid, each value's source
    python -m experiments.sweep --preset fig1 --scale cpu --sweep  # the same figure at the main job's size

An entry (a Preset) has, for each scale, "paper" (for a GPU) and "cpu" (the README's main job):
- `shared`: flags every run of the figure gets, and `configs`: {config name: flags} of the runs compared.
  Every flag is written `key=(value, source)`: the source is the paper (with § or Fig. and a short
  quote), the pipeline the paper names for copying (Jelassi et al.'s transformers_ssm_copy, with its file
  or flag), zoology (which §8 names for MQAR), or "ours:" and why. Where the paper leaves a value open,
  the source says so.
- `plot`: the command that draws the figure from the runs (RESULTS.md's; runs/ folders are not
  committed, results/ ones are), or None where we have none.
A config axis (`axis`) is one choice, e.g. default vs mimetic init; `cross` makes every combination of
axes, naming each config by its parts ("mamba1" + "mimetic" → "mamba1_mimetic").

The older names (ablation = fig3, tasks = fig4, ...) stay as aliases, so that earlier commands work.
"""
from dataclasses import dataclass, field
from itertools import product

import mimetic
from train import Config

SCALES = ("paper", "cpu")


def sourced(source, **flags):
    """Flags that share one source: {key: (value, source)}."""
    return {key: (value, source) for key, value in flags.items()}


def arch(name, source, **overrides):
    """A Mamba's flags from mimetic.ARCHS (the one table of per-architecture defaults), sourced."""
    table = {k: v for k, v in mimetic.ARCHS[name].defaults.items() if k in ("d_state", "headdim")}
    return {"arch": (name, source), **sourced(source, **table), **overrides}


def axis(source, choices):
    """One choice between configs: {part of a config name: flags}, every flag with this source."""
    return {name: sourced(source, **flags) for name, flags in choices.items()}


def cross(*axes):
    """Every combination of the axes, in order: {"a_b": flags of a and b}. A name part "" is left out."""
    return {"_".join(n for n in names if n): {k: v for part in parts for k, v in part.items()}
            for names, parts in ((tuple(c[0] for c in combo), tuple(c[1] for c in combo))
                                 for combo in product(*(a.items() for a in axes)))}


@dataclass
class Scale:
    shared: dict                   # {flag: (value, source)} of every run
    configs: dict                  # {config name: {flag: (value, source)}}
    note: str = ""                 # what this scale adds to the description
    plot: str | None = None        # the command that draws the figure


@dataclass
class Preset:
    figure: str                    # "Fig. 1", ..., or "Mamba §4.1"
    about: str                     # what the figure compares
    paper: Scale
    cpu: Scale
    alias: str | None = None       # the name it had before presets were named after figures
    scales: dict = field(init=False)

    def __post_init__(self):
        self.scales = {"paper": self.paper, "cpu": self.cpu}


# ----------------------------------------------------------------------------------------------------
# The building blocks: the copying pipeline, MQAR, the architectures, the inits

PIPELINE = "Jelassi et al.'s pipeline (transformers_ssm_copy)"
PAPER_COPY = {
    **sourced("§3 'copy 50-character strings'", task="copy", train_len=50),
    **sourced(f"{PIPELINE}: main.py --vocab_size 26 (the letters a-z)", vocab_size=26),
    **sourced("§3, Fig. 3 'hidden size 1024 as in Jelassi et al.' (the paper states no width for Figs. 1, 2, "
              f"4-7; {PIPELINE}: main.py --hidden_size 1024)", d_model=1024),
    **sourced(f"{PIPELINE}: main.py --min_train_len 5", min_train_len=5),
    **sourced(f"{PIPELINE}: examples packed into --context_len 220, --train_batch_size 8", pack=220, batch_size=8),
    **sourced("§5 'All trials are for 5000 steps unless otherwise noted'", steps=5000),
    **sourced("§8 'We swept learning rates over {0.001, 0.0005, 0.0001}'", lrs=[1e-3, 5e-4, 1e-4]),
    **sourced("§5 'Error bars are computed over five seeds'", seeds=[0, 1, 2, 3, 4]),
    **sourced("§3 'We choose c from {2,4,8}'; Fig. 3 'we fix c = 8'", c=8.0),
    **sourced(f"{PIPELINE}: train_utils.py AdamW(..., weight_decay=0.1) on every parameter, torch's betas",
              weight_decay=0.1, weight_decay_on="all", beta2=0.999),
    **sourced(f"{PIPELINE}: get_scheduler('linear', num_warmup_steps=100), gradient clip 1.0",
              schedule="linear", warmup=100, grad_clip=1.0),
    **sourced("ours: 256 examples per length (the pipeline evaluates 24)", eval_batches=4),
}
MAIN_JOB = "ours: the README's main job (train.py's defaults), a CPU-sized copy of the paper's setup"
MAIN = Config()  # the main job: train.Config's defaults, written out so that each gets its source here
CPU_COPY = sourced(MAIN_JOB, **{key: getattr(MAIN, key) for key in (
    "task", "vocab_size", "d_model", "train_len", "min_train_len", "pack", "batch_size", "steps", "c",
    "weight_decay", "weight_decay_on", "beta2", "schedule", "warmup", "grad_clip", "eval_batches")},
                   lrs=[MAIN.lr], seeds=[0, 1, 2])
PAPER_MQAR = {
    **sourced("zoology (§8 names it for MQAR): VOCAB_SIZE = 8_192", task="mqar", vocab_size=8192),
    **sourced("zoology: (64, 4), (128, 8), (256, 16) tokens and pairs", mqar_tokens_per_pair=16),
    **sourced("ours: one fixed length per run, as zoology trains", pack=0, min_train_len=None, batch_size=64),
    **sourced("zoology: cosine schedule", schedule="cosine"),
    # Fig. 4's caption gives one "training length (50)" for all its tasks; it counts tokens, as §5's "baseline
    # breaks down around 900-long strings" does. At 16 tokens per pair that is 3 pairs in 48 tokens (not 50
    # pairs: 800 tokens, near §5's breakdown).
    **sourced("ours, reading Fig. 4's 'training length (50)' as tokens: 3 pairs × 16 = 48 tokens; the paper "
              "gives no number of pairs", train_len=3),
}
CPU_MQAR = sourced("ours: MQAR at the main job's size, 8 pairs of 6 tokens over 128 tokens", task="mqar",
                   vocab_size=128, train_len=8, min_train_len=None, mqar_tokens_per_pair=6)

N32 = "§5 'For all Mamba 1 experiments, we use state size 32'"
MAMBA1 = arch("mamba1", N32)
MAMBA2 = arch("mamba2", "§5 'state size 128 unless otherwise noted', 'head dimension 64'")
MAMBA2_CPU = arch("mamba2", "§5 'state size 128 unless otherwise noted'",
                  headdim=(MAIN.headdim, "ours: 4 heads at width 64 (the paper's 64 would leave 2)"))

INIT = "the figure's comparison: default vs mimetic init of every Mamba layer"
INITS = axis(INIT, {"default": {}, "mimetic": dict(mimetic=True)})
MAMBAS = {"paper": {"mamba1": MAMBA1, "mamba2": MAMBA2}, "cpu": {"mamba1": MAMBA1, "mamba2": MAMBA2_CPU}}

# §4 "just one layer ... (Layer 4) of an 8-layer Mamba": layer index 3 of 8; at cpu scale, the last of 2
EIGHT = sourced("§4 'just one layer ... (Layer 4) of an 8-layer Mamba'", n_layers=8)
TWO = sourced("ours: the main job's 2 layers, the special layer last", n_layers=MAIN.n_layers)
ONE_LAYER = "§4 'one mimetic init is all you need': mimetic init of the special layer only"
HYBRID = "§4, Fig. 2: softmax attention as the special layer (the control)"


def special_layer(target, depth, extra=()):
    """Fig. 2 and 4's choices for a special layer `target` of `depth`: default, mimetic init of it, attention."""
    hybrid = "M" * target + "A" + "M" * (depth - target - 1)
    return {"default": {}, **axis(ONE_LAYER, {f"mimetic_l{target}": dict(mimetic=True, mimetic_layers=[target])}),
            **axis(HYBRID, {"hybrid": dict(pattern=hybrid)}), **dict(extra)}


ALL_LAYERS = axis("ours, extra: mimetic init of every layer", {"mimetic_all": dict(mimetic=True)})
ABLATION = axis("Fig. 3: the 16 on/off combinations of A, Δ, W_CᵀW_B and conv",
                {"+".join(parts) or "none": dict(mimetic_parts=list(parts))
                 for parts in ([p for i, p in enumerate(("A", "dt", "bc", "conv")) if mask >> i & 1]
                               for mask in range(16))})
LONG_EVAL_PAPER = sourced("ours: a range of lengths for Fig. 7's area under accuracy vs length",
                          eval_lens=[50, 100, 150, 200, 250, 300, 400, 500])
LONG_EVAL_CPU = sourced("ours: a range of lengths for Fig. 7's area under accuracy vs length",
                        eval_lens=[16, 24, 32, 48, 64, 96, 128])
FOUR_LAYERS = sourced("§4 'a small 4-layer Mamba'", n_layers=4)
TWO_MAIN = sourced(MAIN_JOB, n_layers=MAIN.n_layers)
SIZE = "Fig. 8: width × depth; the paper does not list its sizes: ours"
SIZES_CPU = ("d64_L1", "d64_L2", "d64_L4", "d32_L2", "d128_L2")  # a cross of widths at depth 2, depths at width 64
VOCAB = "Fig. 6: vocabulary size; the paper does not list its vocabularies: ours, from the pipeline's 26 up"
LONG = "Fig. 9: training length (the paper: copying ~4000, MQAR ~1800); ours: evaluated at 1× and 2×"
HUB_COPY = sourced(f"{PIPELINE}: the letters a-z", vocab_size=26)
HUB_MQAR = sourced("ours: 8 pairs in 48 tokens of a-z, A-Z, 0-9 (the paper: '50-character strings')",
                   vocab_size=62, train_len=8, eval_lens=[8, 16], mqar_tokens_per_pair=6)
PRETRAINED = axis("§6, Fig. 10: a pretrained 130M Mamba ('state-spaces/mamba-130m-hf') fine-tuned",
                  {"pretrained": dict(pretrained="state-spaces/mamba-130m-hf")})
SCRATCH = {"scratch_mimetic": {**MAMBA1, **sourced("§6, Fig. 10: the same size (24 layers, d_model 768, N 16) from "
                                                  "scratch with mimetic init", d_state=16, d_model=768, n_layers=24,
                                                  mimetic=True)}}
MAMBA41 = {**MAMBA1, **sourced("Mamba paper §4.1: a 2-layer Mamba 1, d_model 64, N 16, 16 tokens", n_layers=2,
                               d_model=64, d_state=16, vocab_size=16),
           **sourced("ours: one example per row", pack=0)}


def mamba41(selective, induction, induction_eval):
    src = "Mamba paper §4.1 " + ("(its lengths)" if selective == 4096 else "(ours: shorter sequences for a CPU)")
    return {"selective_copy": sourced(src, task="selective_copy", min_train_len=None, train_len=selective),
            "induction": sourced(src, task="induction", min_train_len=None, train_len=induction,
                                 eval_lens=induction_eval)}


def plot_command(out, configs, *flags):
    return " ".join(["python -m experiments.sweep plot", *(f"{out}/{name}" for name in configs), *flags])


# ----------------------------------------------------------------------------------------------------
# The figures

PRESETS = {
    "fig1": Preset(
        "Fig. 1", "§4 'mimetic initialization allows a small 4-layer Mamba to learn to copy strings with twice the "
        "training length'; Mamba 1 and 2, default vs mimetic on every layer",
        paper=Scale({**PAPER_COPY, **FOUR_LAYERS}, cross(MAMBAS["paper"], INITS),
                    plot="python -m experiments.sweep plot results/fig1_paper_lr1e-3/mamba2_default/seed0 "
                         "results/fig1_paper_lr1e-3/mamba2_mimetic/seed0 results/fig1_paper_lr1e-3/mamba2_default/seed1 "
                         "results/fig1_paper_lr1e-3/mamba2_mimetic/seed1 --metric token_acc "
                         "--out figures/paper_fig1_first_steps.png"),
        cpu=Scale({**CPU_COPY, **TWO_MAIN}, cross(MAMBAS["cpu"], INITS),
                  plot=plot_command("runs/fig1_cpu", ("mamba1_default", "mamba1_mimetic", "mamba2_default",
                                                      "mamba2_mimetic"), "--out figures/cpu_fig1_copy.png"))),
    "fig2": Preset(
        "Fig. 2", "§4: an 8-layer Mamba 2 with softmax attention as layer 4, vs mimetic init of that layer only "
        "('one mimetic init is all you need?'), vs default",
        paper=Scale({**PAPER_COPY, **MAMBA2, **EIGHT}, special_layer(3, 8)),
        cpu=Scale({**CPU_COPY, **MAMBA2_CPU, **TWO}, special_layer(1, 2), note="layer 2 of 2",
                  plot=plot_command("runs/fig2_cpu", ("default", "mimetic_l1", "hybrid"),
                                    "--out figures/cpu_fig2_hybrid.png"))),
    "fig3": Preset(
        "Fig. 3", "the 16 on/off combinations of A, Δ, W_CᵀW_B and conv for Mamba 1 and 2; add --cs 2,4,8 to sweep "
        "c as §3 did", alias="ablation",
        paper=Scale({**PAPER_COPY, **sourced("Fig. 3 'a 24-layer Mamba with hidden size 1024', strings of 50, "
                                             "evaluated at 100 and 300, '10 seeds'", n_layers=24,
                                             eval_lens=[50, 100, 300], seeds=list(range(10)))},
                    cross(MAMBAS["paper"], ABLATION), note="24 layers, evaluated at 100 and 300, 10 seeds"),
        cpu=Scale({**CPU_COPY, **sourced("ours: 2000 steps, evaluated at 2× and 6× as the paper's 100 and 300",
                                         steps=2000, eval_lens=[16, 32, 96])},
                  cross(MAMBAS["cpu"], ABLATION), note="2000 steps, evaluated at 2× and 6× as the paper's 100 and 300",
                  plot=plot_command("runs/ablation_cpu", cross(MAMBAS["cpu"], ABLATION), "--final --metric token_acc",
                                    "--out figures/cpu_fig3_ablation.png"))),
    "fig4": Preset(
        "Fig. 4", "stack-order copy, MQAR and sorting (vocab 512, no repeats), 8-layer Mamba 2: default, mimetic "
        "init of layer 4 only, the attention hybrid, and (ours, extra) mimetic init of every layer", alias="tasks",
        paper=Scale({**PAPER_COPY, **MAMBA2, **EIGHT},
                    cross({"stack": sourced("Fig. 4: stack order", task="stack"),
                           "sort": sourced("Fig. 4: sorting, 'vocab 512'", task="sort", vocab_size=512),
                           "mqar": PAPER_MQAR}, special_layer(3, 8, ALL_LAYERS))),
        cpu=Scale({**CPU_COPY, **MAMBA2_CPU, **TWO},
                  cross({"stack": sourced("Fig. 4: stack order", task="stack"),
                         "sort": sourced("Fig. 4: sorting, 'vocab 512'", task="sort", vocab_size=512),
                         "mqar": CPU_MQAR}, special_layer(1, 2, ALL_LAYERS)), note="layer 2 of 2",
                  plot=plot_command("runs/tasks_cpu", ("mqar_default", "mqar_mimetic_l1"),
                                    "--out figures/cpu_fig4_mqar.png"))),
    "fig5": Preset(
        "Fig. 5", "layer 4 of an 8-layer Mamba 2 (the others default, N = 128) is causal linear attention with head "
        "dim 8 / 32 / 1024, or mimetic Mamba 2 with N = 32 / 64. Mamba 2 because Mamba 1 always has N = 32 (§5) and "
        "this figure varies N; the configs differ in that one layer only", alias="linattn",
        paper=Scale({**PAPER_COPY, **MAMBA2, **EIGHT, **sourced("Fig. 5: evaluated at 50-200", eval_lens=[50, 100, 200])},
                    {**axis("Fig. 5: linear attention as layer 4, head dim 8 / 32 / 1024",
                            {f"linear{k}": dict(pattern="MMMLMMMM", linear_head_dim=k) for k in (8, 32, 1024)}),
                     **axis("Fig. 5: mimetic Mamba 2 as layer 4 with N = 32 / 64",
                            {f"mamba_N{n}_mimetic_l3": dict(mimetic=True, mimetic_layers=[3], layer_d_state={3: n})
                             for n in (32, 64)})}),
        cpu=Scale({**CPU_COPY, **MAMBA2_CPU, **TWO, **sourced("ours: 1×, 2×, 4×", eval_lens=[16, 32, 64])},
                  {**axis("Fig. 5: linear attention as layer 2, head dim 8 / 32 / 1024",
                          {f"linear{k}": dict(pattern="ML", linear_head_dim=k) for k in (8, 32, 1024)}),
                   **axis("Fig. 5: mimetic Mamba 2 as layer 2 with N = 32 / 64",
                          {f"mamba_N{n}_mimetic_l1": dict(mimetic=True, mimetic_layers=[1], layer_d_state={1: n})
                           for n in (32, 64)})}, note="layer 2 of 2",
                  plot=plot_command("runs/linattn_cpu", ("linear8", "linear32", "linear1024", "mamba_N32_mimetic_l1",
                                                         "mamba_N64_mimetic_l1"), "--final --metric token_acc",
                                    "--out figures/cpu_fig5_linattn.png"))),
    "fig6": Preset(
        "Fig. 6", "vocabulary size, Mamba 1 and 2, default vs mimetic (the paper does not list its vocabularies: "
        "ours, from the pipeline's 26 up)", alias="vocab",
        paper=Scale({**PAPER_COPY, **FOUR_LAYERS},
                    cross(MAMBAS["paper"], axis(VOCAB, {f"V{v}": dict(vocab_size=v) for v in (26, 128, 512, 2048)}),
                          INITS)),
        cpu=Scale({**CPU_COPY, **TWO_MAIN},
                  cross(MAMBAS["cpu"], axis(VOCAB, {f"V{v}": dict(vocab_size=v) for v in (16, 64, 256, 1024)}), INITS),
                  plot="cp runs/vocab_cpu/summary_vocab_size.png figures/cpu_fig6_vocab.png")),
    "fig7": Preset(
        "Fig. 7", "Mamba 2 state size N = 16 … 512, default vs mimetic, evaluated over a range of lengths for the "
        "area under accuracy vs length and the longest length above 99%", alias="statesize",
        paper=Scale({**PAPER_COPY, **MAMBA2, **FOUR_LAYERS, **LONG_EVAL_PAPER},
                    cross(axis("Fig. 7: state size N = 16 … 512", {f"N{n}": dict(d_state=n)
                                                                  for n in (16, 32, 64, 128, 256, 512)}), INITS)),
        cpu=Scale({**CPU_COPY, **MAMBA2_CPU, **TWO_MAIN, **LONG_EVAL_CPU},
                  cross(axis("Fig. 7: state size N = 16 … 512", {f"N{n}": dict(d_state=n)
                                                                for n in (16, 32, 64, 128, 256, 512)}), INITS),
                  plot="cp runs/statesize_cpu/summary_state_size.png figures/cpu_fig7_statesize.png")),
    "fig8": Preset(
        "Fig. 8", "width × depth on copy (Mamba 1 and 2) and MQAR (Mamba 2), default vs mimetic ('a mere two layers "
        "seems to be sufficient'); the paper does not list its sizes: ours", alias="size",
        paper=Scale(PAPER_COPY, cross({"copy_mamba1": MAMBA1, "copy_mamba2": MAMBA2, "mqar_mamba2": {**MAMBA2,
                                                                                                   **PAPER_MQAR}},
                                      axis(SIZE, {f"d{d}_L{n}": dict(d_model=d, n_layers=n)
                                                  for d in (256, 512, 1024) for n in (2, 4, 8)}), INITS)),
        cpu=Scale(CPU_COPY, cross({"copy_mamba1": MAMBA1, "copy_mamba2": MAMBA2_CPU,
                                   "mqar_mamba2": {**MAMBA2_CPU, **CPU_MQAR}},
                                  axis(SIZE, {f"d{d}_L{n}": dict(d_model=d, n_layers=n)
                                              for d, n in ((64, 1), (64, 2), (64, 4), (32, 2), (128, 2))}), INITS),
                  note="a cross of widths at depth 2 and depths at width 64",
                  plot=plot_command("runs/size_cpu", [f"copy_mamba2_{size}_{init}" for size in SIZES_CPU
                                                      for init in ("default", "mimetic")]
                                    + [f"copy_mamba1_{size}_{init}" for size in ("d64_L1", "d64_L2")
                                       for init in ("default", "mimetic")], "--final --out figures/cpu_fig8_size.png")
                  + "\n" + plot_command("runs/size_cpu", [f"mqar_mamba2_{size}_{init}" for size in SIZES_CPU
                                                         for init in ("default", "mimetic")],
                                         "--final --out figures/cpu_fig8_size_mqar.png"))),
    "fig9": Preset(
        "Fig. 9", "a 2-layer Mamba 2 trained on long strings (the paper: copying ~4000, MQAR ~1800) and on MQAR "
        "with many pairs, default vs mimetic; one example per row (the pipeline's 220-token rows cannot hold them)",
        alias="long",
        paper=Scale({**PAPER_COPY, **MAMBA2, **sourced("Fig. 9: 'a 2-layer Mamba'", n_layers=2),
                     **sourced("ours: one example per row, 8 of them", pack=0, batch_size=8)},
                    {**cross({"copy": {}}, axis(LONG, {str(n): dict(train_len=n, eval_lens=[n, 2 * n])
                                                       for n in (500, 1000, 2000, 4000)}), INITS),
                     **cross({"mqar": PAPER_MQAR}, axis(LONG, {str(n): dict(train_len=n, eval_lens=[n, 2 * n])
                                                               for n in (16, 32, 64, 128)}), INITS)},
                    note="d_model 1024"),
        cpu=Scale({**CPU_COPY, **MAMBA2_CPU, **sourced("Fig. 9: 'a 2-layer Mamba'", n_layers=2),
                   **sourced("ours: one example per row", pack=0)},
                  {**cross({"copy": {}}, axis(LONG, {str(n): dict(train_len=n, eval_lens=[n, 2 * n])
                                                     for n in (16, 32, 64, 128)}), INITS),
                   **cross({"mqar": {**CPU_MQAR, **sourced("ours: room for 64 distinct keys", vocab_size=1024)}},
                           axis(LONG, {str(n): dict(train_len=n, eval_lens=[n, 2 * n]) for n in (8, 16, 32, 64)}),
                           INITS)},
                  note="d_model 64",
                  plot="cp runs/long_cpu/summary_train_len.png figures/cpu_fig9_long.png")),
    "fig10": Preset(
        "Fig. 10", "§6: a pretrained 130M Mamba (24 layers, d_model 768, N 16) fine-tuned to copy and for MQAR, vs "
        "the same size trained from scratch with mimetic init; needs the model hub. MQAR: 8 pairs in 48 tokens of "
        "a-z, A-Z, 0-9 (ours; the paper: '50-character strings')", alias="pretrained",
        paper=Scale(PAPER_COPY, cross({"copy": HUB_COPY, "mqar": {**PAPER_MQAR, **HUB_MQAR}}, {**PRETRAINED, **SCRATCH})),
        cpu=Scale(CPU_COPY, cross({"copy": HUB_COPY, "mqar": {**CPU_MQAR, **HUB_MQAR}}, {**PRETRAINED, **SCRATCH}))),
    "fig11": Preset(
        "Fig. 11", "§6 'L=48, M=12': for each layer i of a pretrained 370M Mamba (48 layers), a student of 12 copies "
        "of it learns to copy; needs the model hub", alias="student",
        paper=Scale({**PAPER_COPY, **HUB_COPY, **sourced("§6, Fig. 11 'L=48, M=12': a 370M Mamba's layers, 12 copies",
                                                         pretrained="state-spaces/mamba-370m-hf", n_layers=12)},
                    axis("§6, Fig. 11: each of the teacher's 48 layers", {f"teacher_layer{i}": dict(teacher_layer=i)
                                                                         for i in range(48)})),
        cpu=Scale({**CPU_COPY, **HUB_COPY, **sourced("§6, Fig. 11 'L=48, M=12': a 370M Mamba's layers, 12 copies",
                                                     pretrained="state-spaces/mamba-370m-hf", n_layers=12)},
                  axis("§6, Fig. 11: each of the teacher's 48 layers", {f"teacher_layer{i}": dict(teacher_layer=i)
                                                                       for i in range(48)}))),
    "mamba41": Preset(
        "Mamba §4.1", "selective copying and induction heads with its 2-layer Mamba 1 (d_model 64, N 16, 16 tokens), "
        "default init",
        paper=Scale({**PAPER_COPY, **MAMBA41}, mamba41(4096, 256, [256, 1024, 4096, 16384])),
        cpu=Scale({**CPU_COPY, **MAMBA41}, mamba41(64, 64, [64, 256, 1024]), note="sequences of 64, not 256 and 4096")),
}
ALIASES = {preset.alias: name for name, preset in PRESETS.items() if preset.alias}
NAMES = (*PRESETS, *ALIASES)  # what --preset accepts


def lookup(name):
    """The Preset named `name` (a figure's name or an older alias)."""
    return PRESETS[ALIASES.get(name, name)]


def description(name, scale="paper"):
    preset = lookup(name)
    note = preset.scales[scale].note
    return f"{preset.figure}: {preset.about}" + (f"; {note}" if note else "")


def values(flags):
    return {key: value for key, (value, _) in flags.items()}


def sources(flags):
    return {key: source for key, (_, source) in flags.items()}


def presets(scale):
    """{name: (description, shared flags, {config name: flags})} at `scale`, without the sources."""
    return {name: (description(name, scale), values(p.scales[scale].shared),
                   {config: values(flags) for config, flags in p.scales[scale].configs.items()})
            for name, p in PRESETS.items()}


def config_sources(name, scale, config):
    """{flag: source} of the flags a config of the preset sets (its own over the shared ones)."""
    s = lookup(name).scales[scale]
    return {**sources(s.shared), **sources(s.configs[config])}
