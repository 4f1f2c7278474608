"""`looped-moe-eval`: lm-eval with the project's tasks, plus the exit sweep and the routing analysis.

    looped-moe-eval --model hf --model_args pretrained=DIR,exit_loop=1 --tasks looped_moe_local ...   # lm-eval
    looped-moe-eval sweep --model DIR --tasks local_blimp,local_perplexity --output runs/sweep          # every exit
    looped-moe-eval routing --model DIR --output-dir runs/routing                                     # routing
    looped-moe-eval tasks                                                                             # list tasks
    looped-moe-eval fetch-benchmarks                                                                  # benchmark data, once

Without a subcommand every argument goes to lm-eval's own command line (`looped-moe-eval --help` is lm-eval's help;
`looped-moe-eval sweep --help`, `looped-moe-eval routing --help` and `looped-moe-eval fetch-benchmarks --help` describe
the others).
"""

from __future__ import annotations

import sys


SUBCOMMANDS = ("sweep", "routing", "tasks", "fetch-benchmarks")


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand, or run lm-eval on the arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    if command == "sweep":
        from .sweep import main as sweep_main

        sweep_main(argv[1:])
    elif command == "routing":
        from .routing_command import main as routing_main

        routing_main(argv[1:])
    elif command == "fetch-benchmarks":
        from .benchmarks_command import main as fetch_main

        return fetch_main(argv[1:])
    elif command == "tasks":
        from lm_eval.tasks import TaskManager

        from .harness import TASKS_DIR

        print(f"the project's lm-eval tasks and tags, as lm-eval indexes them from {TASKS_DIR}:")
        for name in TaskManager(include_path=[str(TASKS_DIR)], include_defaults=False).all_tasks:
            print(f"  {name}")
    else:
        from .harness import main as harness_main

        harness_main(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
