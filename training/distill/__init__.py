"""Distillation: teacher banks and views, feature losses, and the on-disk teacher-feature cache."""
