"""`python -m modeling_looped_moe.training`: the same as `looped-moe-train`."""

from .command import main


raise SystemExit(main())
