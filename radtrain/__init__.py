"""radtrain: distributed ModernBERT training for radiology CUI classification."""

__version__ = "0.1.0"
