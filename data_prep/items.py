"""Listed images, kept compactly: ImageNet-22k lists 14.2M images, and one ``SourceItem`` per image (its key, name,
path, offset and size as Python objects, ~300 bytes) held 5 GB before the first shard was written.

``ItemTable`` keeps a listing as columns, ~100 bytes per image: per container (a tar, or a folder) its synset, path
and name prefix once; per image its member name, offset and size. ``ItemView`` is a selection of a table's rows in
some order (a split, a shuffled split, a shard). Both are sequences of ``SourceItem``, made on access, so the code
that handles a few items at a time (the writer, the held-out checks) is unchanged; ``synset_at``/``size_at`` read one
column without making the item.
"""

from __future__ import annotations

import posixpath
from array import array
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple, Union

from data_prep.sources import SourceItem, sample_key

TAR, DIR, RAW = 0, 1, 2  # a container's kind: members of a tar, files of a folder, or one item stored as is


class ItemTable(Sequence[SourceItem]):
    """Rows added one container at a time (``add``); ``ordered()`` gives them sorted by (synset, key)."""

    def __init__(self) -> None:
        self.containers: List[Tuple[int, str, str, str]] = []  # (kind, synset, path, name prefix)
        self._container = array("i")
        self._members: List[str] = []
        self._offsets = array("q")
        self._sizes = array("q")

    def add(self, items: Iterable[SourceItem], synset: str, path: str, prefix: str, files: bool = False) -> None:
        """The items of one container, whose names are ``prefix + member`` and whose path is ``path`` (a tar) or
        ``path/member`` (``files``: a folder); an item that does not fit that shape is stored as is."""
        kind = DIR if files else TAR
        shared = len(self.containers)
        self.containers.append((kind, synset, path, prefix))
        for item in sorted(items, key=lambda it: it.key):
            member = item.name[len(prefix) :]
            fits = (
                item.name.startswith(prefix)
                and item.synset == synset
                and item.key == sample_key(member)
                and item.path == (posixpath.join(path, member) if files else path)
            )
            if fits:
                self._append(shared, member, item.offset, item.size)
            else:
                self.containers.append((RAW, item.synset, item.path, item.name))
                self._append(len(self.containers) - 1, item.key, item.offset, item.size)

    def _append(self, container: int, member: str, offset: int, size: int) -> None:
        self._container.append(container)
        self._members.append(member)
        self._offsets.append(offset)
        self._sizes.append(size)

    def __len__(self) -> int:
        return len(self._members)

    def __getitem__(self, i: Any) -> Any:  # (an int: a SourceItem; a slice: an ItemView)
        if isinstance(i, slice):
            return ItemView(self, array("i", range(len(self)))[i])
        kind, synset, path, prefix = self.containers[self._container[i]]
        member = self._members[i]
        if kind == RAW:
            return SourceItem(member, synset, path, self._offsets[i], self._sizes[i], prefix)
        where = posixpath.join(path, member) if kind == DIR else path
        return SourceItem(sample_key(member), synset, where, self._offsets[i], self._sizes[i], prefix + member)

    def synset_at(self, i: int) -> str:
        return self.containers[self._container[i]][1]

    def size_at(self, i: int) -> int:
        return self._sizes[i]

    def ordered(self) -> "ItemView":
        """Every row, sorted by (synset, key): containers in synset order, each already sorted by key; the rows of a
        synset that came in several containers are merged by key."""
        rows_of: Dict[str, List[int]] = {}
        for c, (kind, synset, _, _) in enumerate(self.containers):
            rows_of.setdefault(synset, []).append(c)
        starts: Dict[int, Tuple[int, int]] = {}
        for i, c in enumerate(self._container):  # each container's rows are contiguous, in the order added
            first, _ = starts.get(c, (i, i))
            starts[c] = (first, i + 1)
        order = array("i")
        for synset in sorted(rows_of):
            blocks = [range(*starts[c]) for c in rows_of[synset] if c in starts]
            if len(blocks) == 1:
                order.extend(blocks[0])
            else:
                order.extend(sorted((i for block in blocks for i in block), key=lambda i: self[i].key))
        return ItemView(self, order)


class ItemView(Sequence[SourceItem]):
    """Rows of a table (or of a list of items) in a given order; slicing gives another view."""

    def __init__(self, base: Sequence[SourceItem], rows: "array[int]") -> None:
        self.base, self.rows = base, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: Any) -> Any:  # (an int: a SourceItem; a slice: an ItemView)
        if isinstance(i, slice):
            return ItemView(self.base, self.rows[i])
        return self.base[self.rows[i]]

    def synset_at(self, i: int) -> str:
        return synset_reader(self.base)(self.rows[i])

    def size_at(self, i: int) -> int:
        return size_reader(self.base)(self.rows[i])


Items = Union[ItemTable, ItemView, List[SourceItem]]


def synset_reader(items: Sequence[SourceItem]) -> Callable[[int], str]:
    """``i -> items[i].synset``, without making the item where the sequence can."""
    reader = getattr(items, "synset_at", None)
    return reader if reader is not None else (lambda i: items[i].synset)


def size_reader(items: Sequence[SourceItem]) -> Callable[[int], int]:
    reader = getattr(items, "size_at", None)
    return reader if reader is not None else (lambda i: items[i].size)


def view(items: Sequence[SourceItem], rows: Iterable[int]) -> ItemView:
    """``rows`` of ``items`` as a view (of the underlying table when ``items`` is itself a view)."""
    rows = array("i", rows)
    if isinstance(items, ItemView):
        return ItemView(items.base, array("i", (items.rows[r] for r in rows)))
    return ItemView(items, rows)
