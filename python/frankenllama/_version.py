"""frankenllama's version and the llama.cpp commit it builds, defined here and nowhere else.

Dependency-free on purpose: pyproject.toml takes ``__version__`` from this file (scikit-build-core's
regex metadata provider), and scripts/llama_source.py loads it by path at build time, before the
package exists.
"""
__version__ = "0.1.0"

#: upstream llama.cpp commit of the pinned source (vendored by llama-cpp-python 0.3.36)
LLAMA_CPP_COMMIT = "0c1e57098"
