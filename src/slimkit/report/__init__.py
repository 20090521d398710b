"""Reports a person reads: JSON for machines, one self-contained HTML file with plots for people."""

from slimkit.report.html import Report

__all__ = ["Report"]
