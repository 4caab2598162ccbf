"""`make func-run FN=name`: one function alone, in the foreground, on its local port ("local func run")."""

import os
import sys

from local.run import function_argv, function_env
from local.topology import BY_NAME

if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if name not in BY_NAME:
        sys.exit(f"usage: make func-run FN=<one of {', '.join(BY_NAME)}>")
    function = BY_NAME[name]
    print(f"{name} on {function.url} (Ctrl-C stops it)", file=sys.stderr)
    argv = function_argv(function)
    os.execve(argv[0], argv, {**os.environ, **function_env(function)})
