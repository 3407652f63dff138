"""One small registry type: named entries (backbone builders and entries, preprocessings, protocols,
selections, heads), registered once, looked up with a "did you mean".

A Registry is a mapping name -> entry in registration order, so `name in R`, `R[name]`, `list(R)` and
`R.items()` read as a dict's do; `R.get(name)` is the user-facing lookup (one clear line naming the
closest known names). Registering a name twice is refused: two entries behind one name would make
one name mean two things in stored rows.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Generic, TypeVar

from featstore.suggest import unknown

T = TypeVar("T")
_MISSING = object()


class Registry(MutableMapping, Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind  # what the entries are called in messages: "backbone", "protocol", ...
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T = _MISSING, *, replace: bool = False):
        """`R.register(name, entry)` adds entry and returns it; `@R.register(name)` adds the decorated
        function or class. replace=True swaps an entry on purpose (tests)."""
        def add(e: T) -> T:
            if name in self._entries and not replace:
                raise ValueError(f"{self.kind} '{name}' is registered already")
            self._entries[name] = e
            return e
        return add if entry is _MISSING else add(entry)

    def get(self, name: str, default=_MISSING) -> T:
        """The entry; unknown names raise ValueError (did you mean ...; known: ...) unless a default is given."""
        if name in self._entries:
            return self._entries[name]
        if default is not _MISSING:
            return default
        raise ValueError(unknown(self.kind, name, self._entries))

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def entries(self) -> tuple[T, ...]:
        return tuple(self._entries.values())

    def where(self, pred: Callable[[T], bool]) -> tuple[str, ...]:
        """Names of the entries for which pred(entry) holds, in registration order."""
        return tuple(n for n, e in self._entries.items() if pred(e))

    # the mapping protocol (MutableMapping adds keys/items/values/__contains__); item assignment stays
    # possible so tests can swap an entry for a while (monkeypatch.setitem)
    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __setitem__(self, name: str, entry: T) -> None:
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._entries)})"
