"""The degeneracy report: every analysis on one model and dataset, saved as
report.json, a self-contained report.html and one CSV per table."""

from .build import degeneracy_report
from .registry import SECTIONS, Section, SectionOutput, register_section
from .report import Report, SectionResult
from .settings import PRESETS, ReportSettings

__all__ = ["PRESETS", "SECTIONS", "Report", "ReportSettings", "Section", "SectionOutput", "SectionResult",
           "degeneracy_report", "register_section"]
