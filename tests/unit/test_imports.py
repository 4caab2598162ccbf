"""Each function's process imports only what it uses: bootstrap's builders import what they build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FUNCTIONS = Path(__file__).resolve().parents[2] / "functions"
LOADS = (
    "import importlib.util, json, sys\n"
    "spec = importlib.util.spec_from_file_location('main', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
)
DATABASE = {"sqlalchemy", "aiomysql", "pymysql", "greenlet"}


def imported_by(function: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", LOADS, str(FUNCTIONS / function / "main.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(json.loads(out))


def test_dead_letter_imports_no_database_package_and_no_kafka_client() -> None:
    imported = imported_by("dead_letter")
    assert imported & (DATABASE | {"confluent_kafka", "redis"}) == set()


@pytest.mark.parametrize("function", ["get_todos", "project_event"])
def test_the_read_side_imports_no_kafka_client(function: str) -> None:
    assert "confluent_kafka" not in imported_by(function)
