"""Where the two models differ, found from checksums of id ranges, never from every row.

Each side summarises a range of ids as a `Digest`: how many live todos it holds and the XOR of their
row checksums (CRC32 of the row's fields, computed by the database). Equal digests: the range is in
sync (up to a 2^-32 chance per range). A range whose digests differ is split in PARTS equal parts,
both sides summarise every part in one grouped query, and only the parts that differ are looked into
again, until a part holds few enough rows to compare row by row (a leaf).

This module is the search alone, over any `Side`: the database's (todo_cqrs/reconcile/sides.py) or
an in-memory one in the unit tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

# A chunk of 20,000 todos cut in 128 parts is ranges of about 160: one grouped query per side takes a
# differing chunk straight to ranges small enough to read (each query is a round trip and a temporary
# table, reading 250 rows is cheaper than another level of them).
PARTS = 128  # parts per split
LEAF_ROWS = 256  # a range with at most this many rows on each side is compared row by row


@dataclass(frozen=True, slots=True)
class Digest:
    """A range's summary on one side: live rows, XOR of their checksums, and every row it stores
    (tombstones too; only the read side has them). `rows` sizes the row-by-row look, never the
    comparison."""

    count: int = 0
    checksum: int = 0
    rows: int = 0

    def same_todos(self, other: Digest) -> bool:
        return self.count == other.count and self.checksum == other.checksum


EMPTY = Digest()


@dataclass(frozen=True, slots=True)
class IdRange:
    low: int  # inclusive
    high: int  # inclusive

    @property
    def size(self) -> int:
        return self.high - self.low + 1


class Side(Protocol):
    async def digests(self, ids: IdRange, width: int) -> dict[int, Digest]:
        """The digest of every non-empty part of `ids`, cut in parts of `width` ids: part k holds ids
        low + k*width .. low + (k+1)*width - 1. Empty parts may be left out."""
        ...


def part_width(ids: IdRange, parts: int = PARTS) -> int:
    """The width of each part when `ids` is cut in (at most) `parts` parts."""
    return max(1, -(-ids.size // parts))


def part_range(ids: IdRange, width: int, part: int) -> IdRange:
    low = ids.low + part * width
    return IdRange(low, min(ids.high, low + width - 1))


def differing_parts(
    ids: IdRange, width: int, mine: dict[int, Digest], theirs: dict[int, Digest]
) -> list[tuple[IdRange, Digest, Digest]]:
    """The parts whose digests differ, in id order, with both digests."""
    return [
        (part_range(ids, width, part), mine.get(part, EMPTY), theirs.get(part, EMPTY))
        for part in sorted(mine.keys() | theirs.keys())
        if not mine.get(part, EMPTY).same_todos(theirs.get(part, EMPTY))
    ]


def is_leaf(ids: IdRange, write: Digest, read: Digest, leaf_rows: int = LEAF_ROWS) -> bool:
    """Small enough to compare row by row: few rows on both sides, or too narrow to split."""
    return max(write.rows, write.count, read.rows, read.count) <= leaf_rows or ids.size <= 1


async def digest(side: Side, ids: IdRange) -> Digest:
    """The whole range as one digest."""
    return (await side.digests(ids, ids.size)).get(0, EMPTY)


async def differing_leaves(
    write: Side,
    read: Side,
    ids: IdRange,
    write_digest: Digest,
    read_digest: Digest,
    *,
    parts: int = PARTS,
    leaf_rows: int = LEAF_ROWS,
) -> AsyncIterator[IdRange]:
    """The small ranges inside `ids` (whose digests differ) where the two sides differ, in id order;
    ranges whose digests agree are never looked into."""
    if write_digest.same_todos(read_digest):
        return
    if is_leaf(ids, write_digest, read_digest, leaf_rows):
        yield ids
        return
    width = part_width(ids, parts)
    mine, theirs = await asyncio.gather(write.digests(ids, width), read.digests(ids, width))
    for part, write_part, read_part in differing_parts(ids, width, mine, theirs):
        async for leaf in differing_leaves(
            write, read, part, write_part, read_part, parts=parts, leaf_rows=leaf_rows
        ):
            yield leaf
