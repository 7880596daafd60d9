"""The research harness around train.py, second to the core (mimetic.py, mimetic_kernels.py, train.py).

Imports point one way: mimetic ← runtime, pipeline, figures ← train.py ← presets, sweep, bench. Nothing imports
sweep or bench; train.py takes three helpers from here, none of which imports it back:
- runtime.py: a run's process and folder (threads, Ctrl-C, metrics files, atomic checkpoints, one-line errors)
- pipeline.py: Jelassi et al.'s packed rows (--pack) and pretrained hub models (--pretrained)
- figures.py: a run folder's pictures, and a sweep's summary tables and figures
- presets.py: the paper's figures as data, each value with its source, over train.Config's defaults
- sweep.py: `python -m experiments.sweep`: grids and sweeps (torchrun), --dry-run, eval, plot, summary
- bench.py: `python -m experiments.bench`: speed and the GPU self-check
"""
