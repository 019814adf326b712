"""Classifiers: timm models, losses, samplers, the training loop, evaluation."""
