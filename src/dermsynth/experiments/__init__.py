"""Experiments: the study grid, aggregation and statistics, the report, the demo."""
