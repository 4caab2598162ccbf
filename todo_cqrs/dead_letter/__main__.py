"""List dead letters, or re-send them to project_event:

    python -m todo_cqrs.dead_letter list
    python -m todo_cqrs.dead_letter resend [--key KEY ...] [--url URL]

The store is the one DEAD_LETTER_STORE and its settings name, as for the dead_letter function.
"""

from __future__ import annotations

import argparse
import sys

from todo_cqrs.dead_letter.resend import RESEND_TIMEOUT_S, resend
from todo_cqrs.dead_letter.store import from_settings
from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.settings import settings


def list_letters() -> int:
    store = from_settings()
    for key in store.list():
        try:
            letter = store.get(key)
        except KeyError:  # re-sent or deleted by someone else since the listing
            continue
        fields = (key, letter.id, letter.type, letter.subject, letter.error_code, letter.error_dest)
        print("\t".join(value or "-" for value in fields))
    return 0


def resend_letters(keys: list[str] | None, url: str, timeout_s: float) -> int:
    report = resend(from_settings(), url, keys, timeout_s)
    for key in report.sent:
        print(f"sent\t{key}")
    for key, reason in report.kept.items():
        print(f"kept\t{key}\t{reason}")
    print(f"{report} (to {url})", file=sys.stderr)
    return 1 if report.kept else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m todo_cqrs.dead_letter", description="Dead letters.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="one line per letter: key, id, type, subject, error code, error dest")
    resend_parser = commands.add_parser("resend", help="re-send letters; each is deleted only after a 2xx")
    resend_parser.add_argument("--key", action="append", help="only this letter (repeatable); default: all")
    resend_parser.add_argument("--url", default=None, help="default: PROJECT_EVENT_URL")
    resend_parser.add_argument("--timeout", type=float, default=RESEND_TIMEOUT_S, help="seconds per request")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            return list_letters()
        return resend_letters(args.key, args.url or settings().project_event_url, args.timeout)
    except DependencyUnavailable as exc:
        print(f"error: {exc.message}: {exc.cause}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
