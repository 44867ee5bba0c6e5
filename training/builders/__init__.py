"""Config -> model: the family registry, the pieces every family shares, one module per family, and loading a
checkpoint folder back into its model."""
