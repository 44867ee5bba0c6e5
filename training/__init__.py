"""Training side of endostream: backbones, adapters, models, data, trainer, evaluation."""
