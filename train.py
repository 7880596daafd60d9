"""train.py — one training run: a Mamba, hybrid or attention baseline on a recall task, with or
without mimetic init.

    python train.py --task copy --mimetic   # the main job: about 2 minutes on a 2-core CPU
    python train.py --task copy             # the same model with the default init, for contrast

A run folder gets config.json, metrics.jsonl / .csv (a row per eval), checkpoint.pt (every
--checkpoint-every steps and at the end), accuracy.png, attention_init/final.png (each layer's attention
map and mask ∏Ā, §2 of Trockman et al. 2024) and report_init/final.json (how mimetic each Mamba layer
is). The same command resumes an unfinished run; Ctrl-C or SIGTERM stops at the next step boundary and
writes it all; a loss that turns NaN or Inf marks the run failed.

The defaults (Config, below) are the CPU main job: a 2-layer Mamba 2 (d_model 64, N 128, head dim 32)
copying strings of 2–16 of 64 tokens for 4000 steps, evaluated at 16, 32 and 64. The paper's figures,
grids, torchrun, eval, plot: `python -m experiments.sweep --help`. This file, top to bottom: Config →
model, optimizer, batches → checkpoints → training loop → main.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (read once, as torch loads): with spinning, a step on 2 threads
# while another process keeps one core busy was 16-40× slower than on 1 (experiments/bench.py --only threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
import torch.nn.functional as F

import mimetic
from experiments import figures, pipeline
from experiments.runtime import (StopRequest, append_metrics, default_threads, fail, load_checkpoint,
                                 print_table, save_checkpoint, write_metrics)
from mimetic import (ARCHS, COPY_TASKS, LM, METRICS, TASKS, ModelConfig, evaluate, format_report, make_batch,
                     mimetic_init_, mimetic_report, task_vocab_size)

PARTS = ("A", "dt", "bc", "conv")


# ----------------------------------------------------------------------------------------------------
# Config: every setting of one run and its default, in one place. The command line is made from it (a field
# `d_state` is the flag --d-state), presets override it, and a run folder's config.json is it, resolved.

def int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def part_list(text):
    return [p.strip() for p in text.split(",") if p.strip()]


def layer_states(text):
    """'3:32,5:64' → {3: 32, 5: 64}"""
    return {int(i): int(n) for i, n in (item.split(":") for item in text.split(",") if item.strip())}


def option(default, help, parse=None, choices=None):
    """A Config field and its flag's help, parser (default: the default's type; bool: a switch), choices."""
    return field(default=default, metadata=dict(help=help, parse=parse or type(default), choices=choices))


@dataclass
class Config:
    """One run. Fields left None are filled in by resolve_config (from the arch, the task or the device)."""
    # the task and the model
    task: str = option("copy", "recall task", choices=TASKS)
    arch: str = option("mamba2", "layer type of every layer (mimetic.ARCHS): mamba1, mamba2, attention "
                       "(softmax), linear (attention), ...", choices=ARCHS.keys())  # live: later entries too
    pattern: str | None = option(None, "a hybrid's letter per layer: M Mamba, A attention, L linear", str)
    mimetic: bool = option(False, "mimetic init with the paper's parts for the arch: A, dt, bc (+ conv for mamba2)")
    mimetic_parts: list | None = option(None, "only these of A,dt,bc,conv (implies --mimetic)", part_list)
    mimetic_layers: list | None = option(None, "only these layers, 0-based (default: every Mamba)", int_list)
    c: float = option(8.0, "mimetic A reparameterization A = -exp(-c·A_log)")
    d_model: int = option(64, "model width")
    n_layers: int = option(2, "number of layers")
    d_state: int | None = option(None, "state size N (default: mimetic.ARCHS', §5: mamba1 32, mamba2 128)", int)
    layer_d_state: dict | None = option(None, "state sizes of particular layers, e.g. 1:32 (Fig. 5)", layer_states)
    headdim: int = option(32, "mamba2 head dimension (ours: 4 heads at width 64; the paper's, in mimetic.ARCHS: 64)")
    expand: int | None = option(None, "Mamba inner width / d_model (default: mimetic.ARCHS', 2)", int)
    n_heads: int = option(1, "heads of attention / linear attention layers")
    linear_head_dim: int = option(32, "query/key features per head of linear attention layers")
    vocab_size: int = option(64, "number of content tokens of the task (the LM adds the task's special tokens)")
    train_len: int = option(16, "task length used for training (copy: string length; mqar: key-value pairs)")
    min_train_len: int | None = option(None, "lengths are drawn from [this, train_len] per batch (--pack: per "
                                       "example); default: 2 for copy, stack, sort, else train_len", int)
    mqar_tokens_per_pair: int = option(6, "mqar sequence length per key-value pair (zoology's configs: 16)")
    pretrained: str | None = option(None, "train (fine-tune) a transformers Mamba LM, a hub id or a folder, instead "
                                    "of ours (§6, Fig. 10); the size flags then do not apply", str)
    teacher_layer: int | None = option(None, "with --pretrained: a student of --n-layers copies of this teacher "
                                       "layer (Fig. 11)", int)
    pack: int = option(0, "Jelassi et al.'s rows: examples BOS x SEP y STOP packed into this many tokens, lengths "
                       "drawn per example (their --context_len 220); 0: one example per row (copy, stack, sort only)")
    reset_state: bool = option(False, "with --pack: a fresh Mamba state and conv at each BOS, as if each "
                               "example ran alone (mamba_ssm's seq_idx; the pipeline's rows share state)")
    eval_lens: list | None = option(None, "eval lengths (default: 1×, 2× and 4× the train length)", int_list)
    # the optimizer and its schedule
    steps: int = option(4000, "optimizer steps")
    batch_size: int = option(32, "training batch size (rows)")
    lr: float = option(3e-3, "peak learning rate")
    schedule: str = option("cosine", "linear warmup, then cosine (ours) or linear (Jelassi et al.'s) decay to 0",
                           choices=("cosine", "linear"))
    warmup: int = option(100, "warmup steps")
    weight_decay: float = option(0.1, "AdamW weight decay")
    weight_decay_on: str = option("matrices", "matrices: not on 1-D or _no_weight_decay params, as mamba_ssm; "
                                  "all: every one, as Jelassi et al.", choices=("matrices", "all"))
    beta2: float = option(0.95, "AdamW β2 (β1 = 0.9; the pipeline: torch's default 0.999)")
    grad_clip: float = option(1.0, "gradient norm clip (0: off)")
    # the loop
    stop_at: int | None = option(None, "pause at this step with --steps' schedule intact; the same command "
                                 "with a larger --stop-at, or without it, goes on", int)
    eval_every: int = option(250, "evaluate every this many steps (and at the end)")
    eval_batches: int = option(4, "batches of 64 examples per eval length")
    checkpoint_every: int = option(1000, "write checkpoint.pt every this many steps (and at the end)")
    seed: int = option(0, "random seed")
    # the machine: may differ between the run that wrote a checkpoint and the one that resumes it
    device: str = option("auto", "auto, cpu or cuda (under torchrun: process k on GPU k mod the number of GPUs)",
                         choices=("auto", "cpu", "cuda"))
    dtype: str = option("fp32", "fp32 or bf16 (bf16 autocast of the forward pass; the scans compute in fp32)",
                        choices=("fp32", "bf16"))
    scan_backend: str = option("auto", "scans: auto (Triton for Mamba 1 on CUDA once a self-check passes, "
                               "else PyTorch), triton or torch", choices=("auto", "triton", "torch"))
    no_tf32: bool = option(False, "CUDA: fp32 matmuls without TF32 (default: TF32 on)")
    sync_every: int | None = option(None, "read the loss (a GPU sync) and check it for NaN/Inf every this many "
                                    "steps (default: 1 on CPU, 10 on CUDA)", int)
    threads: int | None = option(None, "torch.set_num_threads (default: 1 under 1M parameters, else the cores "
                                 "no other process keeps busy, shared among torchrun's)", int)
    scan_backends: dict | None = field(default=None, metadata=dict(help=None))  # not a flag: what the scans ran on


FLAGS = [f for f in fields(Config) if f.metadata["help"]]
RUN_ONLY = ("threads", "device", "stop_at", "scan_backend", "scan_backends", "no_tf32", "sync_every")


def add_flags(parser, flags=FLAGS, with_defaults=True):
    """A --flag per field; without defaults, args hold only the flags typed (they override presets)."""
    for f in flags:
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata["help"].replace("%", "%%")  # argparse's %
        default = {"default": f.default} if with_defaults else {"default": argparse.SUPPRESS}
        if f.metadata["parse"] is bool:
            parser.add_argument(flag, action="store_true", help=help_text, **default)
        else:
            parser.add_argument(flag, type=f.metadata["parse"], choices=f.metadata["choices"],
                                help=f"{help_text} (default: {f.default})", **default)
    return parser


def build_parser():
    head, _, tail = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=head, epilog=tail,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="run folder (default: runs/<task>_<arch>_<init>_s<seed>)")
    return add_flags(parser)


def resolve_config(config):
    """One run's Config from a dict of flags (the rest take their defaults, other keys are ignored): the
    fields left None filled in, the combinations checked (ValueError naming the problem)."""
    cfg = Config(**{f.name: config[f.name] for f in fields(Config) if f.name in config})
    if (letter := ARCHS[cfg.arch].letter) != "M":  # attention (A), linear (L), ...: a pattern, as hybrids
        cfg.pattern = cfg.pattern or letter * cfg.n_layers
    for name in ("d_state", "headdim", "expand"):  # the flags left unset: the arch's, from the one table
        if getattr(cfg, name) is None:
            setattr(cfg, name, ARCHS[cfg.arch].defaults.get(name))
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
    for name in ("train_len", "steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every", "d_model",
                 "n_layers", "vocab_size", "mqar_tokens_per_pair", "lr"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.min_train_len is None:  # a range of lengths teaches copying by content, not by position
        cfg.min_train_len = min(2, cfg.train_len) if cfg.task in COPY_TASKS else cfg.train_len
    if not 0 < cfg.min_train_len <= cfg.train_len:
        raise ValueError(f"--min-train-len must be in [1, --train-len={cfg.train_len}], got {cfg.min_train_len}")
    if min(cfg.eval_lens) <= 0:
        raise ValueError(f"--eval-lens must be positive lengths, got {cfg.eval_lens}")
    pipeline.check(cfg)  # --pack, --pretrained
    for length in {cfg.min_train_len, cfg.train_len, *cfg.eval_lens}:
        try:  # the task's own limits, e.g. mqar's distinct keys: fail now, not at the first eval
            make_batch(cfg.task, 1, length, vocab_size=cfg.vocab_size, seq_len=mqar_seq_len(cfg, length))
        except ValueError as e:
            raise ValueError(f"{cfg.task} at length {length} with --vocab-size {cfg.vocab_size}: {e}") from None
    if not cfg.pretrained:
        ModelConfig(**model_config_kwargs(cfg))  # the model's own checks (pattern, layer_d_state, ...)
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device found; use --device cpu or auto")
    cfg.sync_every = cfg.sync_every or (10 if cfg.device.startswith("cuda") else 1)
    return cfg


def mqar_seq_len(cfg, length, task=None):
    """make_batch's seq_len at `length`: for MQAR, pairs × tokens per pair (zoology's); else None."""
    return cfg.mqar_tokens_per_pair * length if (task or cfg.task) == "mqar" else None


def run_name(cfg):
    arch = f"{cfg.arch}-{cfg.pattern}" if ARCHS[cfg.arch].letter == "M" and cfg.pattern else cfg.arch
    if cfg.pretrained:
        arch = f"pretrained-{Path(cfg.pretrained).name}" + (f"-student{cfg.n_layers}xl{cfg.teacher_layer}"
                                                             if cfg.teacher_layer is not None else "")
    init = "default"
    if cfg.mimetic:
        init = "mimetic" + (f"-{'+'.join(cfg.mimetic_parts)}" if cfg.mimetic_parts else "")
        init += f"-l{'+'.join(map(str, cfg.mimetic_layers))}" if cfg.mimetic_layers else ""
    return f"{cfg.task}_{arch}_{init}"


# ----------------------------------------------------------------------------------------------------
# Model, optimizer, schedule, batches

def model_config_kwargs(cfg):
    model_fields = ("d_model", "n_layers", "arch", "pattern", "d_state", "expand", "headdim", "n_heads",
                    "linear_head_dim", "layer_d_state")  # the Config fields that are mimetic.ModelConfig's
    return dict(vocab_size=task_vocab_size(cfg.task, cfg.vocab_size) + (1 if cfg.pack else 0),  # + BOS
                **{k: getattr(cfg, k) for k in model_fields})


def build_model(cfg):
    """LM for the config (or --pretrained's model), mimetic-initialized as asked (conv follows the paper's
    per-arch choice unless --mimetic-parts names it)."""
    model = pipeline.Pretrained(cfg) if cfg.pretrained else LM(ModelConfig(**model_config_kwargs(cfg)))
    if cfg.mimetic:
        parts = ({p: p in cfg.mimetic_parts for p in PARTS} if cfg.mimetic_parts else
                 dict(A=True, dt=True, bc=True, conv=None))  # conv None: the paper's choice for the arch
        mimetic_init_(model, c=cfg.c, layers=cfg.mimetic_layers, **parts)
    return model


def build_optimizer(model, cfg):
    """AdamW (β1 0.9, β2 --beta2) with weight decay on --weight-decay-on parameters; linear warmup, then
    cosine or linear decay to 0 at --steps."""
    decay, no_decay = [], []
    for p in model.parameters():
        skip = cfg.weight_decay_on == "matrices" and (p.dim() < 2 or getattr(p, "_no_weight_decay", False))
        (no_decay if skip else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, cfg.beta2))

    def lr_factor(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return 1 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def training_batch(cfg, g):
    """One batch: with --pack, Jelassi et al.'s packed rows; else batch_size examples of one length drawn
    from [min_train_len, train_len]."""
    if cfg.pack:
        return pipeline.packed_batch(cfg, g)
    length = int(torch.randint(cfg.min_train_len, cfg.train_len + 1, (), generator=g))
    return make_batch(cfg.task, cfg.batch_size, length, vocab_size=cfg.vocab_size, generator=g,
                      seq_len=mqar_seq_len(cfg, length))


def evaluate_lengths(model, cfg, device, lens=None, task=None):
    """{length: evaluate(...)} on fixed held-out batches (seed 1) at each eval length (BOS first for --pack)."""
    task, bos = task or cfg.task, task_vocab_size(cfg.task, cfg.vocab_size)
    model = pipeline.WithBOS(model, bos) if cfg.pack else model
    return {n: evaluate(model, task, n, vocab_size=cfg.vocab_size, n_batches=cfg.eval_batches, device=device,
                        generator=torch.Generator().manual_seed(1), seq_len=mqar_seq_len(cfg, n, task))
            for n in lens or cfg.eval_lens}


def example_inputs(cfg, length=None, seed=0, task=None):
    """The one example the attention maps show (BOS-prefixed for --pack runs): (1, T)."""
    task, length = task or cfg.task, length or cfg.train_len
    inputs, _ = make_batch(task, 1, length, vocab_size=cfg.vocab_size, seq_len=mqar_seq_len(cfg, length, task),
                           generator=torch.Generator().manual_seed(seed))
    bos = task_vocab_size(cfg.task, cfg.vocab_size)
    return torch.cat([torch.tensor([[bos]]), inputs], dim=1) if cfg.pack else inputs


# ----------------------------------------------------------------------------------------------------
# Checkpoints (runtime.py writes them atomically, keeping the previous one until the next is on disk)

class Diverged(RuntimeError):
    """The loss became NaN or Inf."""


def check_same_run(saved, cfg, out):
    """ValueError unless the config saved in a run folder (its checkpoint's, or its config.json) is this
    one, the machine aside."""
    as_json = lambda config: json.loads(json.dumps(config))  # as config.json holds it: {1: 8} is {"1": 8}
    here = as_json(asdict(cfg))
    saved = as_json({**asdict(Config()), **saved})  # a flag added since: it trained with its default
    if diff := [k for k in here if k not in RUN_ONLY and saved.get(k) != here[k]]:
        details = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} there, {here[k]} here" for k in diff[:3])
        raise ValueError(f"{out} holds a run of another config ({details}); use another --out or delete it")


# ----------------------------------------------------------------------------------------------------
# One run

class Run:
    """One training run: the model, optimizer, schedule and batch stream of a config, its progress (step,
    running loss, times, metrics rows) and its folder, if any; resumed from the folder's last checkpoint."""

    def __init__(self, cfg, out=None):
        self.cfg, self.out = replace(cfg), Path(out) if out else None  # a copy: the run notes its scans in it
        cfg = self.cfg
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda":
            if self.device.index is not None:
                torch.cuda.set_device(self.device)  # this process's GPU, where Triton launches and allocates
            torch.set_float32_matmul_precision("highest" if cfg.no_tf32 else "high")  # high: TF32
        mimetic.kernels.SCAN_BACKEND = cfg.scan_backend
        try:  # on CUDA, "auto" checks Triton here, at the first call
            cfg.scan_backends = mimetic.kernels.backends_in_use(self.device)
        except RuntimeError as e:  # e.g. --scan-backend triton without CUDA
            raise ValueError(f"--scan-backend {cfg.scan_backend}: {e}") from None
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's, on this machine
        torch.set_num_threads(cfg.threads or default_threads(self.n_params, local_processes))
        self.opt, self.schedule = build_optimizer(self.model, cfg)
        self.batches = torch.Generator().manual_seed(cfg.seed)
        self.prefetch = self.device.type == "cuda"  # build the next batch while the GPU works on this one
        self.prefetched, self.unread_losses = None, []
        self.progress = dict(step=0, loss_sum=0.0, loss_count=0, train_time=0.0, wall_time=0.0, tokens=0, rows=[])
        self.resumed = load_checkpoint(self.out) if self.out and not (self.out / "done").exists() else None
        if self.resumed:
            check_same_run(self.resumed["config"], cfg, self.out)
            self.model.load_state_dict(self.resumed["model"])
            self.opt.load_state_dict(self.resumed["optimizer"])
            self.schedule.load_state_dict(self.resumed["schedule"])
            self.batches.set_state(self.resumed["batches"])
            torch.set_rng_state(self.resumed["rng"])
            self.progress = self.resumed["run"]
        self.started = time.time()

    step = property(lambda self: self.progress["step"])

    def elapsed(self):  # wall seconds over every process that trained this run
        return self.progress["wall_time"] + time.time() - self.started

    def start(self):
        """Say what trains where, write config.json and the metrics so far, and the first eval (step 0)."""
        cfg, out = self.cfg, self.out
        if self.resumed:
            print(f"resuming {out} from step {self.step}", flush=True)
        backends = ", ".join(f"{k} {v}" for k, v in cfg.scan_backends.items())
        print(f"{run_name(cfg)}: {self.n_params / 1e3:.1f}k parameters on {self.device} ({cfg.dtype}; scan backends: "
              f"{backends})", flush=True)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
            for name in ("done", "failed"):
                (out / name).unlink(missing_ok=True)
            write_metrics(out, self.progress["rows"], cfg.eval_lens)  # a resumed run drops rows after its checkpoint
            if not self.resumed:
                self.plot_attention("at init", "attention_init.png")
        if not self.resumed:
            self.report("at init", "report_init.json")
        if not self.progress["rows"]:
            self.log_eval()  # the init point of the accuracy curves

    def train_step(self):
        """One optimizer step on the next batch; its loss stays on the device until read_losses()."""
        cfg, p = self.cfg, self.progress
        start = time.time()
        inputs, targets = self.prefetched or (t.to(self.device) for t in training_batch(cfg, self.batches))
        new_example = pipeline.example_starts(cfg, inputs) if cfg.reset_state else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
            logits = self.model(inputs) if new_example is None else self.model(inputs, new_example)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.schedule.step()
        if self.prefetch:  # a checkpoint saves the generator as it was before the prefetched batch
            self.batches_before = self.batches.get_state()
            self.prefetched = tuple(t.to(self.device) for t in training_batch(cfg, self.batches))
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
        if (now := mimetic.kernels.backends_in_use(self.device)) != self.cfg.scan_backends:
            self.cfg.scan_backends = now
            if self.out:
                (self.out / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2))

    def evaluate(self):
        """A metrics row: step, mean training loss since the last row, times, and accuracy per eval length."""
        cfg, p = self.cfg, self.progress
        results = evaluate_lengths(self.model, cfg, self.device)
        loss = p["loss_sum"] / p["loss_count"] if p["loss_count"] else None
        row = {"step": p["step"], "loss": loss, "time": round(p["train_time"], 2),  # time: training only
               "wall_time": round(self.elapsed(), 2), "tokens_per_s": round(p["tokens"] / max(p["train_time"], 1e-9)),
               **{metric: {str(n): r[metric] for n, r in results.items()} for metric in METRICS}}
        p["loss_sum"], p["loss_count"] = 0.0, 0
        eta = p["train_time"] / max(p["step"], 1) * (cfg.steps - p["step"])
        accs = " | ".join(f"acc@{n} {r['exact_match']:.2f}" for n, r in results.items())
        print(f"step {p['step']}/{cfg.steps} | loss {'-' if loss is None else f'{loss:.3f}'} | {accs} | "
              f"{row['tokens_per_s'] / 1e3:.1f}k tok/s | eta {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
        return row

    def log_eval(self):
        self.progress["rows"].append(self.evaluate())
        append_metrics(self.out, self.progress["rows"][-1], self.cfg.eval_lens)

    def checkpoint(self):
        save_checkpoint(self.out, dict(
            model=self.model.state_dict(), optimizer=self.opt.state_dict(), schedule=self.schedule.state_dict(),
            batches=self.batches_before if self.prefetched else self.batches.get_state(), rng=torch.get_rng_state(),
            config=asdict(self.cfg), run={**self.progress, "wall_time": self.elapsed()}))

    def report(self, when, name):
        """Print how mimetic each Mamba layer is (mimetic_report on the attention maps' example), save it as `name`."""
        rows = mimetic_report(self.model, example_inputs(self.cfg).to(self.device))
        if rows:
            print(f"how mimetic each Mamba layer is {when}:\n{format_report(rows)}", flush=True)
        if rows and self.out:
            (self.out / name).write_text(json.dumps(rows, indent=2))

    def plot_attention(self, when, name):
        panels = figures.attention_panels(self.model, example_inputs(self.cfg).to(self.device))
        figures.plot_attention(panels, f"{run_name(self.cfg)} {when}", self.out / name)

    def finish(self, stopped, failure, paused=False):
        """Print the final table and write the outputs: the last checkpoint and `done` (finished), `failed`
        (diverged), or, when stopped early (or paused by --stop-at), an eval row at the stopping step that a
        resumed run drops."""
        cfg, out, rows = self.cfg, self.out, self.progress["rows"]
        final = rows[-1]
        if failure:
            print(failure, flush=True)
        elif stopped:
            print(f"paused at step {stopped} of {cfg.steps} (--stop-at); the same command with a larger --stop-at, "
                  "or without it, goes on" if paused else
                  f"interrupted at step {stopped}; the same command resumes from there", flush=True)
            final = final if final["step"] == stopped else self.evaluate()
        print_table(final, cfg.train_len)
        self.report(f"at step {self.step}", "report_final.json")
        if not out:
            return final
        if final is not rows[-1]:
            append_metrics(out, final, cfg.eval_lens)
        if not (stopped or failure):
            self.checkpoint()
            (out / "checkpoint_prev.pt").unlink(missing_ok=True)
        self.plot_attention(f"at step {self.step}", "attention_final.png")
        shown = rows + ([final] if final is not rows[-1] else [])
        figures.plot_accuracy([(run_name(cfg), cfg.train_len, [shown])], out / "accuracy.png", run_name(cfg))
        if failure or not stopped:
            (out / ("failed" if failure else "done")).write_text((failure or "finished") + "\n")
        return final


def train(cfg, out=None):
    """Train one run of a resolved Config; with a folder `out`, write the run folder there, checkpoint
    every --checkpoint-every steps and resume from its last checkpoint. Returns the final metrics row (also
    when paused by --stop-at). Raises Diverged when the loss turns NaN or Inf, and KeyboardInterrupt when
    stopped early, after writing the outputs."""
    run = Run(cfg, out)
    cfg, failure = run.cfg, None
    pause_at = cfg.stop_at if cfg.stop_at is not None and cfg.stop_at < cfg.steps else None
    run.start()
    stopped = run.step if pause_at is not None and run.step >= pause_at else None  # resumed past the pause
    with StopRequest() as stop:
        while run.step < cfg.steps and not stopped:
            run.train_step()
            step, requested = run.step, stop.requested
            if step % cfg.sync_every and step % cfg.eval_every and step % cfg.checkpoint_every and not (
                    step in (cfg.steps, pause_at) or requested):
                continue  # the losses stay on the GPU a while longer
            if bad := [(i, v) for i, v in run.read_losses().items() if not math.isfinite(v)]:
                failure = (f"step {bad[0][0]}: loss {bad[0][1]} at lr {run.schedule.get_last_lr()[0]:.3g} (peak "
                           f"--lr {cfg.lr:g}): the run diverged; try a lower --lr or a --grad-clip")
                break
            run.note_backends()
            if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                run.log_eval()
            if (requested or run.step == pause_at) and run.step < cfg.steps:
                stopped = run.step
            if run.out and (run.step % cfg.checkpoint_every == 0 or stopped) and run.step < cfg.steps:
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


# ----------------------------------------------------------------------------------------------------
# main: one run (grids of runs, and commands on finished runs: experiments/sweep.py)

def run_one(cfg, out, label):
    """Train one run into `out`, or print its table if it is finished; a user's mistake exits with one line."""
    print(f"{label}: 1 run into {out}")
    try:
        if (out / "done").exists():
            check_same_run(json.loads((out / "config.json").read_text()), cfg, out)
            print(f"{out} is finished (delete it to train again):")
            print_table(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1]), cfg.train_len)
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
        fail("train.py is one run; torchrun shares a sweep's runs: torchrun ... -m experiments.sweep")
    try:
        cfg = resolve_config(vars(args))
    except ValueError as e:
        fail(e)
    run_one(cfg, Path(args.out or f"runs/{run_name(cfg)}_s{cfg.seed}"), run_name(cfg))


if __name__ == "__main__":
    main()
