"""What readers do with the repository: copy mimetic.py alone into their project, run the README's library
example, execute the tutorial as a notebook."""
import importlib.util
import json
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import HERE

# ---------------------------------------------------------------------------------------------------
# mimetic.py is the file people copy: it must work alone

FOREIGN_KERNELS = "raise RuntimeError('a module named kernels that is not ours ran')\n"  # Hugging Face's, say


def test_mimetic_py_reads_in_a_100_column_editor():
    """mimetic.py is read top to bottom in a 100-column editor: at most 20 lines run past column 100 (issue
    37), and none past 120. No cap on its length: clearer, not shorter by cramming."""
    lines = Path(HERE, "mimetic.py").read_text(encoding="utf-8").splitlines()
    assert len([line for line in lines if len(line) > 100]) <= 20
    assert not [i + 1 for i, line in enumerate(lines) if len(line) > 120]


def run_python(code, cwd, pythonpath=""):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": pythonpath})


@pytest.mark.long
def test_mimetic_py_alone_trains_and_ignores_other_kernels_modules(tmp_path):
    """Copied alone into a project where another `kernels` is importable (Hugging Face's, which transformers
    imports), mimetic.py neither runs it nor uses it: its own loops train the model, after one warning."""
    project, elsewhere = tmp_path / "project", tmp_path / "site"
    (elsewhere / "kernels").mkdir(parents=True)
    (elsewhere / "kernels" / "__init__.py").write_text(FOREIGN_KERNELS)
    project.mkdir()
    shutil.copy(os.path.join(HERE, "mimetic.py"), project)
    script = """
import sys
sys.modules["mimetic_kernels"] = None  # a project without our package: this interpreter may have it installed
import torch, mimetic
assert mimetic.kernels is None and not mimetic.use_kernels and mimetic.__file__.startswith(sys.path[1])
torch.manual_seed(0)
for arch in ("mamba1", "mamba2"):
    config = mimetic.ModelConfig(vocab_size=8, d_model=16, n_layers=2, arch=arch, headdim=8, d_state=8)
    model = mimetic.mimetic_init_(mimetic.LM(config))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randint(0, 8, (8, 12))
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
print("ok")
"""
    out = run_python(script.replace("sys.path[1]", repr(str(project))), project, pythonpath=str(elsewhere))
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    assert out.stderr.count("UserWarning: mimetic runs its own PyTorch loops") == 1
    assert "mimetic_kernels failed to import" in out.stderr  # the warning says why the fast path is off


def test_mimetic_and_its_users_share_one_kernels_module():
    """mimetic.kernels is the module `import mimetic_kernels` gives, so a setting made through either (the scan
    backend, say) is seen by both; no top-level module of the checkout is named kernels."""
    import mimetic
    import mimetic_kernels
    assert mimetic.kernels is mimetic_kernels and mimetic.use_kernels
    assert not Path(HERE, "kernels.py").exists() and not Path(HERE, "kernels").exists()


def fresh_venv(path):
    """A venv that sees the running interpreter's packages (torch, hatchling, ...) through a .pth file: unlike
    --system-site-packages, which gives the *system* Python's, this works from inside a venv too. The name
    sorts first, so those packages are on sys.path before an editable install's .pth imports `editables`."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    python = str(path / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "00_outer_site_packages.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    return python, purelib


def pip_install(python, *args):
    """pip install --no-deps, offline when the running interpreter has the build backend (the test extra)."""
    offline = all(importlib.util.find_spec(name) for name in ("hatchling", "editables"))
    pip = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps",
                          *(["--no-build-isolation"] if offline else []), *args], capture_output=True, text=True,
                         timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]


@pytest.mark.long
@pytest.mark.parametrize("editable", [True, False])
def test_install_gives_the_fast_path_and_claims_only_the_name_mimetic(tmp_path, editable):
    """pip install . (or -e .) into a fresh environment: mimetic runs mimetic_kernels' scans without a word of
    warning, `import kernels` still finds the other package of that name (Hugging Face's, say), and train.py is
    no module, from any folder."""
    python, purelib = fresh_venv(tmp_path / "venv")
    pip_install(python, *(["-e"] if editable else []), HERE)
    os.makedirs(os.path.join(purelib, "kernels"))
    with open(os.path.join(purelib, "kernels", "__init__.py"), "w") as f:
        f.write("WHOSE = 'the other package'\n")
    home = HERE if editable else purelib
    code = f"""
import importlib.util, os, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mimetic
assert not [w for w in caught if "mimetic" in str(w.message)], [str(w.message) for w in caught]
import kernels
assert kernels.WHOSE == 'the other package'
assert mimetic.use_kernels and mimetic.kernels.__name__ == 'mimetic_kernels'
assert os.path.dirname(mimetic.__file__) == {home!r}, mimetic.__file__
assert mimetic.kernels.__file__ == os.path.join({home!r}, 'mimetic_kernels.py')
assert importlib.util.find_spec('train') is None
print('ok')
"""
    out = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.long
def test_the_wheel_and_the_sdist_ship_mimetic_and_mimetic_kernels(tmp_path):
    pytest.importorskip("hatchling")
    build = subprocess.run([sys.executable, "-m", "hatchling", "build", "-d", str(tmp_path)], cwd=HERE,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,), (sdist,) = tmp_path.glob("*.whl"), tmp_path.glob("*.tar.gz")
    top = {name for name in zipfile.ZipFile(wheel).namelist() if "/" not in name}
    assert top == {"mimetic.py", "mimetic_kernels.py"}  # no train.py
    with tarfile.open(sdist) as tar:
        assert {"mimetic.py", "mimetic_kernels.py"} <= {Path(name).name for name in tar.getnames()}


def test_readme_own_model_example_runs(monkeypatch, tmp_path, capsys):
    """The README's transformers snippet, on a tiny random model instead of the hub's (no network here)."""
    transformers = pytest.importorskip("transformers")
    tiny = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=1000, hidden_size=16, num_hidden_layers=4,
                                                                  state_size=8))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda name: tiny)
    code = re.findall(r"```python\n(.*?)```", open(os.path.join(HERE, "README.md")).read(), re.S)[1]
    namespace = {}
    exec(code.replace("/tmp/my-mamba", str(tmp_path / "my-mamba")), namespace)
    lines = capsys.readouterr().out.splitlines()
    before, after = [line.split() for line in lines[1:5]], [line.split() for line in lines[6:10]]
    assert lines[0].split()[:5] == lines[5].split()[:5] == ["layer", "mask", "∏Ā", "Ā", "Δ"]
    assert all(float(b[3]) < 0.2 and a[3] == "1" and a[4] == "0" for b, a in zip(before, after))  # Δ, then 1 ± 0
    assert lines[10] == "torch.Size([1, 24, 24])"
    assert (tmp_path / "my-mamba" / "config.json").exists()
    loaded = transformers.MambaForCausalLM.from_pretrained(tmp_path / "my-mamba")  # an unmodified model
    assert torch.allclose(loaded.backbone.layers[0].mixer.A_log, tiny.backbone.layers[0].mixer.A_log)


@pytest.mark.long
def test_readme_library_example_runs():
    readme = open(os.path.join(HERE, "README.md")).read()
    namespace = {}
    exec(re.search(r"```python\n(.*?)```", readme, re.S).group(1), namespace)
    assert len(namespace["maps"]) == 4 and namespace["maps"][0].shape == (32, 41, 41)
    assert namespace["model"].layers[0].mixer.mimetic_c.item() == 8.0


@pytest.mark.long
def test_tutorial_executes_as_a_notebook(tmp_path):
    """tutorial.py asserts each of its claims; CI runs it the way readers do, as a notebook."""
    for name in ("tutorial.py", "mimetic.py", "mimetic_kernels.py"):
        shutil.copy(os.path.join(HERE, name), tmp_path)
    out = subprocess.run(["jupytext", "--to", "ipynb", "--execute", "tutorial.py"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    notebook = json.loads((tmp_path / "tutorial.ipynb").read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(cell["execution_count"] for cell in code)  # every cell ran, not only the file's text
    images = [o for cell in code for o in cell["outputs"] if "image/png" in o.get("data", {})]
    shown = len(re.findall(r"^plt\.show\(\)$", open(os.path.join(HERE, "tutorial.py")).read(), re.M))
    assert shown >= 4 and len(images) == shown  # each plt.show() left its figure in the notebook


@pytest.mark.long
def test_bench_runs_every_section_and_compares_with_a_revision():
    """experiments/bench.py is the command behind every speed number in the README: a short run of each section."""
    bench = [sys.executable, "-m", "experiments.bench"]
    step = subprocess.run([*bench, "--only", "step", "--archs", "mamba2", "--steps", "2", "--rounds", "1",
                           "--contenders", "ours,loop,rev,hf", "--against", "HEAD"], capture_output=True, text=True,
                          timeout=600, cwd=HERE)
    assert step.returncode == 0, step.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| ") for line in step.stdout.splitlines() if line.startswith("| ours")}
    assert rows == {"ours", "ours, readable loop", "ours at HEAD"}
    assert ("| Hugging Face |" in step.stdout) == (importlib.util.find_spec("transformers") is not None)
    scans = subprocess.run([*bench, "--only", "scans"], capture_output=True, text=True, timeout=600, cwd=HERE)
    assert scans.returncode == 0 and "| ssd (32, 33, 4, 32, 128) float32 | torch |" in scans.stdout, scans.stderr


@pytest.mark.long
def test_bench_check_passes_here_and_prints_each_architectures_step_and_the_grid_estimates():
    """`python -m experiments.bench --check`, a GPU user's first command, in small: on a plain CPU (Triton's interpreter
    off, as a user's CPU runs it) the scans match the reference and fig1's grid gets an estimate."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "experiments.bench", "--check", "--presets", "fig1", "--steps",
                           "1"], capture_output=True, text=True, timeout=600, cwd=HERE, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [[f.strip() for f in line.strip("|").split("|")] for line in done.stdout.splitlines() if line[:2] == "| "]
    assert [r[2] for r in rows if r[-1] == "ok"] == ["torch"] * 4 and "FAILED" not in done.stdout
    assert {r[0] for r in rows if r[1] in ("fig1", "fig2", "fig5")} == {"mamba1", "mamba2", "MA", "ML"}
    (fig1,) = [r for r in rows if r[0] == "fig1"]
    assert fig1[1] == "12" and float(fig1[2]) >= float(fig1[3]) > 0  # on 8 devices: no slower
    assert "ESTIMATED" in done.stdout and "all scan checks passed" in done.stdout


@pytest.mark.long
def test_bench_check_fails_on_a_backend_off_the_reference(monkeypatch, capsys):
    import mimetic_kernels
    import train
    from experiments import bench
    monkeypatch.setattr(mimetic_kernels, "_INTERPRETED", False)  # the torch backend only: the interpreter is slow
    c = train.resolve_config({"device": "cpu", "d_model": 16, "d_state": 8, "headdim": 8, "batch_size": 2,
                              "train_len": 4})
    assert bench.check_scans({"mamba1": c, "mamba2": c}, torch.device("cpu"))
    monkeypatch.setitem(bench.CHECK_TOL, torch.float32, 0.0)  # no backend is exact
    assert not bench.check_scans({"mamba1": c, "mamba2": c}, torch.device("cpu"))
    assert "| FAILED |" in capsys.readouterr().out
