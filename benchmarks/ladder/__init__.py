"""The option ladder: a scaling study of architecture options at small widths (issue 24)."""
