"""`python -m modeling_looped_moe.configuration {balance,table}`: capacity balancing and the presets table."""

from .command import main


raise SystemExit(main())
