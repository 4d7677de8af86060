"""``python -m frankenllama.server``: the same as ``frankenllama serve`` (see :mod:`frankenllama.server`)."""
import sys

from . import main

sys.exit(main(prog="python -m frankenllama.server"))
