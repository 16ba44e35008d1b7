"""Run reports: PNG plots and a self-contained ``report.html`` built from ``summary.json``."""

from fedadapt.report.html import ReportError, build_report, load_summary

__all__ = ["ReportError", "build_report", "load_summary"]
