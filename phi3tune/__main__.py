"""``python -m phi3tune`` = the ``phi3tune`` console script."""

from .cli import main

raise SystemExit(main())
