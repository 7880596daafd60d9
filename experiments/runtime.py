"""runtime.py — what one run of train.py needs from its process and its folder, beside training: the threads
it takes, Ctrl-C and SIGTERM at a step boundary, the metrics files and the final table, checkpoint files
written atomically, and a user's mistake as one line. train.py decides what goes in them.
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from mimetic import METRICS


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


def metrics_header(eval_lens):
    per_length = [f"{metric}@{n}" for metric in METRICS for n in eval_lens]
    return ["step", "loss", "time", "wall_time", "tokens_per_s"] + per_length


def metrics_line(row, eval_lens):
    return ",".join(str(v) for v in [row["step"], row["loss"], row["time"], row["wall_time"], row["tokens_per_s"]]
                    + [row[m][str(n)] for m in METRICS for n in eval_lens])


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


# Checkpoints: written atomically; the previous one is kept until the next is safely on disk

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


def fail(message, code=2):
    """A user mistake: one line, exit status 2 (as argparse does), no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
