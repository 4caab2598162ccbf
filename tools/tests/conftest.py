"""Fixtures of the tooling's own tests: the ones the product's tests use, taken from their conftests
(pytest reads conftest.py files only under the tests' own folder), so both run with the same set-up."""

from tests.conftest import _log_lines_written_during_the_test, services  # noqa: F401
from tests.integration.conftest import run, runner  # noqa: F401
