"""The project's lm-eval tasks: YAML configs beside `local_tasks.py`, the functions they name."""
