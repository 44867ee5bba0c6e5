"""Evaluation: metrics, evaluating a model or checkpoint, reports, robustness under corruptions."""
