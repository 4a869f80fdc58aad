"""Analysis of a run directory (analysis.py), then its figures (figures.py) and report.md (summary.py);
figures and summary import the analysis, never the reverse. No Lightning."""

from em_lightning.report.analysis import ModuleAnalysis, RunReport, analyse_run, read_scalars
from em_lightning.report.figures import draw_all
from em_lightning.report.summary import write_summary

__all__ = ["ModuleAnalysis", "RunReport", "analyse_run", "draw_all", "read_scalars", "write_summary"]
