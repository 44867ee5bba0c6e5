"""Foreign checkpoints (DINOv2, OpenAI CLIP, SAM encoder and mask decoder) through one loader skeleton.

`_io.py` reads files and Hugging Face folders, unwraps, detects the source (`Sources`), strips prefixes and loads
strictly (`load_checked`); `_keys.py` applies and mirrors key maps. `dinov2.py`, `clip.py`, `sam.py` and
`sam_decoder.py` hold only their key tables and their specifics (architecture from shapes or config.json,
resampling to the target model). A new source adds one such module.
"""

from training.weights._io import BackboneCheckpoint, load_checked

__all__ = ["BackboneCheckpoint", "load_checked"]
