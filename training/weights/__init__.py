"""Foreign checkpoints (DINOv2, OpenAI CLIP, SAM encoder and mask decoder) through one loader skeleton (`_io`, `_keys`)
and one small module per source holding its key table and its specifics."""
