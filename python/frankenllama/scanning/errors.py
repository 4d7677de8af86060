"""The exception every bad scan input raises."""
from __future__ import annotations


class ScanError(ValueError):
    """A scan that cannot run as asked: an empty or too short text, a malformed probe line, an
    unknown sweep, a results file written for another model or text, a model that refuses layer
    orders.  The message names the problem."""
