"""FastAPI inference service. Reads bundles only: imports neither `training` nor `export`."""
