"""`python -m modeling_looped_moe.eval`: the same as `looped-moe-eval`."""

from .command import main


raise SystemExit(main())
