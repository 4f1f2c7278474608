"""Evaluation: lm-eval with the project's tasks, exits per loop or layer, the exit sweep, routing analysis."""
