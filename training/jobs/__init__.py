"""End-to-end jobs built on the other rooms: the demo, the ablation grid, the training-cost bench."""
