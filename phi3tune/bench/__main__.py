"""``python -m phi3tune.bench CONFIG [...]``: the same as ``phi3tune bench`` (also under torchrun)."""

import sys

from phi3tune.cli import main

raise SystemExit(main(["bench", *sys.argv[1:]]))
