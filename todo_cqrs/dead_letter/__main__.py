"""List dead letters, or re-send them to project_event:

    python -m todo_cqrs.dead_letter list
    python -m todo_cqrs.dead_letter resend [--key KEY ...] [--url URL] [--token-file FILE]

The store is the one DEAD_LETTER_STORE and its settings name, as for the dead_letter function.
With sender identity on, project_event takes only its source's token: `--token-file` (RESEND_TOKEN_FILE)
names a file holding one (in a cluster, e.g. a projected service-account token for the audience
project-event); to a local project_event, a token of the local issuer is presented (tools/issuer.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from todo_cqrs.dead_letter.resend import PROJECT_EVENT_SERVICE, RESEND_TIMEOUT_S, resend
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


def authorization(url: str, token_file: str | None) -> Callable[[], str] | None:
    """The Authorization header to present: from the token file (read per request: a projected token
    is rotated), or the local issuer's for a local project_event; None when neither applies."""
    if token_file:
        return lambda: f"Bearer {Path(token_file).read_text().strip()}"
    if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    try:
        from tools import issuer  # the repository's local tooling (not in the images)
    except ImportError:
        return None
    tokens = issuer.Tokens(issuer.KAFKASOURCE_SUBJECT)  # the source's, whose delivery this retries
    return lambda: tokens.authorization(PROJECT_EVENT_SERVICE)


def resend_letters(keys: list[str] | None, url: str, timeout_s: float, token_file: str | None = None) -> int:
    report = resend(from_settings(), url, keys, timeout_s, authorization(url, token_file))
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
    resend_parser.add_argument(
        "--token-file",
        default=os.environ.get("RESEND_TOKEN_FILE") or None,
        help="a Bearer token for project_event (sender identity); default RESEND_TOKEN_FILE",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            return list_letters()
        url = args.url or settings().project_event_url
        return resend_letters(args.key, url, args.timeout, args.token_file)
    except DependencyUnavailable as exc:
        print(f"error: {exc.message}: {exc.cause}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
