"""``python -m frankenllama``: the frankenllama command line (see :mod:`frankenllama.cli`)."""
import sys

from .cli import main

sys.exit(main())
