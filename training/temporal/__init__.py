"""Temporal activity recognition (issue 20): a causal head over the frozen per-frame model's outputs.

Pipeline: `clips` renders labelled clips at the head's time step; `features` runs a frozen multi-task checkpoint over
them once and caches the activity head's pre-logit features and probabilities on disk; `heads` holds the causal
heads (learned `CausalTCN` from `tcn`, training-free `EMAFilter` and `HMMFilter`) behind one interface (`base`: whole
sequence, or one step with a fixed-size state); `train` trains / fits them; `metrics` and `evaluate` score
per-frame and temporal labels on held-out clips (frame accuracy, macro-F1, edit, F1@{10,25,50}, spurious switches
per minute); `plot` draws one clip's timeline. export/temporal.py turns a head into the bundle's `temporal_head.onnx`.
Design notes: docs/temporal.md.
"""
