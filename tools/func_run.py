"""`make func-run FN=name`: one function alone, in the foreground, on its local port ("local func run").

An event receiver (project_event, dead_letter, relay_outbox, reconcile) runs as `make run` runs it: with
sender identity required and the local OIDC issuer (started here unless one already answers; it stops
with the function). `python -m tools.issuer token <audience>` prints a token its source would present.
"""

import os
import subprocess
import sys
import urllib.error
import urllib.request

from tools import issuer
from tools.processes import die_with_parent
from tools.run import function_argv, function_env, receiver_env
from tools.topology import BY_NAME


def issuer_answers() -> bool:
    try:
        with urllib.request.urlopen(f"{issuer.ISSUER_URL}/healthz", timeout=1) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if name not in BY_NAME:
        sys.exit(f"usage: make func-run FN=<one of {', '.join(BY_NAME)}>")
    function = BY_NAME[name]
    identity = receiver_env(function)
    if identity and not issuer_answers():
        subprocess.Popen([sys.executable, "-m", "tools.issuer"], preexec_fn=die_with_parent)
    print(f"{name} on {function.url} (Ctrl-C stops it)", file=sys.stderr)
    if identity:
        print(
            f"sender identity required (issuer {issuer.ISSUER_URL}); a token of its source:\n"
            f"  {sys.executable} -m tools.issuer token {function.service}",
            file=sys.stderr,
        )
    argv = function_argv(function)
    os.execve(argv[0], argv, {**os.environ, **function_env(function), **identity})
