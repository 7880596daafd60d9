"""figures.py — what train.py's run folders become: summary tables and figures.

A run folder holds config.json and metrics.jsonl (one row per evaluation: step, loss, and per eval length
the exact match, token accuracy and string accuracy; see mimetic.evaluate). A config folder holds the
runs of one config: seed<k>/ folders, or, when learning rates or c were swept, <lr,c>/seed<k>/ folders.

- The paper's figures show the best run of a learning-rate sweep. best_hyper picks, per config, the
  (lr, c) with the highest mean final exact match at the train length (ties: token accuracy there),
  so the pick never looks at the longer lengths we report.
- Fig. 7 measures generalization by the area under accuracy vs evaluation length (auc) and by the
  longest length the model still copies with > 99% accuracy (max_length_above).
"""
import csv
import itertools
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # figures go to files; no display needed
import matplotlib.pyplot as plt
import torch

from mimetic import METRICS, attention_map, attention_mask, layout_of, mixer_inputs  # METRICS: train.py's too


# ----------------------------------------------------------------------------------------------------
# Reading runs

def load_runs(folder, finished_only=False):
    """Every run under `folder` (itself, its children or grandchildren): dicts with path, config, rows,
    failed (the divergence message, or None) and done (it trained all its steps). Sorted by path.
    finished_only: only runs that are done or failed, leaving out those still training or stopped. A run whose
    last row is at its config's last step is done without its `done` file (results/ keeps only the two files)."""
    folder = Path(folder)
    paths = sorted({p.parent for pattern in ("metrics.jsonl", "*/metrics.jsonl", "*/*/metrics.jsonl")
                    for p in folder.glob(pattern)})
    runs = []
    for path in paths:
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
        failed = (path / "failed").read_text().strip() if (path / "failed").exists() else None
        config = json.loads((path / "config.json").read_text())
        done = (path / "done").exists() or bool(rows) and rows[-1]["step"] == config.get("steps")
        if rows and (done or failed or not finished_only):
            runs.append(dict(path=path, config=config, rows=rows, failed=failed, done=done))
    return runs


def hyper(run):
    """The swept hyperparameters of a run: (lr, c)."""
    return run["config"].get("lr"), run["config"].get("c")


def final(run, metric, length):
    return run["rows"][-1][metric].get(str(length), float("nan"))


def mean_std(values):
    """Mean and sample std (0 for one value, nan for none)."""
    t = torch.tensor(values, dtype=torch.float64)
    if not len(t):
        return float("nan"), float("nan")
    return t.mean().item(), t.std().item() if len(t) > 1 else 0.0


def best_hyper(runs):
    """(lr, c) with the best mean final exact match (then token accuracy) at the train length, over the
    runs that did not fail; None if every run failed."""
    ok = [r for r in runs if not r["failed"]]
    if not ok:
        return None
    key = lambda hp: tuple(mean_std([final(r, m, r["config"]["train_len"]) for r in ok if hyper(r) == hp])[0]
                           for m in ("exact_match", "token_acc"))
    return max(sorted({hyper(r) for r in ok}, key=str), key=key)


def load_run_group(folder, finished_only=False):
    """(label, train length, [rows of each seed]) of a run folder or config folder, at its best (lr, c)."""
    runs = load_runs(folder, finished_only)
    if not runs:
        raise ValueError(f"no metrics.jsonl in {folder} or below it")
    best = best_hyper(runs) or hyper(runs[0])
    chosen = [r for r in runs if hyper(r) == best and not r["failed"]] or runs
    folder = Path(folder)
    label = f"{folder.parent.name}/{folder.name}" if folder.name.startswith("seed") else folder.name  # seed0 of what
    return label, chosen[0]["config"]["train_len"], [r["rows"] for r in chosen]


# ----------------------------------------------------------------------------------------------------
# The paper's length metrics (Fig. 7)

def auc(lengths, accuracies):
    """Area under accuracy vs length (trapezoids) over the evaluated range, divided by its width: 1 for a
    model that is perfect at every evaluated length; the accuracy itself for one length."""
    pairs = sorted(zip(lengths, accuracies))
    if len(pairs) == 1:
        return pairs[0][1]
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pairs, pairs[1:]))
    return area / (pairs[-1][0] - pairs[0][0])


def max_length_above(lengths, accuracies, threshold=0.99):
    """The longest evaluated length up to which accuracy stays above `threshold` at every evaluated
    length (Fig. 7b's "max > 99% gen. length"); 0 if the shortest already falls below."""
    best = 0
    for length, accuracy in sorted(zip(lengths, accuracies)):
        if accuracy <= threshold:
            break
        best = length
    return best


# ----------------------------------------------------------------------------------------------------
# Summaries: one table per metric, at each config's best (lr, c)

def summarize(out, names):
    """Rows of the summary: per config its chosen (lr, c), seeds, failed runs and for each metric the
    mean ± std over seeds of the final value per eval length, AUC and max > 99% length. A run that has not
    finished (still training, or stopped) has no final value: it is left out."""
    rows = []
    for name in names:
        runs = load_runs(out / name, finished_only=True)
        if not runs:
            continue
        best = best_hyper(runs)
        chosen = [r for r in runs if hyper(r) == best and not r["failed"]]
        lens = sorted({int(n) for r in chosen for n in r["rows"][-1]["exact_match"]})
        row = dict(config=name, seeds=len(chosen), lr=best[0] if best else None, c=best[1] if best else None,
                   train_len=chosen[0]["config"]["train_len"] if chosen else None, lens=lens,
                   failed=[str(r["path"].relative_to(out)) for r in runs if r["failed"]],
                   swept=len({hyper(r) for r in runs}) > 1)
        for metric in METRICS:
            for n in lens:
                row[f"{metric}@{n}"] = mean_std([final(r, metric, n) for r in chosen])
            curves = [[final(r, metric, n) for n in lens] for r in chosen]
            row[f"{metric}_auc"] = mean_std([auc(lens, c) for c in curves])
            row[f"{metric}_max99"] = mean_std([max_length_above(lens, c) for c in curves])
        rows.append(row)
    return rows


def first_step_above(run, length, threshold=0.9, metric="exact_match"):
    """The first evaluated step with accuracy >= threshold at `length` (how fast a run learns), or None."""
    return next((r["step"] for r in run["rows"] if r[metric].get(str(length), 0.0) >= threshold), None)


def per_seed_table(out, rows):
    """Markdown lines: each chosen run's final exact match per length and its first step >= 0.9 at the train
    length, for the verdicts that rest on a spread (bimodal seeds) or on learning speed."""
    header = ["config", "run", "exact match per length", "first step ≥ 0.9 at the train length"]
    lines = ["## exact match per seed", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in rows:
        for run in load_runs(out / r["config"], finished_only=True):
            if hyper(run) == (r["lr"], r["c"]) and not run["failed"]:
                finals = ", ".join(f"{final(run, 'exact_match', n):.3f} @{n}" for n in r["lens"])
                first = first_step_above(run, r["train_len"])
                lines.append(f"| {r['config']} | {run['path'].relative_to(out / r['config'])} | {finals} | "
                             f"{'never' if first is None else first} |")
    return lines + [""]


def steps_table(folders, steps, length=None, metrics=("exact_match", "token_acc")):
    """Markdown lines: every run under `folders` (each seed, paused runs too) at the evaluated `steps`, with
    `metrics` at `length` (default: twice the train length), for claims about the first steps of training."""
    header = ["run", "lr", "length"] + [f"step {s}" for s in steps]
    lines = [f"cells: {' / '.join(metrics)}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for folder in folders:
        for run in load_runs(folder):
            n = str(length or 2 * run["config"]["train_len"])
            at = {r["step"]: r for r in run["rows"]}
            cells = [" / ".join(f"{at[s][m][n]:.3f}" for m in metrics) if s in at else "-" for s in steps]
            name = run["path"].relative_to(Path(folder).parent)
            lines.append(f"| {name} | {run['config']['lr']:g} | {n} | " + " | ".join(cells) + " |")
    return lines


def write_summary(out, names, title=None, to=None):
    """The summary of the runs under out/<name> for each of `names`, written into `to` (default: out): summary.md
    (a table per metric) and summary.csv, plus the figures: summary.png (curves), summary_final.png (bars),
    summary_lengths.png (final accuracy vs length, with 3 or more eval lengths) and, for configs that differ in
    state size, vocabulary or training length, summary_state_size.png (Fig. 7b), summary_vocab_size.png (Fig. 6)
    or summary_train_len.png (Fig. 9)."""
    out = Path(out)
    to = Path(to or out)
    to.mkdir(parents=True, exist_ok=True)
    rows = summarize(out, names)
    if not rows:
        raise ValueError(f"no finished runs under {out}")
    same = all(r["lens"] == rows[0]["lens"] for r in rows)  # else each cell names its length (mqar vs copy)
    lens_header = rows[0]["lens"] if same else [f"length {k + 1}" for k in range(max(len(r["lens"]) for r in rows))]
    cell = lambda ms, n: "-" if ms[0] != ms[0] else f"{ms[0]:.3f} ± {ms[1]:.3f}" + ("" if same else f" @{n}")
    tables = {}
    for metric, heading in METRICS.items():
        header = ["config", "seeds", "lr", "c"] + [f"@{n}{'*' if same and n == rows[0]['train_len'] else ''}"
                                                   for n in lens_header] + ["AUC", "max > 99%"]
        table = [f"## {heading}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for r in rows:
            cells = [r["config"], str(r["seeds"]), f"{r['lr']:g}" + (" (best)" if r["swept"] else ""), f"{r['c']:g}"]
            cells += [cell(r[f"{metric}@{n}"], n) for n in r["lens"]] + ["-"] * (len(lens_header) - len(r["lens"]))
            cells += [f"{r[f'{metric}_auc'][0]:.3f}", f"{r[f'{metric}_max99'][0]:.0f}"]
            table.append("| " + " | ".join(cells) + " |")
        tables[metric] = table + [""]
    tables["per_seed"] = per_seed_table(out, rows)
    failed = [f for r in rows for f in r["failed"]]
    notes = ["## failed runs (diverged; not in the tables)", ""] + [f"- {f}" for f in failed] + [""] if failed else []
    unfinished = [str(r["path"].relative_to(out)) for name in names for r in load_runs(out / name)
                  if not r["done"] and not r["failed"]]
    if unfinished:
        notes += ["## unfinished runs (still training, or stopped; not in the tables)", ""]
        notes += [f"- {f}" for f in unfinished] + [""]
    intro = [f"# {title or out.name}: final accuracy, mean ± std over seeds", "",
             "Per config, the learning rate and c with the best mean final exact match (then token accuracy) at "
             "the train length (marked *); every length is reported at that choice.", ""]
    (to / "summary.md").write_text("\n".join(intro + sum(tables.values(), []) + notes))
    with open(to / "summary.csv", "w", newline="") as f:
        flat = [{k: (f"{v[0]:.4f} ± {v[1]:.4f}" if isinstance(v, tuple) else v) for k, v in r.items()} for r in rows]
        writer = csv.DictWriter(f, list(dict.fromkeys(k for r in flat for k in r)))
        writer.writeheader()
        writer.writerows(flat)
    print("\n".join(tables["exact_match"] + notes))
    groups = [load_run_group(out / r["config"], finished_only=True) for r in rows if r["seeds"]]
    plot_accuracy(groups, to / "summary.png", out.name)
    plot_final(groups, to / "summary_final.png", f"{out.name}: mean ± std over seeds")
    if max(len(r["lens"]) for r in rows) >= 3:
        plot_lengths(groups, to / "summary_lengths.png", out.name)
    configs = [load_runs(out / r["config"])[0]["config"] for r in rows]
    for key in axes_to_plot(configs):
        plot_against(rows, configs, key, to / AGAINST[key][1], out.name)
    return rows


# ----------------------------------------------------------------------------------------------------
# Figures

def plot_accuracy(groups, path, title="", metric="exact_match"):
    """groups: (label, train_len, [rows per seed]); mean ± std band over seeds (truncated to the shortest).
    Panel k shows each group's k-th eval length beyond its train length (solid) and its train length (dotted)."""
    def longer(train_len, runs):
        return [int(n) for n in runs[0][0][metric] if int(n) != train_len] or [train_len]
    shown = [longer(train_len, runs) for _, train_len, runs in groups]
    fig, axes = plt.subplots(1, max(map(len, shown)), figsize=(5 * max(map(len, shown)), 3.8), squeeze=False)
    colours = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for colour, (label, train_len, runs), lengths in zip(colours, groups, shown):
        n = min(len(rows) for rows in runs)
        steps = [r["step"] for r in runs[0][:n]]
        for ax, length in zip(axes[0], lengths):
            for at, style in ((train_len, ":"), (length, "-")):
                if str(at) not in runs[0][0][metric]:
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
    _save(fig, path, title)


def plot_final(groups, path, title="", metric="exact_match"):
    """Final accuracy per group, mean ± std over seeds, one bar per eval length: for grids such as the
    ablation, where curves would overlap."""
    lens = sorted({int(n) for _, _, runs in groups for n in runs[0][-1][metric]})
    fig, ax = plt.subplots(figsize=(max(5.0, 1 + 0.18 * len(groups) * len(lens)), 4))
    width = 0.8 / len(lens)
    for i, length in enumerate(lens):
        means, stds = zip(*(mean_std([rows[-1][metric].get(str(length), float("nan")) for rows in runs])
                            for _, _, runs in groups))
        ax.bar([g + (i - (len(lens) - 1) / 2) * width for g in range(len(groups))], means, width, yerr=stds,
               capsize=2, label=f"@{length}")
    ax.set_xticks(range(len(groups)), [label for label, _, _ in groups], rotation=60, ha="right", fontsize=8)
    ax.set(ylabel=f"final {metric.replace('_', ' ')}", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    _save(fig, path, title)


def plot_lengths(groups, path, title="", metric="exact_match"):
    """Final accuracy vs evaluation length per group, mean ± std over seeds (Fig. 7a's view)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, train_len, runs in groups:
        lens = sorted(int(n) for n in runs[0][-1][metric])
        mean, std = zip(*(mean_std([rows[-1][metric][str(n)] for rows in runs]) for n in lens))
        line, = ax.plot(lens, mean, "o-", label=label, markersize=3)
        ax.fill_between(lens, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.15)
        ax.axvline(train_len, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="evaluation length (dotted: train length)", ylabel=f"final {metric.replace('_', ' ')}",
           ylim=(-0.02, 1.02))
    ax.legend(fontsize=6, ncol=1 + len(groups) // 8)
    _save(fig, path, title)


AGAINST = {  # a config value the paper plots accuracy against: axis label, file, what each column shows
    "d_state": ("state size N", "summary_state_size.png",  # Fig. 7b
                (("max length with > 99%", lambda r, m: r[f"{m}_max99"]), ("AUC vs length", lambda r, m: r[f"{m}_auc"]))),
    "vocab_size": ("vocabulary size", "summary_vocab_size.png", ()),  # Fig. 6
    "train_len": ("training length", "summary_train_len.png", ()),  # Fig. 9
}
AT_1X_2X = (("at the train length", lambda r, m: r[f"{m}@{r['train_len']}"]),
            ("at 2×", lambda r, m: r.get(f"{m}@{2 * r['train_len']}", (float("nan"),) * 2)))


def line_of(config):
    """The curve a config belongs to in plot_against: its task, arch and init."""
    return config.get("task", ""), config.get("arch", ""), "mimetic" if config.get("mimetic") else "default"


def axes_to_plot(configs):
    """The AGAINST keys that vary within some curve (not merely between tasks, as vocab does in Fig. 4)."""
    curves = {}
    for config in configs:
        curves.setdefault(line_of(config), []).append(config)
    return [key for key in AGAINST if any(len({c.get(key) for c in group}) > 1 for group in curves.values())]


def plot_against(rows, configs, key, path, title="", metrics=("exact_match", "token_acc")):
    """Final accuracy (a row per metric) against config[key] on a log axis, one line per task, arch and init
    (named by the parts that differ); points are means over seeds, bars their std. Fig. 7b: max > 99% length
    and AUC vs N; Figs. 6 and 9: accuracy at the train length and at 2× vs vocabulary or training length."""
    xlabel, _, columns = AGAINST[key]
    columns = columns or AT_1X_2X
    lines = {}
    for r, config in zip(rows, configs):
        lines.setdefault(line_of(config), []).append((config[key], r))
    varies = [i for i in range(3) if len({line[i] for line in lines}) > 1] or [2]
    fig, axes = plt.subplots(len(metrics), len(columns), figsize=(5 * len(columns), 3.6 * len(metrics)), squeeze=False)
    for row, metric in zip(axes, metrics):
        for line, points in lines.items():
            points.sort(key=lambda p: p[0])
            for ax, (_, value) in zip(row, columns):
                values = [value(r, metric) for _, r in points]
                ax.errorbar([x for x, _ in points], [v[0] for v in values], yerr=[v[1] for v in values], marker="o",
                            capsize=2, label=" ".join(line[i] for i in varies))
        ticks = sorted({x for points in lines.values() for x, _ in points})
        for ax, (name, _) in zip(row, columns):
            ax.set(xscale="log", xlabel=xlabel, xticks=ticks, xticklabels=[str(x) for x in ticks],
                   ylabel=f"{METRICS[metric].split(' (')[0]}\n{name}")
            ax.minorticks_off()
            ax.legend(fontsize=7)
    _save(fig, path, title)


@torch.no_grad()
def attention_panels(model, inputs):
    """Per layer: (average attention map, average mask ∏Ā or None) on one example, as numpy arrays, from what
    each mixer reads (mixer_inputs: forward pre-hooks, for ours and transformers' models alike). A mixer with
    no attention matrix (an architecture registered in mimetic.ARCHS without one) gets (None, None)."""
    panels = []
    for i, h in mixer_inputs(model, inputs).items():
        mixer = model.layers[i].mixer
        is_ssm = layout_of(mixer) is not None  # ours, or a transformers / mamba_ssm Mamba layer
        mask = attention_mask(mixer, h)[0].cpu().numpy() if is_ssm else None
        try:
            panels.append((attention_map(mixer, h)[0].cpu().numpy(), mask))
        except TypeError:  # attention_matrix knows Mamba layers, Attention and LinearAttention
            panels.append((None, None))
    return panels


def plot_attention(panels, title, path):
    """Each layer's attention map (§2, top) and average mask ∏Ā (bottom)."""
    fig, axes = plt.subplots(2, len(panels), figsize=(2.6 * len(panels), 5.2), squeeze=False)
    for i, (amap, mask) in enumerate(panels):
        if amap is None:
            axes[0, i].text(0.5, 0.5, "no attention map", ha="center", va="center")
        else:
            axes[0, i].imshow(amap, cmap="viridis")
        axes[0, i].set_title(f"layer {i} map", fontsize=9)
        if mask is not None:
            axes[1, i].imshow(mask, cmap="magma", vmin=0, vmax=1)
            axes[1, i].set_title(f"layer {i} mask ∏Ā", fontsize=9)
        else:
            axes[1, i].text(0.5, 0.5, "attention:\nno mask" if amap is not None else "no mask", ha="center",
                            va="center")
        for ax in axes[:, i]:
            ax.set_xticks([]), ax.set_yticks([])
    _save(fig, path, title)


def plot_maps(maps, path, title="attention maps of one layer, after training"):
    """maps: (label, attention map, mask or None) per run; the maps side by side, masks below when any."""
    rows = 2 if any(mask is not None for _, _, mask in maps) else 1
    fig, axes = plt.subplots(rows, len(maps), figsize=(2.8 * len(maps), 2.9 * rows), squeeze=False)
    for i, (label, amap, mask) in enumerate(maps):
        axes[0, i].imshow(amap, cmap="viridis")
        axes[0, i].set_title(label, fontsize=8)
        if rows == 2:
            axes[1, i].imshow(mask if mask is not None else amap * 0, cmap="magma", vmin=0, vmax=1)
            axes[1, i].set_title("mask ∏Ā" if mask is not None else "attention: no mask", fontsize=8)
        for ax in axes[:, i]:
            ax.set_xticks([]), ax.set_yticks([])
    _save(fig, path, title)


def _save(fig, path, title):
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
