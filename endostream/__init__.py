"""endostream: real-time surgical video inference (training, export, serving)."""

__version__ = "0.1.0"
