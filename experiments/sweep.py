"""experiments/sweep.py — the command line beyond train.py's one run: grids of a figure's configs × learning
rates × c × seeds, sweeps (shared between torchrun's processes), --dry-run, and the `eval`, `plot` and
`summary` commands on finished run folders. Run it from the repository's root:

    python -m experiments.sweep --preset fig1 --scale cpu               # a paper figure at the main job's size
    torchrun --nproc_per_node 2 -m experiments.sweep --preset fig1 --scale cpu   # shared by 2 processes
    python -m experiments.sweep --preset fig1 --dry-run                 # every run: its values, sources, size
    python -m experiments.sweep eval runs/RUN --lens 32,64,128          # a finished run at new lengths
    python -m experiments.sweep plot runs/A runs/B --out cmp.png        # overlay runs (mean ± std over seeds)
    python -m experiments.sweep summary results/fig1_m2_cpu             # a sweep's tables from its metrics

This file builds on train.py (one run), presets.py (the figures' setups) and figures.py (summaries and
plots); none of them imports it.
"""
import argparse
import datetime
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import torch

from experiments import figures, presets
from experiments.runtime import fail, load_checkpoint, print_table
from mimetic import METRICS, TASKS, task_vocab_size
from train import (Config, Diverged, add_flags, build_model, check_same_run, evaluate_lengths, example_inputs,
                   int_list, model_config_kwargs, part_list, resolve_config, run_name, run_one, train)

DEFAULTS = Config()  # only the lr, c and seed of a grid without its own


def float_list(text):
    return [float(v) for v in text.split(",") if v.strip()]


GRID_OPTIONS = [  # (flag, default, parser, help): the flags of a grid, beside train.Config's of one run
    ("preset", None, str, "a figure's setup (presets.py; your flags override): " + "; ".join(
        f"{name}{f' (or {p.alias})' if p.alias else ''}: {presets.description(name)}"
        for name, p in presets.PRESETS.items())),
    ("scale", None, str, "size of the --preset setups: paper (for a GPU; the default) or cpu (the main job's size)"),
    ("configs", None, part_list, "only these configs of the --preset (comma-separated names)"),
    ("lrs", None, float_list, "sweep the learning rate over these values (with --sweep); default: --lr"),
    ("cs", None, float_list, "sweep c over these values (with --sweep); default: --c"),
    ("seeds", None, int_list, "comma-separated seeds (a sweep); default: --seed"),
    ("sweep", False, None, "run every config × lr × c × seed into subfolders of --out, skipping finished runs "
     "(a grid of more than one run always does)"),
    ("dry_run", False, None, "print every run of the grid (JSON lines): its parameter count, its values and their "
     "sources; train nothing"),
]
GRID_CHOICES = {"preset": presets.NAMES, "scale": presets.SCALES}


def parser(with_defaults=True):
    """The grid's flags, then one run's (train.Config's); without defaults it reports only the flags typed."""
    head, _, tail = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=head, epilog=tail,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    suppress = {} if with_defaults else {"default": argparse.SUPPRESS}
    for name, default, kind, help_text in GRID_OPTIONS:
        flag, help_text = "--" + name.replace("_", "-"), help_text.replace("%", "%%")
        if kind is None:
            parser.add_argument(flag, action="store_true", help=help_text, **suppress)
        else:
            parser.add_argument(flag, type=kind, choices=GRID_CHOICES.get(name), help=help_text, **suppress)
    parser.add_argument("--out", help="the sweep's folder (default: runs/<preset>_<scale>), or one run's", **suppress)
    return add_flags(parser, with_defaults=with_defaults)


class Grid(NamedTuple):
    label: str        # what the command trains, for the first line it prints
    out: Path         # the run folder, or a sweep's folder of config folders
    names: list       # the configs' names
    runs: list        # [(run folder, resolved config)]
    sweep: bool       # runs go into subfolders (config/[lr, c/]seed)
    args: argparse.Namespace
    sources: dict     # {run folder: {flag: where its value comes from}}

# ----------------------------------------------------------------------------------------------------
# Grids and sweeps: preset configs × lrs × cs × seeds, shared between torchrun's processes

def grid(argv):
    """The runs of a command line (a Grid). A --preset's values come with their sources (presets.py); a flag
    you type overrides the preset's value, and its source says so."""
    args = parser().parse_args(argv)
    typed = vars(parser(with_defaults=False).parse_args(argv))
    if (args.scale or args.configs) and not args.preset:
        raise ValueError(f"--{'scale' if args.scale else 'configs'} goes with a --preset; name one")
    scale = args.scale or "paper"
    description, shared, configs = presets.presets(scale)[presets.ALIASES.get(args.preset, args.preset)] \
        if args.preset else ("", {}, {"": {}})
    if args.configs:
        if unknown := [name for name in args.configs if name not in configs]:
            raise ValueError(f"--configs {unknown} are not configs of --preset {args.preset}: {', '.join(configs)}")
        configs = {name: configs[name] for name in args.configs}
    axes = {}
    for many, one in (("lrs", "lr"), ("cs", "c"), ("seeds", "seed")):  # typed beats preset beats default
        axes[one] = (typed.get(many) or ([typed[one]] if one in typed else None) or shared.get(many)
                     or [getattr(DEFAULTS, one)])
    flags_of = {name: {**shared, **flags, **typed} for name, flags in configs.items()}
    resolved = {name: resolve_config({**flags, "lr": axes["lr"][0], "c": axes["c"][0]})
                for name, flags in flags_of.items()}
    sweep = args.sweep or len(resolved) * len(axes["lr"]) * len(axes["c"]) * len(axes["seed"]) > 1
    first = next(iter(resolved.values()))
    out = Path(args.out or "runs/" + (f"{args.preset}_{scale}" if args.preset else run_name(first))
               + ("" if sweep else f"_s{axes['seed'][0]}"))
    runs, sources = [], {}
    for key, config in resolved.items():
        source = config_sources(args.preset, scale, key, typed) if args.preset else {}
        name = key or run_name(config)
        for lr in axes["lr"]:
            for c in axes["c"]:  # the paper's constant c, swept as §3 did
                for seed in axes["seed"]:
                    swept = "_".join(f"{k}{v:g}" for k, v in (("lr", lr), ("c", c)) if len(axes[k]) > 1)
                    folder = out / name / swept / f"seed{seed}" if sweep else out  # swept: lr, c folders
                    runs.append((folder, resolve_config({**flags_of[key], "lr": lr, "c": c, "seed": seed})))
                    sources[folder] = source
    label = f"preset {args.preset}, {scale} scale: {description}" if args.preset else run_name(first)
    return Grid(label, out, [name or run_name(cfg) for name, cfg in resolved.items()], runs, sweep, args, sources)


def config_sources(preset, scale, name, typed):
    """{flag of one run: its source}: the preset's (lrs, cs and seeds name the lr, c and seed of each run),
    then the flags typed on the command line."""
    one = {"lrs": "lr", "cs": "c", "seeds": "seed"}
    source = {one.get(k, k): v for k, v in presets.config_sources(preset, scale, name).items()}
    for key in typed:
        if hasattr(DEFAULTS, key) or key in ("lrs", "cs", "seeds"):
            source[one.get(key, key)] = f"your flag --{key.replace('_', '-')}"
    return source


def dry_run(runs, sources):
    """One JSON line per run: its folder, the model's parameter count, its resolved config, and "source":
    {flag: where its value comes from} for the values the preset (or your command line) sets."""
    sizes = {}
    for folder, cfg in runs:
        key = json.dumps(model_config_kwargs(cfg), sort_keys=True)
        if key not in sizes:  # a --pretrained model is not downloaded for this
            sizes[key] = None if cfg.pretrained else sum(p.numel() for p in build_model(cfg).parameters())
        print(json.dumps({"run": str(folder), "params": sizes[key], **asdict(cfg), "source": sources.get(folder, {})},
                         ensure_ascii=False))
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
    for folder, cfg in runs:
        if (folder / "done").exists() or (folder / "failed").exists():
            # a finished folder of another config (a flag not in its path) is an error, not a skip
            check_same_run(json.loads((folder / "config.json").read_text()), cfg, folder)
            if rank == 0:
                print(f"skip {folder} ({'done' if (folder / 'done').exists() else 'failed'})")
        else:
            pending.append((folder, cfg))
    if world > 1:
        dist.barrier()  # every process has listed the unfinished runs before any starts one
        if 0 < len(pending) < world:
            raise ValueError(f"{world} processes for {len(pending)} unfinished run{'s' * (len(pending) > 1)}; use "
                             f"--nproc_per_node {len(pending)} or fewer")
    for folder, cfg in pending[rank::world]:
        if world > 1:
            cfg = replace(cfg, device=rank_device(cfg.device, local_rank, torch.cuda.device_count()))
        print(f"=== {folder}" + (f" (rank {rank} of {world})" if world > 1 else ""), flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "trained_by", "a") as f:
            f.write(f"rank {rank} of {world}\n")
        try:
            train(cfg, folder)
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
# Finished runs: eval at new lengths, plot

def eval_command(argv):
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep eval",
                                     description="evaluate a finished (or stopped) run "
                                     "at new lengths and redraw its attention maps on one example")
    parser.add_argument("run", help="a run folder with checkpoint.pt")
    parser.add_argument("--lens", type=int_list, help="comma-separated lengths (default: the run's eval lengths)")
    parser.add_argument("--task", choices=TASKS, help="another task with the same tokens (e.g. stack for a copy model)")
    parser.add_argument("--example-len", type=int, help="length of the example the maps show (default: train length)")
    parser.add_argument("--example-seed", type=int, default=0, help="which example (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CUDA if there is a GPU")
    args = parser.parse_args(argv)
    folder = Path(args.run)
    saved = load_checkpoint(folder)
    if saved is None:
        fail(f"no readable checkpoint.pt in {folder}: train the run first (or resume it)")
    cfg = resolve_config(dict(saved["config"], device=args.device))  # fills flags added since the run trained
    model = build_model(cfg)  # mimetic init included: a mimetic state dict loads into a mimetic model
    model.load_state_dict(saved["model"])
    task = args.task or cfg.task
    have, need = (task_vocab_size(t, cfg.vocab_size) for t in (cfg.task, task))
    if need != have:
        fail(f"{folder} was trained on {cfg.task} with {have} tokens; {task} with its --vocab-size "
             f"{cfg.vocab_size} needs {need}: evaluate a task with the same tokens")
    device = torch.device(cfg.device)
    model.to(device)
    try:
        results = evaluate_lengths(model, cfg, device, args.lens, task)
        example = example_inputs(cfg, args.example_len, args.example_seed, task).to(device)
    except ValueError as e:
        fail(e)
    row = {"step": saved["run"]["step"], **{m: {str(n): r[m] for n, r in results.items()} for m in METRICS}}
    print(f"{folder} ({task}):")
    print_table(row, cfg.train_len)
    path = folder / "eval.json"
    evals = json.loads(path.read_text()) if path.exists() else {}
    evals.setdefault(task, {}).update({str(n): r for n, r in results.items()})
    path.write_text(json.dumps(evals, indent=2))
    figures.plot_attention(figures.attention_panels(model, example), f"{folder.name}: {task}, length "
                           f"{args.example_len or cfg.train_len}, step {row['step']}", folder / "attention_eval.png")
    print(f"wrote {path} and {folder / 'attention_eval.png'}")


def plot_command(argv):
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep plot",
                                     description="overlay the accuracy of run folders")
    parser.add_argument("runs", nargs="+", help="run folders, or config folders of seed subfolders (mean ± std)")
    parser.add_argument("--out", default="accuracy_compare.png", help="figure path (default: %(default)s)")
    parser.add_argument("--final", action="store_true", help="bars of the final values, not curves")
    parser.add_argument("--lengths", action="store_true", help="final accuracy vs evaluation length")
    parser.add_argument("--metric", default="exact_match", choices=tuple(METRICS))
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


def summary_command(argv):
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep summary",
                                     description="a sweep's summary (tables and figures) "
                                     "from its runs' config.json and metrics.jsonl, e.g. those under results/")
    parser.add_argument("folder", help="a sweep's folder: config folders of seed<k>/ run folders")
    parser.add_argument("--configs", help="comma-separated config folders, in table order (default: all, sorted)")
    parser.add_argument("--to", help="where summary.md, summary.csv and the figures go (default: the folder)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    try:
        names = args.configs.split(",") if args.configs else sorted(p.name for p in folder.iterdir() if p.is_dir())
        figures.write_summary(folder, names, to=args.to)
    except (ValueError, OSError) as e:
        fail(e)
    print(f"wrote {Path(args.to or folder) / 'summary.md'} (a table per metric, and each seed's exact match)")


def layer_map(folder, layer):
    """(attention map, mask or None) of one layer of a finished run, on its attention-map example."""
    saved = load_checkpoint(folder)
    if saved is None:
        raise ValueError(f"no readable checkpoint.pt in {folder}")
    cfg = resolve_config(dict(saved["config"], device="cpu"))
    model = build_model(cfg)
    model.load_state_dict(saved["model"])
    return figures.attention_panels(model, example_inputs(cfg))[layer]


def main(argv=None):
    """The commands beyond one run: eval, plot, summary, and a grid of runs (or its --dry-run)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = dict(eval=eval_command, plot=plot_command, summary=summary_command)
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    try:
        g = grid(argv)
    except ValueError as e:
        fail(e)
    if g.args.dry_run:
        return dry_run(g.runs, g.sources)
    if distributed()[1] > 1 and not g.sweep:
        fail("torchrun shares the runs of a sweep between processes; this command is one run (add --sweep)")
    if not g.sweep:
        return run_one(g.runs[0][1], g.out, g.label)
    if distributed()[0] == 0:
        print(f"{g.label}: {len(g.runs)} run{'s' * (len(g.runs) > 1)} into {g.out}")
    try:
        run_sweep(g.runs, g.out, g.names, g.label)
    except ValueError as e:  # e.g. a checkpoint of another config in a run folder
        fail(e)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
