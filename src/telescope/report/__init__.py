"""Reports of study runs (the figures are the studies' own, drawn with the helpers of
:mod:`telescope.plotting`).

- :func:`write_report` -- the self-contained ``report.html`` of a run
- :func:`rebuild_report` -- figures and report again from a run directory's saved results
"""

from telescope.report.html import ReportError, rebuild_report, render_guide, write_report

__all__ = ["write_report", "rebuild_report", "render_guide", "ReportError"]
