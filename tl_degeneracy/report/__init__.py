"""The degeneracy report (API.md, "report"): every analysis on one model and dataset, saved as
report.json, a self-contained report.html and one CSV per table."""

from .api import degeneracy_report
from .registry import SECTIONS, Section, SectionOutput, register_section
from .result import Report, SectionResult
from .settings import PRESETS, ReportSettings

__all__ = ["PRESETS", "SECTIONS", "Report", "ReportSettings", "Section", "SectionOutput", "SectionResult",
           "degeneracy_report", "register_section"]
