"""Metrics: classification scores, feature extractors, FD/KID/PRDC, diversity, memorisation, the synthetic filter."""
