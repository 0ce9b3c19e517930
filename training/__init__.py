"""nativevl.training: padding-free multimodal packing and training through TRL's SFTTrainer."""

from nativevl.training.packing import IGNORE_INDEX, PackingCollator, best_fit_rows


__all__ = ["IGNORE_INDEX", "PackingCollator", "best_fit_rows"]
