"""Reports from records only: the column specification (columns), report.md (markdown) and report.html (html)."""
