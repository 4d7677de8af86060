"""Prompt caches that never hand a model a state it cannot restore.

llama-cpp-python's prompt caches (``LlamaRAMCache``, ``LlamaDiskCache``) key saved states by their
tokens alone.  A state records the layer order it was saved under, and a model running another
order refuses it, so a cache shared by two orders (or by a model re-ordered after it was filled,
or filled by stock llama-cpp-python) would serve states that fail to load.

:class:`OrderKeyedCache` wraps a user's cache for one :class:`frankenllama.Llama`: each key is
prefixed with a namespace derived from the model (its file and the settings its K/V depends on)
and its current layer order, so entries of different models and orders never meet, and entries
written without a namespace (by stock llama-cpp-python) are never served.  An entry that still
cannot be restored is evicted and served as a miss.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from llama_cpp.llama import LlamaState
    from llama_cpp.llama_cache import BaseLlamaCache

#: namespace keys start with this marker; real token ids are never negative
_MARKER = -0x46524B4E  # "FRKN"


def order_namespace(model: str, n_weight_layers: int, order: Sequence[int], program: str = "") -> tuple[int, ...]:
    """Key prefix for states of ``model`` (an identity string) saved under ``order`` (and the spec
    of its layer program, if it is one): negative ints, which no token id is."""
    key = f"{model}:{n_weight_layers}:{','.join(map(str, order))}" + (f";{program}" if program else "")
    digest = hashlib.sha256(key.encode()).digest()
    return (_MARKER,) + tuple(-1 - int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4))


class OrderKeyedCache:
    """A view of a llama-cpp-python cache whose keys carry the model's current layer order.

    Args:
        inner: the user's cache (``LlamaRAMCache``, ``LlamaDiskCache`` or any ``BaseLlamaCache``);
            it may be shared by several models.
        namespace: returns the key prefix of the model's current order (it changes with
            ``set_layer_order``).
    """

    def __init__(self, inner: "BaseLlamaCache", namespace: Callable[[], tuple[int, ...]],
                 restorable: Callable[["LlamaState"], bool]) -> None:
        self.inner = inner
        self._namespace = namespace
        self._restorable = restorable

    def _stored_key(self, key: Sequence[int]) -> tuple[int, ...] | None:
        """The inner cache's longest-prefix match for ``key``, if it is of this namespace."""
        namespace = self._namespace()
        finder = getattr(self.inner, "_find_longest_prefix_key", None)
        wanted = namespace + tuple(key)
        stored = finder(wanted) if finder is not None else (wanted if wanted in self.inner else None)
        if stored is None or tuple(stored[:len(namespace)]) != namespace:
            return None
        return tuple(stored)

    def __getitem__(self, key: Sequence[int]) -> "LlamaState":
        stored = self._stored_key(key)
        if stored is None:
            raise KeyError("Key not found")
        state = self.inner[stored]
        if not self._restorable(state):
            self._evict(stored)  # it can never be restored here: a miss, and out of the way
            raise KeyError("Key not found")
        return state

    def __contains__(self, key: Sequence[int]) -> bool:
        return self._stored_key(key) is not None

    def __setitem__(self, key: Sequence[int], value: "LlamaState") -> None:
        self.inner[self._namespace() + tuple(key)] = value

    def _evict(self, stored: tuple[int, ...]) -> None:
        ram = getattr(self.inner, "cache_state", None)
        if ram is not None:  # LlamaRAMCache: an OrderedDict
            ram.pop(stored, None)
            return
        disk = getattr(self.inner, "cache", None)
        if disk is not None and hasattr(disk, "pop"):  # LlamaDiskCache (its reads pop already)
            disk.pop(stored, None)

    @property
    def capacity_bytes(self) -> int:
        return self.inner.capacity_bytes

    @property
    def cache_size(self) -> Any:
        return self.inner.cache_size

    def __repr__(self) -> str:
        return f"OrderKeyedCache({self.inner!r})"
