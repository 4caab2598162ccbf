"""Numbers read from text (path ids, `limit`, `min_version`, If-Match versions): ASCII digits, bounded."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from todo_cqrs.adapters import read_store, write_store
from todo_cqrs.domain.numbers import MAX_ID, MAX_VERSION, ascii_positive_int


@pytest.mark.parametrize(
    ("text", "value"), [("1", 1), ("7", 7), ("42", 42), ("007", 7), (str(MAX_ID), MAX_ID)]
)
def test_positive_integers_in_ascii_digits_are_read(text: str, value: int) -> None:
    assert ascii_positive_int(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0",
        "00",
        "-1",
        "+1",
        " 1",
        "1 ",
        "1.0",
        "1e3",
        "1_000",
        "0x10",
        "١٠",  # Arabic-Indic digits: int() reads them, str.isdigit() accepts them
        "²",  # superscript two: isdigit() but not int()
        "１",  # fullwidth one
        "७",  # Devanagari seven
        "1²",
    ],
)
def test_anything_but_ascii_digits_is_not_a_number(text: str) -> None:
    assert ascii_positive_int(text) is None


def test_values_beyond_the_maximum_are_refused() -> None:
    assert ascii_positive_int(str(MAX_ID + 1)) is None
    assert ascii_positive_int("100", maximum=100) == 100
    assert ascii_positive_int("101", maximum=100) is None


@pytest.mark.parametrize("digits", [20, 4301, 5000, 100_000])
def test_huge_digit_strings_are_refused_without_converting_them(digits: int) -> None:
    """int() refuses more than 4300 digits with a ValueError; these never reach it."""
    assert ascii_positive_int("9" * digits) is None


def test_the_limits_are_the_columns_of_both_databases() -> None:
    """A signed BIGINT id and a signed INT version, in the write DB's tables and the read model's."""
    for table in (write_store.todos, read_store.todos_view):
        assert type(table.c.id.type) is sa.BigInteger, table.name
        assert type(table.c.version.type) is sa.Integer, table.name
    assert type(write_store.outbox.c.version.type) is sa.Integer
    assert (MAX_ID, MAX_VERSION) == (2**63 - 1, 2**31 - 1)  # the signed ranges of those two types
