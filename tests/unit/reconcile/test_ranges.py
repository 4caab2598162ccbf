"""The search for differing ranges (todo_cqrs/reconcile/ranges.py) over in-memory sides: it finds
every difference, and looks only where digests differ."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterable

import pytest

from todo_cqrs.reconcile.ranges import (
    LEAF_ROWS,
    Digest,
    IdRange,
    differing_leaves,
    differing_parts,
    digest,
    part_range,
    part_width,
)


class MemorySide:
    """A side holding rows in memory: {id: content}; tombstones are stored but not compared."""

    def __init__(self, rows: dict[int, str], tombstones: Iterable[int] = ()) -> None:
        self.rows = dict(rows)
        self.tombstones = set(tombstones)
        self.queries: list[tuple[IdRange, int]] = []

    async def digests(self, ids: IdRange, width: int) -> dict[int, Digest]:
        self.queries.append((ids, width))
        found: dict[int, Digest] = {}
        for todo_id in sorted(self.rows.keys() | self.tombstones):
            if not ids.low <= todo_id <= ids.high:
                continue
            part = (todo_id - ids.low) // width
            held = found.get(part, Digest())
            if todo_id in self.rows:
                checksum = zlib.crc32(f"{todo_id}|{self.rows[todo_id]}".encode())
                held = Digest(held.count + 1, held.checksum ^ checksum, held.rows + 1)
            else:
                held = Digest(held.count, held.checksum, held.rows + 1)
            found[part] = held
        return found


def leaves(write: MemorySide, read: MemorySide, ids: IdRange) -> list[IdRange]:
    async def collect() -> list[IdRange]:
        mine, theirs = await asyncio.gather(digest(write, ids), digest(read, ids))
        return [leaf async for leaf in differing_leaves(write, read, ids, mine, theirs)]

    return asyncio.run(collect())


def ids_in(found: list[IdRange], candidates: Iterable[int]) -> set[int]:
    return {i for i in candidates if any(leaf.low <= i <= leaf.high for leaf in found)}


ALL = IdRange(1, 100_000)
ROWS = {i: f"todo {i}" for i in range(1, 100_001, 3)}


@pytest.mark.parametrize(
    ("size", "parts"), [(1, 16), (15, 16), (16, 16), (17, 16), (1_000_003, 16), (100, 7)]
)
def test_parts_cover_the_range_exactly_once(size: int, parts: int) -> None:
    ids = IdRange(10, 10 + size - 1)
    width = part_width(ids, parts)
    covered = [part_range(ids, width, k) for k in range(-(-size // width))]

    assert len(covered) <= parts
    assert covered[0].low == ids.low and covered[-1].high == ids.high
    assert all(a.high + 1 == b.low for a, b in zip(covered, covered[1:], strict=False))


def test_equal_sides_are_not_looked_into() -> None:
    write, read = MemorySide(ROWS), MemorySide(ROWS, tombstones=[2, 5])

    assert leaves(write, read, ALL) == []
    assert len(write.queries) == len(read.queries) == 1  # the whole range's digest, nothing more


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda rows: rows.pop(50_002), id="missing"),
        pytest.param(lambda rows: rows.update({50_002: "other title"}), id="different"),
        pytest.param(lambda rows: rows.update({50_003: "extra"}), id="extra"),
    ],
)
def test_one_difference_is_found_in_one_small_range(change: object) -> None:
    read_rows = dict(ROWS)
    change(read_rows)  # type: ignore[operator]
    write, read = MemorySide(ROWS), MemorySide(read_rows)

    found = leaves(write, read, ALL)

    assert len(found) == 1
    (leaf,) = found
    assert leaf.low <= 50_002 <= leaf.high or leaf.low <= 50_003 <= leaf.high
    assert sum(1 for i in ROWS if leaf.low <= i <= leaf.high) <= LEAF_ROWS
    # Only the parts holding the difference were split: one grouped query per level, per side.
    levels = len(write.queries) - 1
    assert levels <= 2  # 100,000 ids / 128 per level: 2 levels reach ranges of at most 256 rows
    assert len(read.queries) == len(write.queries)


def test_scattered_differences_are_each_found_and_every_leaf_holds_one() -> None:
    changed = [7, 31_000, 31_003, 77_776, 99_997]
    read_rows = dict(ROWS)
    for i in changed:
        read_rows[i] = "drifted"

    found = leaves(MemorySide(ROWS), MemorySide(read_rows), ALL)

    assert ids_in(found, changed) == set(changed)
    assert all(ids_in([leaf], changed) for leaf in found)


def test_a_range_dense_with_tombstones_is_split_until_its_rows_are_few() -> None:
    tombstones = range(1_000, 9_000)
    write = MemorySide({5_000: "live"})
    read = MemorySide({}, tombstones=tombstones)  # the live row is missing, among 8,000 tombstones

    found = leaves(write, read, IdRange(1, 10_000))

    (leaf,) = found
    assert leaf.low <= 5_000 <= leaf.high
    assert sum(1 for i in tombstones if leaf.low <= i <= leaf.high) <= LEAF_ROWS


def test_differing_parts_compares_counts_and_checksums_not_stored_rows() -> None:
    ids = IdRange(0, 159)
    width = part_width(ids, 16)
    mine = {0: Digest(1, 5, 1), 1: Digest(2, 9, 2), 3: Digest(1, 1, 1)}
    theirs = {0: Digest(1, 5, 40), 1: Digest(2, 8, 2), 2: Digest(1, 3, 1)}

    differing = differing_parts(ids, width, mine, theirs)

    assert [part for part, _, _ in differing] == [IdRange(10, 19), IdRange(20, 29), IdRange(30, 39)]
