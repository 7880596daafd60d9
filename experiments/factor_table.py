"""factor_table.py — issue 39's table of what decides whether mimetic init copies: for each cell (a folder of
runs: <cell>/<config>/seed<k>/metrics.jsonl and config.json, as train.py's sweeps write them), default vs
mimetic init, mean ± std over seeds of

- plateau exit: the first eval step whose mean training loss is 10% below ln(vocab_size), the loss of a
  uniform guess among the content tokens (the unigram loss of these tasks, every content token equally likely);
- first step with exact match ≥ 0.5 at the training length (1×) and at twice it (2×), "never" counted apart;
- exact match and token accuracy at 1× and 2× at the last eval.

    python -m experiments.factor_table results/factor_w64              # every cell, one row per cell and init
    python -m experiments.factor_table results/factor_w64 P P_b16      # those cells
    python -m experiments.factor_table results/factor_w64 --plot figures/cpu_fig1_factors.png
"""
import json
import math
import statistics
import sys
from pathlib import Path


def read_run(folder):
    config = json.loads((folder / "config.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return config, rows


def first_step(rows, keep):
    return next((row["step"] for row in rows if keep(row)), None)


def run_facts(config, rows):
    one, two = (str(n) for n in config["eval_lens"][:2])
    plateau = 0.9 * math.log(config["vocab_size"])
    last = rows[-1]
    return {"exit": first_step(rows, lambda r: r["loss"] is not None and r["loss"] < plateau),
            "em1_step": first_step(rows, lambda r: r["exact_match"][one] >= 0.5),
            "em2_step": first_step(rows, lambda r: r["exact_match"][two] >= 0.5),
            "em1": last["exact_match"][one], "em2": last["exact_match"][two],
            "tok1": last["token_acc"][one], "tok2": last["token_acc"][two], "step": last["step"]}


def mean_std(values, digits=3):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def steps(values):
    """Mean ± std of the steps reached, and how many seeds never got there."""
    reached = [v for v in values if v is not None]
    never = len(values) - len(reached)
    text = mean_std(reached, 0) if reached else "never"
    return text + (f" ({never} never)" if never and reached else "")


def finished_runs(config_dir):
    runs = [read_run(seed) for seed in sorted(config_dir.glob("seed*")) if (seed / "metrics.jsonl").exists()]
    return [(c, rows) for c, rows in runs if rows[-1]["step"] == c["steps"]]


def init_name(config_dir):
    return "mimetic" if config_dir.name.endswith("mimetic") else "default"


def config_dirs(root, cell):
    return sorted(p for p in (root / cell).iterdir() if p.is_dir())


def table(root, cells):
    print("| cell | init | seeds | plateau exit | EM ≥ 0.5 @1× | EM ≥ 0.5 @2× | EM @1× | EM @2× | tok @1× | tok @2× |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cell in cells:
        for config_dir in config_dirs(root, cell):
            finished = [run_facts(c, rows) for c, rows in finished_runs(config_dir)]
            if not finished:
                continue
            init = init_name(config_dir)
            column = {key: [f[key] for f in finished] for key in finished[0]}
            print(f"| {cell} | {init} | {len(finished)} | {steps(column['exit'])} | {steps(column['em1_step'])} | "
                  f"{steps(column['em2_step'])} | {mean_std(column['em1'])} | {mean_std(column['em2'])} | "
                  f"{mean_std(column['tok1'])} | {mean_std(column['tok2'])} |")


PANELS_PER_ROW = 6


def plot(root, cells, out):
    """Training loss vs step, one panel per cell, at most PANELS_PER_ROW to a row: each seed thin, default
    blue, mimetic orange; the dashed line is 0.9 ln(vocab_size), where the plateau ends."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panel_columns = min(len(cells), PANELS_PER_ROW)
    panel_rows = math.ceil(len(cells) / panel_columns)
    fig, axes = plt.subplots(panel_rows, panel_columns, figsize=(3.2 * panel_columns, 3 * panel_rows),
                             sharey=True, squeeze=False)
    for ax in axes.flat[len(cells):]:
        ax.axis("off")
    for ax, cell in zip(axes.flat, cells):
        for config_dir in config_dirs(root, cell):
            color = "tab:orange" if init_name(config_dir) == "mimetic" else "tab:blue"
            for config, rows in finished_runs(config_dir):
                steps, losses = zip(*[(r["step"], r["loss"]) for r in rows if r["loss"] is not None])
                ax.plot(steps, losses, color=color, lw=0.8)
                ax.axhline(0.9 * math.log(config["vocab_size"]), color="gray", ls="--", lw=0.6)
        ax.set_title(cell, fontsize=9)
        ax.set_xlabel("step")
    for row in axes:
        row[0].set_ylabel("training loss")
    fig.suptitle("blue: default init, orange: mimetic init, one line a seed; dashed: 0.9 ln(vocab)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    args = sys.argv[1:]
    out = args.pop(args.index("--plot") + 1) if "--plot" in args else None
    args = [a for a in args if a != "--plot"]
    if not args:
        sys.exit(__doc__)
    root = Path(args[0])
    if not root.is_dir():
        sys.exit(f"no folder {root}")
    cells = args[1:] or sorted(p.name for p in root.iterdir() if p.is_dir())
    if missing := [cell for cell in cells if not (root / cell).is_dir()]:
        sys.exit(f"no cell {', '.join(missing)} in {root}")
    if out:
        plot(root, cells, out)
    else:
        table(root, cells)
