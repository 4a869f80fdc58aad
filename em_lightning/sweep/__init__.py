"""Seed sweeps: a grid of em-fit runs (grid.py), their on-disk plan and per-cell status (plan.py), the
local and SLURM launchers (local.py, slurm.py), and the summary across seeds (summary.py: means and 95%
intervals, read through report/ and phase/; figures.py draws it). No Lightning: each cell is an
``em-fit fit`` process."""
