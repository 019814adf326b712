"""Data layer: readers -> canonical manifest.csv, lesion-grouped splits, preprocessed cache, built-in toy set."""
