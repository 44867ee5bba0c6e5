"""Training side of endostream: backbones, adapters, models, data, trainer, evaluation."""

from training.backbones import BACKBONES, build_backbone

__all__ = ["BACKBONES", "build_backbone"]
