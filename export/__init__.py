"""Checkpoint -> bundle (ONNX graph, engines, manifest). May import `training`; nothing imports it."""
