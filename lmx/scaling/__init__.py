"""Parameter/FLOP accounting, model-shape rules, sweeps and scaling-law fits."""
