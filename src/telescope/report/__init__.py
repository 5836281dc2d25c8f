"""Figures and reports of study runs.

- :mod:`telescope.report.figures` -- matplotlib helpers in the paper's style (shared axes,
  log-scale widths, mean and spread over seeds, PNG + SVG)
- :func:`write_report` -- the self-contained ``report.html`` of a run
- :func:`rebuild_report` -- figures and report again from a run directory's saved results
"""

from telescope.report import figures
from telescope.report.html import ReportError, rebuild_report, render_guide, write_report

__all__ = ["figures", "write_report", "rebuild_report", "render_guide", "ReportError"]
