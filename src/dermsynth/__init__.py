"""dermsynth: diffusion-generated images against class imbalance in skin-lesion classification, measured honestly."""
__version__ = "0.1.0"
