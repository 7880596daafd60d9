"""experiments/bench.py — speed, measured side by side in one run. From the repository's root:

    python -m experiments.bench                # CPU, one thread: training steps, mixers, scans
    python -m experiments.bench --against 8c378fb          # also the training step of this repository at that commit
    python -m experiments.bench --only step --preset fig1 --scale paper   # the step of a train.py preset's first config
    python -m experiments.bench --only scans --device cuda # the scan table on a GPU, against mamba_ssm's CUDA kernels
    python -m experiments.bench --only sweep               # a small sweep by one process, then by torchrun's two
    python -m experiments.bench --only threads # train.py's default threads vs 1 and all cores, quiet and busy
    python -m experiments.bench --check        # first thing on a GPU: backends correct? step times, estimates

check:  every scan backend usable here against the reference loop (forward and backward, fp32 and bf16) at
        the fig1 preset's Mamba 1 and Mamba 2 shapes; train.py's training step timed for each architecture;
        and each preset's grid time on this device and on --devices of them, estimated from those step
        times. Paper scale on a GPU, the cpu scale on a CPU (--scale to choose). Exit status 1 if a check fails.

step:   one training step (forward, backward, AdamW) of a whole model on the batches training draws (by
        default the main job's: copy strings of 2-16 of 64 tokens, batch 32), for Mamba 2 and Mamba 1.
        Contenders: ours, ours with mimetic.py's readable loop instead of mimetic_kernels.py, ours under
        torch.compile(dynamic=True) (compile time excluded), this repository at --against, and Hugging
        Face transformers' Mamba2ForCausalLM / MambaForCausalLM of the same sizes (their torch paths).
        Each runs in a worker process of its own, in interleaved rounds; a cell is the median over rounds
        of the mean step time over the same fixed batches. "loss" is the last step's: the same model on the
        same batches gives the same loss whatever the speed.
mixer:  one sequence-mixing layer, forward + backward, ours vs Hugging Face's mixer with the same weights.
scans:  mimetic_kernels.py's backends against the reference loop, and mamba_ssm's CUDA kernels on a GPU.
Peers that are not installed are named as such. Ratios are contender / ours: above 1 means slower.
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
WORKER = [sys.executable, "-m", "experiments.bench", "--worker"]  # run in HERE


def _installed(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


# ----------------------------------------------------------------------------------------------------
# Training step: one worker process per contender

def _hf_model(m):
    """Hugging Face's Mamba (1 or 2) LM with our model config's sizes, tied embeddings, on its torch path."""
    import transformers
    transformers.logging.set_verbosity_error()  # not its note, on every call, that mamba_ssm is missing
    common = dict(vocab_size=m["vocab_size"], hidden_size=m["d_model"], num_hidden_layers=m["n_layers"],
                  state_size=m["d_state"], expand=m["expand"], tie_word_embeddings=True)
    if m["arch"] == "mamba2":
        config = transformers.Mamba2Config(**common, head_dim=m["headdim"], n_groups=1, chunk_size=64,
                                           num_heads=m["expand"] * m["d_model"] // m["headdim"])
        return transformers.Mamba2ForCausalLM(config)
    return transformers.MambaForCausalLM(transformers.MambaConfig(**common))


def _worker(spec):
    """Time spec["contender"]'s training step on the batches in spec["batches"] (a file the parent wrote);
    prints {"ms": mean ms per step, "cpu_ms": the same in the process's CPU time, "loss": the last step's
    loss}. The first three batches (all of them for torch.compile) warm up. threads None: train.py's default."""
    sys.path.insert(0, spec["code"])
    import mimetic
    torch.manual_seed(0)
    m, device = spec["model"], torch.device(spec["device"])
    if spec["contender"] == "hf":
        model = _hf_model(m).to(device)
        forward = lambda inputs: model(inputs).logits
    else:
        mimetic.use_kernels = spec["contender"] not in ("loop", "revloop")  # "rev": the revision's mimetic.py as it is
        if hasattr(getattr(mimetic, "kernels", None), "SCAN_BACKEND"):  # older revisions have no such setting
            mimetic.kernels.SCAN_BACKEND = spec["scan_backend"]
        fields = {f.name for f in dataclasses.fields(mimetic.ModelConfig)}  # an older revision knows fewer
        model = mimetic.LM(mimetic.ModelConfig(**{k: v for k, v in m.items() if k in fields and v is not None}))
        model = (mimetic.mimetic_init_(model) if spec["mimetic"] else model).to(device)
        forward = torch.compile(model, dynamic=True) if spec["contender"] == "compile" else model
    if spec["threads"] is None:  # train.py's default for this model
        from experiments import runtime
        spec["threads"] = runtime.default_threads(sum(p.numel() for p in model.parameters()))
    torch.set_num_threads(spec["threads"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [[t.to(device) for t in batch] for batch in torch.load(spec["batches"])]

    def step(inputs, targets):
        loss = F.cross_entropy(forward(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for inputs, targets in (batches if spec["contender"] == "compile" else batches[:3]):  # warm-up (and compile)
        step(inputs, targets)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    for inputs, targets in batches:
        loss = step(inputs, targets)
    sync()
    print(json.dumps({"ms": 1e3 * (time.perf_counter() - start) / len(batches), "loss": loss.item(),
                      "cpu_ms": 1e3 * (time.process_time() - cpu_start) / len(batches), "threads": spec["threads"]}))


def _step_config(args, arch):
    """(label, train.py's resolved config) of the main job, or of a preset's first config of that arch."""
    import train
    from experiments import presets
    if args.preset:
        _, shared, grid = presets.presets(args.scale)[presets.ALIASES.get(args.preset, args.preset)]
        configs = {name: train.resolve_config({**shared, **flags, "device": "cpu"}) for name, flags in grid.items()}
        name, c = next(((n, c) for n, c in configs.items() if c.arch == arch), (None, None))
        if c is None:
            sys.exit(f"preset {args.preset} has no {arch} config")
        return f"preset {args.preset} ({args.scale}), config {name}", c
    c = train.resolve_config({"arch": arch, "device": "cpu", "mimetic": args.mimetic,
                              **({"d_state": 32} if arch == "mamba1" else {})})
    return ("the main job" + (" with Mamba 1, N = 32 (fig1's cpu config)" if arch == "mamba1" else "")
            + (", mimetic init" if args.mimetic else ", default init")), c


def bench_step(args):
    revision_dir = None
    if args.against:
        revision_dir = tempfile.mkdtemp(prefix="bench-")
        for name in ("mimetic.py", "mimetic_kernels.py", "kernels.py"):  # kernels.py: its name before 2026-12-06
            shown = subprocess.run(["git", "-C", HERE, "show", f"{args.against}:{name}"], capture_output=True,
                                   text=True)
            if shown.returncode == 0:
                with open(os.path.join(revision_dir, name), "w") as f:
                    f.write(shown.stdout)
    names = {"ours": "ours", "loop": "ours, readable loop", "compile": "ours, torch.compile",
             "rev": f"ours at {args.against}", "hf": "Hugging Face"}
    chosen = ["ours"] + [k for k in args.contenders.split(",") if k != "ours" and (k != "rev" or args.against)]
    names["revloop"] = f"ours at {args.against}, readable loop"  # that revision's mimetic.py without its kernels
    if "revloop" in chosen and not args.against:
        sys.exit("--contenders revloop needs --against")
    if bad := [k for k in chosen if k not in names]:
        sys.exit(f"unknown --contenders {bad}; choose from {', '.join(names)}")
    missing = [] if _installed("transformers") or "hf" not in chosen else ["Hugging Face transformers"]
    chosen = [k for k in chosen if k != "hf" or not missing]
    import train
    for arch in args.archs.split(","):
        label, c = _step_config(args, arch)
        g = torch.Generator().manual_seed(0)
        batches = tempfile.NamedTemporaryFile(suffix=".pt", delete=False).name  # the same batches for every contender
        torch.save([train.training_batch(c, g) for _ in range(args.steps)], batches)
        times, cpu, losses = {names[k]: [] for k in chosen}, {names[k]: [] for k in chosen}, {}
        for _ in range(args.rounds):
            for k in chosen:
                name = names[k]
                spec = dict(code=revision_dir if k in ("rev", "revloop") else HERE, contender=k,
                            model=train.model_config_kwargs(c), mimetic=c.mimetic, batches=batches,
                            threads=args.threads, device=args.device, scan_backend=args.scan_backend)
                done = subprocess.run(WORKER + [json.dumps(spec)], capture_output=True,
                                      text=True, env={**os.environ, "PYTHONPATH": ""}, cwd=HERE)
                if done.returncode:
                    sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                times[name].append(result["ms"])
                cpu[name].append(result["cpu_ms"])
                losses[name] = result["loss"]
        ours, ours_cpu = statistics.median(times["ours"]), statistics.median(cpu["ours"])
        rows = f"rows packed to {c.pack} tokens" if c.pack else f"{c.task} examples"
        print(f"\n## training step, {arch}: {label}; batches of {c.batch_size} {rows}, lengths "
              f"{c.min_train_len}-{c.train_len}; {args.steps} steps × {args.rounds} rounds")
        print("| contender | ms / step | × ours | CPU ms / step | × ours | loss |\n|---|---:|---:|---:|---:|---:|")
        for name, values in times.items():  # CPU time: the process's, all threads; on a loaded machine it moves less
            c = statistics.median(cpu[name])
            print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / ours:.2f} | "
                  f"{c:.1f} | {c / ours_cpu:.2f} | {losses[name]:.5f} |")
    if missing:
        print(f"\nnot installed, not timed: {', '.join(missing)}")


# ----------------------------------------------------------------------------------------------------
# A sweep: one process, then torchrun's processes side by side (not part of the default run)

def bench_sweep(args):
    """Wall time of the same small sweep (the fig1 cpu preset, --sweep-steps steps, one seed) run by one process
    and by torchrun with --nproc processes, one after the other, in fresh folders."""
    sweep = ["--preset", "fig1", "--scale", "cpu", "--sweep", "--seeds", "0", "--steps", str(args.sweep_steps),
             "--eval-every", str(args.sweep_steps)]
    times = {}
    for label, launcher in (("1 process, 1 thread", [sys.executable, "-m", "experiments.sweep", "--threads", "1"]),
                            (f"torchrun, {args.nproc} processes", ["torchrun", "--standalone", "--nproc_per_node",
                                                                    str(args.nproc), "-m", "experiments.sweep"])):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            done = subprocess.run([*launcher, *sweep, "--out", out], capture_output=True, text=True, cwd=HERE)
            if done.returncode:
                sys.exit(f"{label} failed:\n{done.stderr[-2000:]}")
            times[label] = time.perf_counter() - start
    print(f"\n## a sweep: fig1's 4 cpu configs × 1 seed × {args.sweep_steps} steps")
    print("| launcher | wall s | × one process |\n|---|---:|---:|")
    one = next(iter(times.values()))
    for label, seconds in times.items():
        print(f"| {label} | {seconds:.0f} | {seconds / one:.2f} |")


# ----------------------------------------------------------------------------------------------------
# Threads: train.py's default against one thread and every core, on a quiet machine and with one core busy

def bench_threads(args):
    """The main job's step (Mamba 2) with --threads 1, with every core (torch's default), with every core
    and OMP's passive wait policy, and with train.py's default, interleaved; then the same while a spinning
    process keeps one core busy. The rule train.py's default must meet: with one core busy at most 1.3×
    --threads 1, and on a quiet machine no slower than --threads 1."""
    import train
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _, c = _step_config(args, "mamba2")
    batches = tempfile.NamedTemporaryFile(suffix=".pt", delete=False).name
    g = torch.Generator().manual_seed(0)
    torch.save([train.training_batch(c, g) for _ in range(args.steps)], batches)
    contenders = {"--threads 1": (1, {}), f"{cores} threads (torch's default)": (cores, {}),
                  f"{cores} threads, OMP_WAIT_POLICY=PASSIVE": (cores, {"OMP_WAIT_POLICY": "PASSIVE"}),
                  "train.py's default": (None, {"OMP_WAIT_POLICY": "PASSIVE"})}  # as train.py sets it
    print(f"\n## threads: the main job's training step; {args.steps} steps × {args.rounds} rounds, {cores} cores")
    print("| machine | threads | ms / step | × --threads 1 |\n|---|---|---:|---:|")
    for busy in (False, True):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        times, chosen = {name: [] for name in contenders}, None
        try:
            time.sleep(1.0 if busy else 0)  # let the spinner take its core before train.py looks for free ones
            for _ in range(args.rounds):
                for name, (threads, env) in contenders.items():
                    spec = dict(code=HERE, contender="ours", model=train.model_config_kwargs(c), mimetic=c.mimetic,
                                batches=batches, threads=threads, device="cpu", scan_backend=args.scan_backend)
                    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONPATH")}
                    done = subprocess.run(WORKER + [json.dumps(spec)], capture_output=True,
                                          text=True, env={**clean, **env}, cwd=HERE)
                    if done.returncode:
                        sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    times[name].append(result["ms"])
                    chosen = result["threads"] if threads is None else chosen
        finally:
            if spinner:
                spinner.kill()
        one = statistics.median(times["--threads 1"])
        for name, values in times.items():
            label = f"{name} ({chosen})" if name == "train.py's default" else name
            print(f"| {'one core busy' if busy else 'as it is'} | {label} | {statistics.median(values):.1f} | "
                  f"{statistics.median(values) / one:.2f} |")
        ratio = statistics.median(times["train.py's default"]) / one
        if busy:
            print(f"\nrule, one core busy: train.py's default ≤ 1.3× --threads 1: {'yes' if ratio <= 1.3 else 'NO'} "
                  f"({ratio:.2f}×)")


# ----------------------------------------------------------------------------------------------------
# Mixers: ours vs Hugging Face's with the same weights, in this process

def _time_ms(fn, device, repeats=5):
    """Median milliseconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench_mixers(args):
    if not _installed("transformers"):
        print("\n## mixers: Hugging Face transformers not installed, not timed")
        return
    import mimetic
    device = torch.device(args.device)
    print("\n## mixer forward + backward, batch 32 × 33 tokens, d_model 64 (the main job's longest batch); "
          "median of 5, interleaved")
    print("| mixer | ours ms | Hugging Face ms | × ours |\n|---|---:|---:|---:|")
    for arch in args.archs.split(","):
        c = dict(d_model=64, n_layers=1, d_state=128 if arch == "mamba2" else 32, headdim=32, expand=2, vocab_size=8,
                 arch=arch)
        torch.manual_seed(0)
        theirs = _hf_model(c).backbone.layers[0].mixer.to(device)
        ours = (mimetic.Mamba2(64, d_state=c.d_state, headdim=32) if arch == "mamba2"
                else mimetic.Mamba1(64, d_state=c.d_state)).to(device)
        ours.load_state_dict(theirs.state_dict())  # the same names and layouts: the same layer
        h = torch.randn(32, 33, 64, device=device, requires_grad=True)
        run = lambda layer: layer(h).square().mean().backward()
        ms = {name: [] for name in ("ours", "theirs")}
        for _ in range(3):
            ms["ours"].append(_time_ms(lambda: run(ours), device))
            ms["theirs"].append(_time_ms(lambda: run(theirs), device))
        o, t = statistics.median(ms["ours"]), statistics.median(ms["theirs"])
        print(f"| {arch} (N = {c.d_state}) | {o:.2f} | {t:.2f} | {t / o:.2f} |")


# ----------------------------------------------------------------------------------------------------
# Scans: mimetic_kernels.py's backends against the reference, and mamba_ssm's CUDA kernels on a GPU

HBM_BYTES_PER_S = 3.35e12  # H100 SXM
SCAN_SHAPES = [(64, 2048, 32, 128), (16, 1024, 16, 512), (8, 2048, 16, 2048), (4, 1536, 16, 4096)]  # b, D, N, L
SSD_SHAPES = [(64, 128, 32, 64, 128), (8, 2048, 32, 64, 128)]  # b, L, H, P, N
SCAN_SHAPES_SMALL = [(2, 64, 16, 128), (8, 128, 16, 64), (1, 256, 16, 512)]
SSD_SHAPES_SMALL = [(2, 128, 4, 16, 16), (1, 512, 8, 16, 32), (32, 33, 4, 32, 128)]  # the last: the main job


def _fwd_bwd_ms(run, inputs, device):
    """(forward ms, forward+backward ms) of run(**inputs) with every floating input requiring grad."""
    leaves = [t.requires_grad_() for t in inputs.values() if isinstance(t, torch.Tensor)]
    with torch.no_grad():
        fwd = _time_ms(lambda: run(**inputs), device)
    dy = torch.randn_like(run(**inputs))

    def step():
        for t in leaves:
            t.grad = None
        run(**inputs).backward(dy)

    return fwd, _time_ms(step, device)


def _scan_rows(label, runs, inputs, act_numels, out_numel, device):
    """One table row per backend in `runs`; ratios against the "mamba_ssm" row when there is one."""
    elem = inputs[next(iter(inputs))].element_size()
    # minimal traffic: forward reads the activations and writes y; backward reads them and dy, writes their grads
    fwd_bytes = (sum(act_numels) + out_numel) * elem
    bound = (1e3 * fwd_bytes / HBM_BYTES_PER_S, 1e3 * (fwd_bytes + (2 * sum(act_numels) + out_numel) * elem)
             / HBM_BYTES_PER_S)
    times = {name: _fwd_bwd_ms(run, inputs, device) for name, run in runs.items()}
    cuda = times.get("mamba_ssm")
    for name, (fwd, fb) in times.items():
        ratio = [f"{fwd / cuda[0]:.2f}", f"{fb / cuda[1]:.2f}"] if cuda and name != "mamba_ssm" else ["-", "-"]
        hbm = [f"{100 * bound[0] / fwd:.1f}%", f"{100 * bound[1] / fb:.1f}%"] if device.type == "cuda" else ["-", "-"]
        print(f"| {label} | {name} | {fwd:.3f} | {fb:.3f} | {ratio[0]} | {ratio[1]} | {hbm[0]} | {hbm[1]} |",
              flush=True)


def bench_scans(args):
    import mimetic_kernels as kernels
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        selective_scan_fn = mamba_chunk_scan_combined = None
    device = torch.device(args.device)
    cuda, small = device.type == "cuda", device.type == "cpu"
    ref_max_len = 1024 if small else 512
    print(f"\n## scans on {device}: median ms of 5; ratio = ours / mamba_ssm CUDA; %HBM = the minimal bytes at "
          f"{HBM_BYTES_PER_S:.3g} B/s (H100 SXM HBM3) / measured time")
    print("| op (b, D, N, L) or (b, L, H, P, N), dtype | backend | fwd ms | f+b ms | fwd / cuda | f+b / cuda | "
          "fwd HBM | f+b HBM |\n|---|---|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32,) if small else (torch.float32, torch.bfloat16):
        act = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=gen)).to(device, dtype)
        for b, dim, N, L in SCAN_SHAPES_SMALL if small else SCAN_SHAPES:
            dt = torch.empty(dim).uniform_(1e-3, 0.1, generator=gen)
            inputs = dict(u=act(b, dim, L), delta=act(b, dim, L, scale=0.1),
                          A=-torch.arange(1.0, N + 1).repeat(dim, 1).to(device), B=act(b, N, L), C=act(b, N, L),
                          D=torch.ones(dim, device=device), z=act(b, dim, L),
                          delta_bias=torch.log(torch.expm1(dt)).to(device))  # Mamba's initialization
            runs = {}
            if cuda and selective_scan_fn is not None:
                runs["mamba_ssm"] = lambda **kw: selective_scan_fn(**kw, delta_softplus=True)
            for backend in ("triton", "torch", "ref"):
                usable = backend != "triton" or cuda and kernels.triton is not None
                if usable and (backend != "ref" or L <= ref_max_len):
                    runs[backend] = lambda backend=backend, **kw: kernels.selective_scan(**kw, delta_softplus=True,
                                                                                       backend=backend)
            _scan_rows(f"scan {(b, dim, N, L)} {str(dtype)[6:]}", runs, inputs,
                       [3 * b * dim * L, 2 * b * N * L], b * dim * L, device)
        for b, L, H, P, N in SSD_SHAPES_SMALL if small else SSD_SHAPES:
            dt = torch.empty(H).uniform_(1e-3, 0.1, generator=gen)
            inputs = dict(x=act(b, L, H, P), dt=act(b, L, H, scale=0.1), A=-torch.rand(H, generator=gen).to(device),
                          B=act(b, L, 1, N), C=act(b, L, 1, N), D=torch.ones(H, device=device),
                          dt_bias=torch.log(torch.expm1(dt)).to(device))
            runs = {}
            if cuda and mamba_chunk_scan_combined is not None:
                runs["mamba_ssm"] = lambda x, dt, A, B, C, D, dt_bias: mamba_chunk_scan_combined(
                    x, dt, A, B, C, 64, D=D, dt_bias=dt_bias, dt_softplus=True)
            for backend in ("torch", "ref"):
                if backend != "ref" or L <= ref_max_len:
                    runs[backend] = lambda backend=backend, **kw: kernels.ssd_scan(**kw, dt_softplus=True,
                                                                                 backend=backend)
            _scan_rows(f"ssd {(b, L, H, P, N)} {str(dtype)[6:]}", runs, inputs,
                       [b * L * H * P, b * L * H, 2 * b * L * N], b * L * H * P, device)
    if cuda and selective_scan_fn is None:
        print("\nmamba_ssm not installed: no CUDA reference timed")


# ----------------------------------------------------------------------------------------------------
# --check: what a GPU user runs first

CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # relative error against the fp32 reference loop


def _scan_check_inputs(kind, c, dtype, device, gen):
    """Inputs of kernels.selective_scan (Mamba 1) or ssd_scan (Mamba 2) at config c's layer and batch shape."""
    import mimetic
    import train
    length = c.pack - 1 if c.pack else mimetic.make_batch(c.task, 1, c.train_len, vocab_size=c.vocab_size,
                                                          seq_len=train.mqar_seq_len(c, c.train_len))[0].shape[1]
    b, D, N = c.batch_size, c.expand * c.d_model, c.d_state
    act = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=gen)).to(device, dtype)
    par = lambda t: t.to(device)  # parameters stay fp32, as in the model under autocast
    if kind == "mamba1":
        dt = torch.empty(D).uniform_(1e-3, 0.1, generator=gen)
        return (b, D, N, length), dict(u=act(b, D, length), delta=act(b, D, length, scale=0.1),
                                       A=par(-torch.arange(1.0, N + 1).repeat(D, 1)), B=act(b, N, length),
                                       C=act(b, N, length), D=par(torch.ones(D)), z=act(b, D, length),
                                       delta_bias=par(torch.log(torch.expm1(dt))))
    H, P = D // c.headdim, c.headdim
    dt = torch.empty(H).uniform_(1e-3, 0.1, generator=gen)
    return (b, length, H, P, N), dict(x=act(b, length, H, P), dt=act(b, length, H, scale=0.1),
                                      A=par(-torch.rand(H, generator=gen) * 16), B=act(b, length, 1, N),
                                      C=act(b, length, 1, N), D=par(torch.ones(H)), dt_bias=par(torch.log(
                                          torch.expm1(dt))))


def _outputs_and_grads(fn, inputs):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y = fn(**leaves)
    y.float().square().sum().backward()
    return [y] + [leaves[k].grad for k in inputs]


def check_scans(c_by_kind, device):
    """Each usable backend against the reference loop in fp32 on the same (rounded) inputs; False if one fails."""
    import mimetic_kernels as kernels
    triton_ok = kernels.triton is not None and (device.type == "cuda" or kernels._INTERPRETED)
    print("\n## scans against the reference loop, forward and backward: largest relative error of y and the "
          "gradients\n| scan (shape) | dtype | backend | rel. error | tolerance | result |\n|---|---|---|---:|---:|---|")
    ok, gen = True, torch.Generator().manual_seed(0)
    for kind, c in c_by_kind.items():
        scan = kernels.selective_scan if kind == "mamba1" else kernels.ssd_scan
        extra = dict(delta_softplus=True) if kind == "mamba1" else dict(dt_softplus=True, chunk_size=64)
        for dtype in (torch.float32, torch.bfloat16):
            shape, inputs = _scan_check_inputs(kind, c, dtype, device, gen)
            want = _outputs_and_grads(lambda **kw: scan(**kw, **extra, backend="ref"),
                                      {k: v.float() for k, v in inputs.items()})
            for backend in ("torch", "triton") if triton_ok else ("torch",):
                got = _outputs_and_grads(lambda **kw: scan(**kw, **extra, backend=backend), inputs)
                err = max(((g.float() - w).norm() / w.norm()).item() for g, w in zip(got, want))
                passed = err <= CHECK_TOL[dtype]
                ok &= passed
                print(f"| {scan.__name__} {shape} | {str(dtype)[6:]} | {backend} | {err:.1e} | {CHECK_TOL[dtype]:g} | "
                      f"{'ok' if passed else 'FAILED'} |", flush=True)
    if not triton_ok:
        print(f"triton: not usable on {device} (needs CUDA, or TRITON_INTERPRET=1 for its interpreter); not checked")
    return ok


def _time_run(c, device, steps, warmup=2):
    """(ms per training step, ms per evaluation) for config c: train.py's train_step on its
    next_batch, as its loop runs them; the evaluation timed on one batch per length, times
    --eval-batches."""
    import train
    device, model, opt, schedule, batches = train.build_run(dataclasses.replace(c, device=str(device)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():  # train.py's step on its next batch; the loss stays on the device
        return train.train_step(model, opt, schedule, c, *train.next_batch(c, batches, device)[1])

    for _ in range(warmup):  # Triton's compile, the allocator, caches
        step()
    sync()
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    torch.stack(losses).tolist()  # waits for the GPU, as train.py's read of the losses
    step_ms = 1e3 * (time.perf_counter() - start) / steps
    start = time.perf_counter()
    train.evaluate_lengths(model, dataclasses.replace(c, eval_batches=1), device)
    sync()
    return step_ms, 1e3 * (time.perf_counter() - start) * c.eval_batches


def check(args):
    import train
    from experiments import presets as setups
    from experiments import sweep
    device = torch.device(args.device)
    scale = args.scale or ("paper" if device.type == "cuda" else "cpu")
    steps = args.steps or (5 if device.type == "cuda" else 2)
    everything = list(setups.presets(scale))
    presets = everything if args.presets == "all" else args.presets.split(",") if args.presets else (
        everything if device.type == "cuda" else ["fig1"])  # on a CPU: one grid, in seconds
    extra = dict(scan_backend=args.scan_backend, threads=args.threads)
    first = {}  # the first config of each architecture (layer pattern) over the presets
    for preset, (_, shared, configs) in setups.presets(scale).items():
        for flags in configs.values():
            c = train.resolve_config({**shared, **flags, "device": "cpu"})
            if not c.pretrained:
                first.setdefault(c.pattern or c.arch, (preset, c))
    ok = check_scans({kind: first[kind][1] for kind in ("mamba1", "mamba2")}, device)
    print(f"\n## training step (forward, backward, AdamW; train.py's loop), {scale} scale, {steps} steps after 2 "
          f"warm-up\n| architecture | from | d_model × layers, N | batch × train length | fp32 ms | bf16 ms | "
          f"bf16 / fp32 |\n"
          f"|---|---|---|---|---:|---:|---:|")
    timed = {}  # (model, batch) → (step ms, eval ms), fp32
    key = lambda c: json.dumps([train.model_config_kwargs(c), c.batch_size, c.pack, c.train_len,
                                c.task, c.eval_lens, c.eval_batches], sort_keys=True)
    for arch, (preset, c) in first.items():
        fp32, bf16 = (_time_run(dataclasses.replace(c, **extra, dtype=dtype), device, steps)
                      for dtype in ("fp32", "bf16"))
        timed[key(c)] = fp32
        rows = f"{c.batch_size} × {c.pack - 1}" if c.pack else f"{c.batch_size} × {c.train_len}"
        print(f"| {arch} | {preset} | {c.d_model} × {c.n_layers}, {c.d_state} | {rows} | {fp32[0]:.1f} | "
              f"{bf16[0]:.1f} | {bf16[0] / fp32[0]:.2f} |", flush=True)
    print(f"\n## ESTIMATED wall time of each preset's grid ({scale} scale, fp32) on this {device.type} and on "
          f"{args.devices} of them: steps × the measured step time + evals × the measured eval time, each "
          f"config's own model and batch timed once here; runs shared as torchrun shares them; not measured "
          f"end to end\n| preset | runs | est. hours, 1 device | est. hours, {args.devices} devices |\n"
          f"|---|---:|---:|---:|")
    for preset in presets:
        runs = [c for _, c in sweep.grid(["--preset", preset, "--scale", scale, "--device", "cpu"]).runs]
        if any(c.pretrained for c in runs):
            print(f"| {preset} | {len(runs)} | not estimated: it trains a pretrained model | |")
            continue
        seconds = []
        for c in runs:
            if key(c) not in timed:
                timed[key(c)] = _time_run(dataclasses.replace(c, **extra), device, steps, warmup=1)
            step_ms, eval_ms = timed[key(c)]
            seconds.append((c.steps * step_ms + (c.steps // c.eval_every + 1) * eval_ms) / 1e3)
        shared_by = max(sum(seconds[rank::args.devices]) for rank in range(args.devices))
        print(f"| {preset} | {len(runs)} | {sum(seconds) / 3600:.2f} | {shared_by / 3600:.2f} |", flush=True)
    if len(presets) < len(everything):
        print(f"(--presets all for the other {len(everything) - len(presets)} presets' grids)")
    print("\nall scan checks passed" if ok else "\nA SCAN CHECK FAILED: train with --scan-backend torch")
    return ok


def main(argv=None):
    head, _, tail = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=head, epilog=tail,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("step", "mixer", "scans", "sweep", "threads"),
                        help="one section (default: step, mixer and scans)")
    parser.add_argument("--check", action="store_true", help="correctness of the scans on this device, step times "
                        "and estimated grid times (see above); nothing else")
    parser.add_argument("--presets", help="check: estimate these presets' grids (comma-separated, or all; default: all "
                        "on a GPU, fig1 on a CPU)")
    parser.add_argument("--devices", type=int, default=8, help="check: estimate the grids on this many devices too "
                        "(default: %(default)s)")
    parser.add_argument("--scan-backend", default="auto", choices=("auto", "triton", "torch"),
                        help="check and step: train.py's --scan-backend (default: %(default)s)")
    parser.add_argument("--nproc", type=int, default=2, help="sweep: torchrun's processes (default: %(default)s)")
    parser.add_argument("--sweep-steps", type=int, default=400, help="sweep: steps per run (default: %(default)s)")
    parser.add_argument("--archs", default="mamba2,mamba1", help="step and mixer: comma-separated (%(default)s)")
    parser.add_argument("--against", help="step: also time this repository at a git revision (e.g. a commit)")
    parser.add_argument("--contenders", default="ours,loop,compile,rev,hf",
                        help="step: which to time, from ours, loop, compile, rev (needs --against), revloop "
                             "(--against's mimetic.py without its kernels), hf (default: %(default)s)")
    parser.add_argument("--preset", help="step: a train.py preset's first config instead of the main job")
    parser.add_argument("--mimetic", action="store_true", help="step: the main job with mimetic init (as train.py "
                        "--mimetic); without it, default init")
    parser.add_argument("--scale", choices=("paper", "cpu"), help="with --preset (default: cpu) and --check (default: "
                        "paper on a GPU, cpu on a CPU)")
    parser.add_argument("--steps", type=int, help="step: timed steps per round (default: 30); check: per config (5 on "
                        "a GPU, 2 on a CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="step: interleaved rounds (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(json.loads(args.worker))
    torch.set_num_threads(args.threads)
    print(f"# bench.py on {args.device}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{time.strftime('%Y-%m-%d')}")
    if args.check:
        sys.exit(0 if check(args) else 1)
    args.scale, args.steps = args.scale or "cpu", args.steps or 30
    sections = (("step", bench_step), ("mixer", bench_mixers), ("scans", bench_scans), ("sweep", bench_sweep),
                ("threads", bench_threads))
    for name, section in sections:
        if args.only == name or args.only is None and name not in ("sweep", "threads"):
            section(args)


if __name__ == "__main__":
    main()
