"""The peft-style tuner: adapter config, the AdapterLinear/TaskLinear layer, its variants (shared LoRA, TESLA,
TA-LoRA), apply/mark/merge/merge_and_unload and merged copies of whole models."""
