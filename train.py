"""train.py — one training run: a Mamba, hybrid or attention baseline on a recall task, with or
without mimetic init.

    python train.py --task copy --mimetic   # the main job: about 2 minutes on a 2-core CPU
    python train.py --task copy             # the same model with the default init, for contrast

A run folder gets config.json, metrics.jsonl / .csv (a row per eval), checkpoint.pt (every
--checkpoint-every steps and at the end), accuracy.png, attention_init/final.png (each layer's
attention map and mask ∏Ā, §2 of Trockman et al. 2024) and report_init/final.json (how mimetic each
Mamba layer is). The same command resumes an unfinished run; Ctrl-C or SIGTERM stops at the next
step boundary and writes it all; a loss that turns NaN or Inf marks the run failed.

The defaults (Config, below) are the CPU main job: a 2-layer Mamba 2 (d_model 64, N 128, head dim
32) copying strings of 2–16 of 64 tokens for 4000 steps, evaluated at 16, 32 and 64. The paper's
figures, grids, torchrun, eval, plot: `python -m experiments.sweep --help`. This file, top to
bottom: Config → model, optimizer, batches → checkpoints → the training loop → main.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (read once, as torch loads): with spinning, a step
# on 2 threads while another process keeps one core busy was 16-40× slower than on 1
# (experiments/bench.py --only threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
import torch.nn.functional as F

import mimetic
from experiments import figures, pipeline
from experiments.runtime import (StopRequest, append_metrics, default_threads, fail,
                                 load_checkpoint, print_table, save_checkpoint, write_metrics)
from mimetic import (ARCHS, COPY_TASKS, LM, METRICS, TASKS, ModelConfig, evaluate, format_report,
                     make_batch, mimetic_init_, mimetic_report, task_vocab_size)

PARTS = ("A", "dt", "bc", "conv")


# --------------------------------------------------------------------------------------------------
# Config: every setting of one run and its default, in one place. The command line is made from it
# (a field `d_state` is the flag --d-state), presets override it, and a run folder's config.json is
# it, resolved.

def int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def part_list(text):
    return [p.strip() for p in text.split(",") if p.strip()]


def layer_states(text):
    """'3:32,5:64' → {3: 32, 5: 64}"""
    items = (item.split(":") for item in text.split(",") if item.strip())
    return {int(i): int(n) for i, n in items}


def option(default, help, parse=None, choices=None):
    """A Config field and its flag's help, parser (default: the default's type; bool: a switch) and
    choices."""
    metadata = dict(help=help, parse=parse or type(default), choices=choices)
    return field(default=default, metadata=metadata)


@dataclass
class Config:
    """One run. Fields left None are filled in by resolve_config (from the arch, the task or the
    device)."""
    # the task and the model
    task: str = option("copy", "recall task", choices=TASKS)
    arch: str = option("mamba2", "layer type of every layer (mimetic.ARCHS): mamba1, mamba2, "
                       "attention (softmax), linear (attention), ...",
                       choices=ARCHS.keys())  # a live view: entries added later are choices too
    pattern: str | None = option(None, "a hybrid's letter per layer: M Mamba, A attention, "
                                 "L linear", str)
    mimetic: bool = option(False, "mimetic init with the paper's parts for the arch: A, dt, bc "
                           "(+ conv for mamba2)")
    mimetic_parts: list | None = option(None, "only these of A,dt,bc,conv (implies --mimetic)",
                                        part_list)
    mimetic_layers: list | None = option(None, "only these layers, 0-based (default: every Mamba)",
                                         int_list)
    c: float = option(8.0, "mimetic A reparameterization A = -exp(-c·A_log)")
    d_model: int = option(64, "model width")
    n_layers: int = option(2, "number of layers")
    d_state: int | None = option(None, "state size N (default: mimetic.ModelConfig's for the arch, "
                                 "§5: mamba1 32, mamba2 128)", int)
    layer_d_state: dict | None = option(None, "state sizes of particular layers, e.g. 1:32 "
                                        "(Fig. 5)", layer_states)
    headdim: int = option(32, "mamba2 head dimension (ours: 4 heads at width 64; the paper's, in "
                          "mimetic.ARCHS: 64)")
    expand: int | None = option(None, "Mamba inner width / d_model (default: "
                                "mimetic.ModelConfig's, 2)", int)
    n_heads: int = option(1, "heads of attention / linear attention layers")
    linear_head_dim: int = option(32, "query/key features per head of linear attention layers")
    vocab_size: int = option(64, "number of content tokens of the task (the LM adds the task's "
                             "special tokens)")
    train_len: int = option(16, "task length used for training (copy: string length; mqar: "
                            "key-value pairs)")
    min_train_len: int | None = option(None, "lengths are drawn from [this, train_len] per batch "
                                       "(--pack: per example); default: 2 for copy, stack, sort, "
                                       "else train_len", int)
    mqar_tokens_per_pair: int = option(6, "mqar sequence length per key-value pair (zoology's "
                                       "configs: 16)")
    pretrained: str | None = option(None, "train (fine-tune) a transformers Mamba LM, a hub id or "
                                    "a folder, instead of ours (§6, Fig. 10); the size flags then "
                                    "do not apply", str)
    teacher_layer: int | None = option(None, "with --pretrained: a student of --n-layers copies of "
                                       "this teacher layer (Fig. 11)", int)
    pack: int = option(0, "Jelassi et al.'s rows: examples BOS x SEP y STOP packed into this many "
                       "tokens, lengths drawn per example (their --context_len 220); 0: one "
                       "example per row (copy, stack, sort only)")
    reset_state: bool = option(False, "with --pack: a fresh Mamba state and conv at each BOS, as "
                               "if each example ran alone (mamba_ssm's seq_idx; the pipeline's "
                               "rows share state)")
    eval_lens: list | None = option(None, "eval lengths (default: 1×, 2× and 4× the train length)",
                                    int_list)
    # the optimizer and its schedule
    steps: int = option(4000, "optimizer steps")
    batch_size: int = option(32, "training batch size (rows)")
    lr: float = option(3e-3, "peak learning rate")
    schedule: str = option("cosine", "linear warmup, then cosine (ours) or linear (Jelassi et "
                           "al.'s) decay to 0", choices=("cosine", "linear"))
    warmup: int = option(100, "warmup steps")
    weight_decay: float = option(0.1, "AdamW weight decay")
    weight_decay_on: str = option("matrices", "matrices: not on 1-D or _no_weight_decay params, as "
                                  "mamba_ssm; all: every one, as Jelassi et al.",
                                  choices=("matrices", "all"))
    beta2: float = option(0.95, "AdamW β2 (β1 = 0.9; the pipeline: torch's default 0.999)")
    grad_clip: float = option(1.0, "gradient norm clip (0: off)")
    # the loop
    stop_at: int | None = option(None, "pause at this step with --steps' schedule intact; the same "
                                 "command with a larger --stop-at, or without it, goes on", int)
    eval_every: int = option(250, "evaluate every this many steps (and at the end)")
    eval_batches: int = option(4, "batches of 64 examples per eval length")
    checkpoint_every: int = option(1000, "write checkpoint.pt every this many steps (and at the "
                                   "end)")
    seed: int = option(0, "random seed")
    # the machine: may differ between the run that wrote a checkpoint and the one that resumes it
    device: str = option("auto", "auto, cpu or cuda (under torchrun: process k on GPU k mod the "
                         "number of GPUs)", choices=("auto", "cpu", "cuda"))
    dtype: str = option("fp32", "fp32 or bf16 (bf16 autocast of the forward pass; the scans "
                        "compute in fp32)", choices=("fp32", "bf16"))
    scan_backend: str = option("auto", "scans: auto (Triton for Mamba 1 on CUDA once a self-check "
                               "passes, else PyTorch), triton or torch",
                               choices=("auto", "triton", "torch"))
    no_tf32: bool = option(False, "CUDA: fp32 matmuls without TF32 (default: TF32 on)")
    sync_every: int | None = option(None, "read the loss (a GPU sync) and check it for NaN/Inf "
                                    "every this many steps (default: 1 on CPU, 10 on CUDA)", int)
    threads: int | None = option(None, "torch.set_num_threads (default: 1 under 1M parameters, "
                                 "else the cores no other process keeps busy, shared among "
                                 "torchrun's)", int)
    # not a flag: the scan backends the run used (a Triton launch that fails falls back to PyTorch)
    scan_backends: dict | None = field(default=None, metadata=dict(help=None))


FLAGS = [f for f in fields(Config) if f.metadata["help"]]
RUN_ONLY = ("threads", "device", "stop_at", "scan_backend", "scan_backends", "no_tf32",
            "sync_every")  # the machine's: check_same_run lets them differ


def add_flags(parser, flags=FLAGS, with_defaults=True):
    """A --flag per field; without defaults, args hold only the flags typed (they override
    presets)."""
    for f in flags:
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        default = f.default if with_defaults else argparse.SUPPRESS
        if f.metadata["parse"] is bool:
            parser.add_argument(flag, action="store_true", help=help_text, default=default)
        else:
            parser.add_argument(flag, type=f.metadata["parse"], choices=f.metadata["choices"],
                                help=f"{help_text} (default: {f.default})", default=default)
    return parser


def build_parser():
    head, _, tail = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=head, epilog=tail,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="run folder (default: runs/<task>_<arch>_<init>_s<seed>)")
    return add_flags(parser)


POSITIVE = ("train_len", "steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every",
            "d_model", "n_layers", "vocab_size", "mqar_tokens_per_pair", "lr")


def resolve_config(config):
    """One run's Config from a dict of flags (the rest take their defaults, other keys are ignored):
    the fields left None filled in, the combinations checked (ValueError naming the problem)."""
    cfg = Config(**{f.name: config[f.name] for f in fields(Config) if f.name in config})
    if (letter := ARCHS[cfg.arch].letter) != "M":  # attention (A), linear (L), ...: as hybrids
        cfg.pattern = cfg.pattern or letter * cfg.n_layers
    cfg.n_layers = len(cfg.pattern) if cfg.pattern else cfg.n_layers
    if cfg.mimetic_parts is not None:
        if bad := [p for p in cfg.mimetic_parts if p not in PARTS]:
            raise ValueError(f"unknown --mimetic-parts {bad}; choose from {','.join(PARTS)}")
        cfg.mimetic = bool(cfg.mimetic_parts)
    cfg.mimetic = cfg.mimetic or cfg.mimetic_layers is not None
    if cfg.mimetic and cfg.pattern and "M" not in cfg.pattern:
        raise ValueError(f"mimetic init needs Mamba layers, but pattern {cfg.pattern} has none")
    cfg.eval_lens = cfg.eval_lens or [cfg.train_len, 2 * cfg.train_len, 4 * cfg.train_len]
    if cfg.stop_at is not None and cfg.stop_at <= 0:
        raise ValueError(f"--stop-at must be a positive step, got {cfg.stop_at}")
    for name in POSITIVE:
        if getattr(cfg, name) <= 0:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be positive, got {getattr(cfg, name)}")
    if cfg.min_train_len is None:  # a range of lengths teaches copying by content, not by position
        cfg.min_train_len = min(2, cfg.train_len) if cfg.task in COPY_TASKS else cfg.train_len
    if not 0 < cfg.min_train_len <= cfg.train_len:
        raise ValueError(f"--min-train-len must be in [1, --train-len={cfg.train_len}], got "
                         f"{cfg.min_train_len}")
    if min(cfg.eval_lens) <= 0:
        raise ValueError(f"--eval-lens must be positive lengths, got {cfg.eval_lens}")
    pipeline.check(cfg)  # --pack, --pretrained
    for length in {cfg.min_train_len, cfg.train_len, *cfg.eval_lens}:
        try:  # the task's own limits, e.g. mqar's distinct keys: fail now, not at the first eval
            make_batch(cfg.task, 1, length, vocab_size=cfg.vocab_size,
                       seq_len=mqar_seq_len(cfg, length))
        except ValueError as e:
            raise ValueError(f"{cfg.task} at length {length} with --vocab-size {cfg.vocab_size}: "
                             f"{e}") from None
    # The model's sizes left None are its config's: mimetic.ModelConfig fills them from the arch's
    # entry in ARCHS and checks them (pattern, layer_d_state, ...). --pretrained brings its own
    # model, so there only the fill.
    if cfg.pretrained:
        model = ModelConfig(arch=cfg.arch, d_state=cfg.d_state, headdim=cfg.headdim,
                            expand=cfg.expand)
    else:
        model = ModelConfig(**model_config_kwargs(cfg))
    cfg.d_state, cfg.headdim, cfg.expand = model.d_state, model.headdim, model.expand
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device found; use --device cpu or auto")
    cfg.sync_every = cfg.sync_every or (10 if cfg.device.startswith("cuda") else 1)
    return cfg


def mqar_seq_len(cfg, length, task=None):
    """make_batch's seq_len at `length`: for MQAR, pairs × tokens per pair (zoology's); else
    None."""
    return cfg.mqar_tokens_per_pair * length if (task or cfg.task) == "mqar" else None


def run_name(cfg):
    arch = cfg.arch
    if ARCHS[cfg.arch].letter == "M" and cfg.pattern:  # a hybrid
        arch = f"{cfg.arch}-{cfg.pattern}"
    if cfg.pretrained:
        arch = f"pretrained-{Path(cfg.pretrained).name}"
        if cfg.teacher_layer is not None:
            arch += f"-student{cfg.n_layers}xl{cfg.teacher_layer}"
    init = "default"
    if cfg.mimetic:
        init = "mimetic" + (f"-{'+'.join(cfg.mimetic_parts)}" if cfg.mimetic_parts else "")
        init += f"-l{'+'.join(map(str, cfg.mimetic_layers))}" if cfg.mimetic_layers else ""
    return f"{cfg.task}_{arch}_{init}"


# --------------------------------------------------------------------------------------------------
# Model, optimizer, schedule, batches

def model_config_kwargs(cfg):
    model_fields = ("d_model", "n_layers", "arch", "pattern", "d_state", "expand", "headdim",
                    "n_heads", "linear_head_dim", "layer_d_state")  # Config's mimetic.ModelConfig's
    vocab_size = task_vocab_size(cfg.task, cfg.vocab_size) + (1 if cfg.pack else 0)  # + BOS
    return dict(vocab_size=vocab_size, **{k: getattr(cfg, k) for k in model_fields})


def build_model(cfg):
    """LM for the config (or --pretrained's model), mimetic-initialized as asked (conv follows the
    paper's per-arch choice unless --mimetic-parts names it)."""
    if cfg.pretrained:
        model = pipeline.Pretrained(cfg)
    else:
        model = LM(ModelConfig(**model_config_kwargs(cfg)))
    if cfg.mimetic:
        if cfg.mimetic_parts:
            parts = {p: p in cfg.mimetic_parts for p in PARTS}
        else:
            parts = dict(A=True, dt=True, bc=True, conv=None)  # conv None: the paper's for the arch
        mimetic_init_(model, c=cfg.c, layers=cfg.mimetic_layers, **parts)
    return model


def build_optimizer(model, cfg):
    """AdamW (β1 0.9, β2 --beta2) with weight decay on --weight-decay-on parameters; linear warmup,
    then cosine or linear decay to 0 at --steps."""
    decay, no_decay = [], []
    for p in model.parameters():
        matrix = p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)
        (decay if cfg.weight_decay_on == "all" or matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2))

    def lr_factor(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        if cfg.schedule == "linear":
            return 1 - progress
        return 0.5 * (1 + math.cos(math.pi * progress))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def training_batch(cfg, g):
    """One batch: with --pack, Jelassi et al.'s packed rows; else batch_size examples of one length
    drawn from [min_train_len, train_len]."""
    if cfg.pack:
        return pipeline.packed_batch(cfg, g)
    length = int(torch.randint(cfg.min_train_len, cfg.train_len + 1, (), generator=g))
    return make_batch(cfg.task, cfg.batch_size, length, vocab_size=cfg.vocab_size, generator=g,
                      seq_len=mqar_seq_len(cfg, length))


def next_batch(cfg, batches, device):
    """(the generator's state before it, the next training batch on the device). The batch is built
    a step ahead, while the GPU works; until it trains, a checkpoint keeps that state."""
    state = batches.get_state()
    return state, tuple(t.to(device) for t in training_batch(cfg, batches))


def evaluate_lengths(model, cfg, device, lens=None, task=None):
    """{length: evaluate(...)} on fixed held-out batches (seed 1) at each eval length (BOS first
    for --pack)."""
    task, bos = task or cfg.task, task_vocab_size(cfg.task, cfg.vocab_size)
    model = pipeline.WithBOS(model, bos) if cfg.pack else model
    return {n: evaluate(model, task, n, vocab_size=cfg.vocab_size, n_batches=cfg.eval_batches,
                        device=device, generator=torch.Generator().manual_seed(1),
                        seq_len=mqar_seq_len(cfg, n, task))
            for n in lens or cfg.eval_lens}


def example_inputs(cfg, length=None, seed=0, task=None):
    """The one example the attention maps show (BOS-prefixed for --pack runs): (1, T)."""
    task, length = task or cfg.task, length or cfg.train_len
    inputs, _ = make_batch(task, 1, length, vocab_size=cfg.vocab_size,
                           seq_len=mqar_seq_len(cfg, length, task),
                           generator=torch.Generator().manual_seed(seed))
    bos = task_vocab_size(cfg.task, cfg.vocab_size)
    return torch.cat([torch.tensor([[bos]]), inputs], dim=1) if cfg.pack else inputs


# --------------------------------------------------------------------------------------------------
# Checkpoints: everything a resumed run needs to go on as if it had never stopped (runtime.py writes
# them atomically, keeping the previous one until the next is on disk)

@dataclass
class Progress:
    """How far a run has got. Its checkpoint keeps it, so a resumed run goes on counting."""
    step: int = 0
    loss_sum: float = 0.0  # the training losses read since the last metrics row, and how many
    loss_count: int = 0
    train_time: float = 0.0  # seconds in training steps, over every process that trained the run
    wall_time: float = 0.0  # seconds in all, up to the checkpoint
    tokens: int = 0
    rows: list = field(default_factory=list)  # the metrics rows so far (metrics.jsonl)


def checkpoint(out, cfg, progress, started, model, opt, schedule, batch_state):
    """Save the run to out/checkpoint.pt; batch_state: the batch generator's state before the first
    batch not yet trained."""
    run = replace(progress, wall_time=time.time() - started)
    save_checkpoint(out, dict(model=model.state_dict(), optimizer=opt.state_dict(),
                              schedule=schedule.state_dict(), batches=batch_state,
                              rng=torch.get_rng_state(), config=asdict(cfg), run=asdict(run)))


def resume(out, cfg, model, opt, schedule, batches):
    """Load the run folder's last checkpoint into the model, optimizer, schedule, batch generator
    and torch's RNG; its Progress, or None when there is none (or the run is done)."""
    saved = load_checkpoint(out) if not (out / "done").exists() else None
    if saved is None:
        return None
    check_same_run(saved["config"], cfg, out)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    batches.set_state(saved["batches"])
    torch.set_rng_state(saved["rng"])
    return Progress(**saved["run"])


def check_same_run(saved, cfg, out):
    """ValueError unless the config saved in a run folder (its checkpoint's, or its config.json) is
    this one, the machine aside."""
    # both as config.json holds them, where --layer-d-state's {1: 8} reads back as {"1": 8}
    as_json = lambda config: json.loads(json.dumps(config))
    here = as_json(asdict(cfg))
    saved = as_json({**asdict(Config()), **saved})  # a flag added since: trained with its default
    if diff := [k for k in here if k not in RUN_ONLY and saved.get(k) != here[k]]:
        details = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} there, {here[k]} here"
                            for k in diff[:3])
        raise ValueError(f"{out} holds a run of another config ({details}); use another --out or "
                         "delete it")


# --------------------------------------------------------------------------------------------------
# The training loop, and the helpers around it

def build_run(cfg):
    """(device, model, optimizer, schedule, batch generator) of a run at step 0: the model seeded by
    --seed and mimetic-initialized as asked, the threads set for its size."""
    device = setup_device(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's, on this machine
    torch.set_num_threads(cfg.threads or default_threads(n_params, local_processes))
    opt, schedule = build_optimizer(model, cfg)
    batches = torch.Generator().manual_seed(cfg.seed)  # the training batches' own random stream
    return device, model, opt, schedule, batches


def train_step(model, opt, schedule, cfg, inputs, targets):
    """One optimizer step on a batch: the forward (under bf16 autocast with --dtype bf16; with
    --reset-state, each packed example from a fresh state), the loss, backward, clip, AdamW and the
    schedule. Returns the loss, still on the device (reading it waits for the GPU)."""
    new_example = pipeline.example_starts(cfg, inputs) if cfg.reset_state else None
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
        logits = model(inputs) if new_example is None else model(inputs, new_example)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    schedule.step()
    return loss.detach()


class Diverged(RuntimeError):
    """The loss became NaN or Inf."""


def train(cfg, out=None):
    """Train one run of a resolved Config; with a folder `out`, write the run folder there,
    checkpoint every --checkpoint-every steps and resume from its last checkpoint. Returns the final
    metrics row (also when paused by --stop-at). Raises Diverged when the loss turns NaN or Inf, and
    KeyboardInterrupt when stopped early, after writing the outputs."""
    cfg = replace(cfg)  # a copy: the run notes its scan backends in it
    out = Path(out) if out else None
    device, model, opt, schedule, batches = build_run(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    progress = resume(out, cfg, model, opt, schedule, batches) if out else None
    resumed = progress is not None
    if resumed:
        print(f"resuming {out} from step {progress.step}", flush=True)
    progress = progress or Progress()
    started = time.time() - progress.wall_time  # its start, as if it had never stopped

    # the start: what trains where, config.json, and (unless resumed) the init's maps, report, row
    backends = ", ".join(f"{k} {v}" for k, v in cfg.scan_backends.items())
    print(f"{run_name(cfg)}: {n_params / 1e3:.1f}k parameters on {device} ({cfg.dtype}; scan "
          f"backends: {backends})", flush=True)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        write_config(out, cfg)
        for name in ("done", "failed"):
            (out / name).unlink(missing_ok=True)
        write_metrics(out, progress.rows, cfg.eval_lens)  # resumed: drops rows after the checkpoint
    if not resumed:
        if out:
            plot_attention(model, cfg, device, "at init", out / "attention_init.png")
        report(model, cfg, device, "at init", out and out / "report_init.json")
    if not progress.rows:  # the init point of the accuracy curves
        progress.rows.append(metrics_row(model, cfg, device, progress, started))
        append_metrics(out, progress.rows[-1], cfg.eval_lens)

    # the loop: a step per batch until --steps (or --stop-at, which keeps --steps' schedule)
    stop_at = min(cfg.stop_at or cfg.steps, cfg.steps)
    batch_state, batch = next_batch(cfg, batches, device)
    losses = []  # the losses of the steps since the last read, still on the device
    failure = None  # why the run failed, if it does
    with StopRequest() as stop:  # Ctrl-C and SIGTERM set stop.requested
        while progress.step < stop_at:
            start = time.time()
            loss = train_step(model, opt, schedule, cfg, *batch)
            progress.tokens += batch[0].numel()
            batch_state, batch = next_batch(cfg, batches, device)  # as the GPU works on this step
            losses.append(loss)
            progress.step += 1
            progress.train_time += time.time() - start

            step, last = progress.step, progress.step == cfg.steps
            stopping = not last and (stop.requested or step == stop_at)
            evaluating = step % cfg.eval_every == 0 or last
            checkpointing = out and not last and (step % cfg.checkpoint_every == 0 or stopping)
            if step % cfg.sync_every == 0 or evaluating or checkpointing or stopping:
                # read the losses (on CUDA a wait for the GPU): rows and checkpoints need them
                if bad := read_losses(losses, progress):
                    lr = schedule.get_last_lr()[0]
                    failure = (f"step {bad[0]}: loss {bad[1]} at lr {lr:.3g} (peak --lr "
                               f"{cfg.lr:g}): the run diverged; try a lower --lr or a --grad-clip")
                    break
                note_scan_backends(cfg, device, out)
            if evaluating:
                progress.rows.append(metrics_row(model, cfg, device, progress, started))
                append_metrics(out, progress.rows[-1], cfg.eval_lens)
            if checkpointing:  # its rows end at the last regular eval, as an uninterrupted run's do
                checkpoint(out, cfg, progress, started, model, opt, schedule, batch_state)
            if stopping:
                break

    # the end: say why, print the final table and report, and write the final outputs
    stopped = failure is None and progress.step < cfg.steps
    paused = stopped and not stop.requested  # by --stop-at; else by Ctrl-C or SIGTERM
    final = progress.rows[-1]
    if failure:
        print(failure, flush=True)
    elif paused:
        print(f"paused at step {progress.step} of {cfg.steps} (--stop-at); the same command with a "
              "larger --stop-at, or without it, goes on", flush=True)
    elif stopped:
        print(f"interrupted at step {progress.step}; the same command resumes from there",
              flush=True)
    if stopped and final["step"] != progress.step:  # a row at the stop, which a resumed run drops
        final = metrics_row(model, cfg, device, progress, started)
    print_table(final, cfg.train_len)
    report(model, cfg, device, f"at step {progress.step}", out and out / "report_final.json")
    if out:
        if not (stopped or failure):
            checkpoint(out, cfg, progress, started, model, opt, schedule, batch_state)
            (out / "checkpoint_prev.pt").unlink(missing_ok=True)
        end = failure or (None if stopped else "finished")
        write_final_outputs(out, cfg, model, device, progress, final, end)
    if failure:
        raise Diverged(failure)
    if stopped and not paused:
        raise KeyboardInterrupt
    return final


def setup_device(cfg):
    """The run's torch.device: its GPU and TF32 set, and the scan backends chosen (noted in
    cfg.scan_backends); ValueError if the asked backend cannot run here."""
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)  # this process's GPU, where Triton launches and allocates
        torch.set_float32_matmul_precision("highest" if cfg.no_tf32 else "high")  # high: TF32
    mimetic.kernels.SCAN_BACKEND = cfg.scan_backend
    try:  # on CUDA, "auto" checks Triton here, at the first call
        cfg.scan_backends = mimetic.kernels.backends_in_use(device)
    except RuntimeError as e:  # e.g. --scan-backend triton without CUDA
        raise ValueError(f"--scan-backend {cfg.scan_backend}: {e}") from None
    return device


def read_losses(losses, progress):
    """Add the losses still on the device to progress's running sum (one wait for the GPU), and
    empty the list; (step, loss) of the first that is NaN or Inf, or None."""
    start = time.time()
    values = torch.stack(losses).tolist()
    losses.clear()
    for value in values:  # one at a time, in step order: the sums of a resumed run are the same
        progress.loss_sum += value
        progress.loss_count += 1
    progress.train_time += time.time() - start
    steps = range(progress.step - len(values) + 1, progress.step + 1)
    return next(((step, v) for step, v in zip(steps, values) if not math.isfinite(v)), None)


def note_scan_backends(cfg, device, out):
    """A Triton launch that raised has sent the scans to PyTorch: say so in the config."""
    if (now := mimetic.kernels.backends_in_use(device)) != cfg.scan_backends:
        cfg.scan_backends = now
        if out:
            write_config(out, cfg)


def write_config(out, cfg):
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))


def metrics_row(model, cfg, device, progress, started):
    """Evaluate and print a metrics row: the step, the mean training loss since the last row, times,
    and the accuracies at each eval length. Starts the next row's running loss."""
    results = evaluate_lengths(model, cfg, device)
    p = progress
    loss = p.loss_sum / p.loss_count if p.loss_count else None
    row = {"step": p.step, "loss": loss,
           "time": round(p.train_time, 2),  # training only
           "wall_time": round(time.time() - started, 2),
           "tokens_per_s": round(p.tokens / max(p.train_time, 1e-9)),
           **{metric: {str(n): r[metric] for n, r in results.items()} for metric in METRICS}}
    p.loss_sum, p.loss_count = 0.0, 0
    eta = p.train_time / max(p.step, 1) * (cfg.steps - p.step)
    accs = " | ".join(f"acc@{n} {r['exact_match']:.2f}" for n, r in results.items())
    shown_loss = "-" if loss is None else f"{loss:.3f}"
    print(f"step {p.step}/{cfg.steps} | loss {shown_loss} | {accs} | "
          f"{row['tokens_per_s'] / 1e3:.1f}k tok/s | eta {int(eta // 60)}m{int(eta % 60):02d}s",
          flush=True)
    return row


def report(model, cfg, device, when, path=None):
    """Print how mimetic each Mamba layer is (mimetic_report on the attention maps' example); save
    it to `path`, if any."""
    rows = mimetic_report(model, example_inputs(cfg).to(device))
    if rows:
        print(f"how mimetic each Mamba layer is {when}:\n{format_report(rows)}", flush=True)
    if rows and path:
        path.write_text(json.dumps(rows, indent=2))


def plot_attention(model, cfg, device, when, path):
    panels = figures.attention_panels(model, example_inputs(cfg).to(device))
    figures.plot_attention(panels, f"{run_name(cfg)} {when}", path)


def write_final_outputs(out, cfg, model, device, progress, final, end):
    """The final row (if it is a stop's, which a resumed run drops, and so not in progress.rows),
    the attention maps and accuracy curves, and `end` in out/done ("finished") or out/failed
    (why)."""
    rows = progress.rows
    if final is not rows[-1]:
        append_metrics(out, final, cfg.eval_lens)
    plot_attention(model, cfg, device, f"at step {progress.step}", out / "attention_final.png")
    shown = rows + ([final] if final is not rows[-1] else [])
    figures.plot_accuracy([(run_name(cfg), cfg.train_len, [shown])], out / "accuracy.png",
                          run_name(cfg))
    if end:
        (out / ("done" if end == "finished" else "failed")).write_text(end + "\n")


# --------------------------------------------------------------------------------------------------
# main: one run (grids of runs, and commands on finished runs: experiments/sweep.py)

def run_one(cfg, out, label):
    """Train one run into `out`, or print its table if it is finished; a user's mistake exits with
    one line."""
    print(f"{label}: 1 run into {out}")
    try:
        if (out / "done").exists():
            check_same_run(json.loads((out / "config.json").read_text()), cfg, out)
            print(f"{out} is finished (delete it to train again):")
            last_row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
            print_table(last_row, cfg.train_len)
        else:
            train(cfg, out)
    except Diverged:
        sys.exit(1)  # train() printed why
    except ValueError as e:  # e.g. a checkpoint of another config in the run folder
        fail(e)
    except KeyboardInterrupt:
        sys.exit(130)


def main(argv=None):
    """One run from the command line."""
    args = build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        fail("train.py is one run; torchrun shares a sweep's runs: "
             "torchrun ... -m experiments.sweep")
    try:
        cfg = resolve_config(vars(args))
    except ValueError as e:
        fail(e)
    run_one(cfg, Path(args.out or f"runs/{run_name(cfg)}_s{cfg.seed}"), run_name(cfg))


if __name__ == "__main__":
    main()
