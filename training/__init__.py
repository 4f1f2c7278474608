"""Training: the `Trainer` subclass and its arguments, data preparation, and a short time-capped loop."""
