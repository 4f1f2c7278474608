"""`python -m modeling_looped_moe.conversion`: the same as `looped-moe-convert`."""

from .command import main


raise SystemExit(main())
