"""The research lab: protection stages, attacks, the accuracy and privacy tables, training."""
