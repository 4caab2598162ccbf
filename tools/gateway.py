"""The local gateway: the original sample's routes on one port, forwarded to the function processes,
and the live page (`/ui/`). What Knative's ingress does in a cluster; local tooling only.

It is nginx (Debian's package, installed like MariaDB when missing), configured from the route
table `tools.topology.ROUTES`: a C proxy costs a fraction of a Python one on every request (measured
in docs/performance.md), with keep-alive connections to every function. The functions answer both
their own paths and the gateway's, so nothing is rewritten. Unknown paths answer 404 and wrong
methods 405 (with Allow) in the contract's JSON error body; an unreachable or silent function
answers 503 with Retry-After; nginx's own refusals (a malformed request line or path, a body over
1 MiB, huge headers, TRACE and CONNECT, an HTTP version other than 1.x) get the same JSON body.
`/ui/api/` goes to the live page's pipeline server. No path reaches a function's /metrics
(Prometheus scrapes each function on its own port): any path ending in `/metrics` answers 404.

nginx's worker runs as the user who runs the gateway (root included, which nginx would otherwise drop
to `nobody`): it serves `ui/` and writes its temp files under `.local` in a checkout that only its
owner can read (mode 0700, what `mktemp -d` and Debian's home directories give).

Run: `python -m tools.gateway` (writes `.local/gateway/nginx.conf`, then runs nginx in the foreground).
"""

from __future__ import annotations

import grp
import os
import pwd
import sys
from collections import defaultdict
from pathlib import Path

import orjson

from todo_cqrs.http import error_body
from todo_cqrs.settings import LOCAL_DIR
from tools import services
from tools.topology import BY_NAME, GATEWAY_PORT, HOST, PIPELINE_PORT, REPO, ROUTES

RUN_DIR = LOCAL_DIR / "gateway" / str(GATEWAY_PORT)  # one per system (make run, the tests, the bench)
UI_DIR = REPO / "ui"
UPSTREAM_TIMEOUT_S = 15  # above get_todos' min_version wait (2 s) and any sane command
# Below the functions' keep-alive (gunicorn's 2 s): nginx never reuses a connection being closed.
UPSTREAM_IDLE_S = 1


def _error(code: str, message: str) -> str:
    """The contract's error body, as nginx's `return` text (between single quotes: none in a message)."""
    text = orjson.dumps(error_body(code, message)).decode()
    if "'" in text:
        raise ValueError(f"a gateway message may not hold a single quote: {message!r}")
    return text


def _routes() -> tuple[str, str]:
    """(the maps, the locations) for ROUTES: per path pattern, a map from the method to the function's
    upstream, and a location that answers 405 (with Allow) for a method the map does not know; and the
    map from a request target to its route's methods."""
    by_pattern: dict[str, dict[str, str]] = defaultdict(dict)
    for method, pattern, function in ROUTES:
        by_pattern[pattern][method] = function
        if method == "GET":
            by_pattern[pattern]["HEAD"] = function
    maps, locations, allowed_by_target = [], [], []
    for index, (pattern, methods) in enumerate(by_pattern.items()):
        variable = f"$route_{index}"
        entries = "".join(f"    {method} {function};\n" for method, function in methods.items())
        maps.append(f'  map $request_method {variable} {{\n{entries}    default "";\n  }}\n')
        allowed = ", ".join(methods)
        regex = "^" + pattern.replace("{id}", "[^/]+") + "/?$"
        allowed_by_target.append(f'    "~^{pattern.replace("{id}", "[^/?]+")}/?(\\?|$)" "{allowed}";\n')
        locations.append(
            f"    location ~ {regex} {{\n"
            f'      if ({variable} = "") {{\n'
            f'        add_header Allow "{allowed}" always;\n'
            f"        return 405 '{_error('method_not_allowed', f'method not allowed; use {allowed}')}';\n"
            f"      }}\n"
            f"      proxy_pass http://{variable};\n"
            f"    }}\n"
        )
    # The methods of the route a request target is on (the raw target: an error page's redirect has
    # replaced the URI), for a 405 that nginx answers itself.
    maps.append(f'  map $request_uri $allowed {{\n{"".join(allowed_by_target)}    default "";\n  }}\n')
    return "".join(maps), "".join(locations)


def _worker_user() -> str:
    """The `user` directive: as root, the worker stays root (nginx would drop to `nobody`, who cannot
    read a private checkout); otherwise nginx keeps the invoking user and ignores the directive."""
    if os.geteuid() != 0:
        return ""
    return f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"


def render_config(port: int = GATEWAY_PORT, run_dir: Path = RUN_DIR) -> str:
    """nginx.conf for the routes of tools.topology."""
    keepalive = f"keepalive 64; keepalive_timeout {UPSTREAM_IDLE_S}s;"
    upstreams = "\n".join(
        f"  upstream {name} {{ server {HOST}:{function.port}; {keepalive} }}"
        for name, function in BY_NAME.items()
    )
    maps, locations = _routes()
    temp = {name: run_dir / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    return f"""# Written by tools/gateway.py from tools/topology.py: do not edit.
{_worker_user()}worker_processes 1;
daemon off;
pid {run_dir / "nginx.pid"};
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  server_tokens off;
  default_type application/json;
  # No type by extension outside /ui/: every answer of the gateway's own (a 404 of /x.js too) is JSON.
  types {{ }}
  client_body_temp_path {temp["body"]};
  proxy_temp_path {temp["proxy"]};
  fastcgi_temp_path {temp["fastcgi"]};
  uwsgi_temp_path {temp["uwsgi"]};
  scgi_temp_path {temp["scgi"]};
  # The functions enforce the contract's 64 KiB; this only bounds what the gateway holds.
  client_max_body_size 1m;
  client_body_buffer_size 1m;
  large_client_header_buffers 4 64k;
  keepalive_timeout 75s;
  # A client that stops sending its headers or body is let go after 10 s (nginx closes the connection;
  # the functions answer 408 after the same time).
  client_header_timeout 10s;
  client_body_timeout 10s;
  keepalive_requests 1000000;
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_connect_timeout 2s;
  proxy_send_timeout {UPSTREAM_TIMEOUT_S}s;
  proxy_read_timeout {UPSTREAM_TIMEOUT_S}s;
  proxy_next_upstream off;
{upstreams}
  upstream pipeline {{ server {HOST}:{PIPELINE_PORT}; keepalive 4; keepalive_timeout {UPSTREAM_IDLE_S}s; }}
{maps}
  server {{
    listen {HOST}:{port} backlog=4096;
    # nginx's own refusals go to a URI, not a named location: when the request line itself is
    # refused (a %00 in the path, no version) the request has no URI, and a named location then fails
    # with a 500 of nginx's own HTML.
    error_page 400 /_gateway/400;
    error_page 404 /_gateway/404;
    error_page 405 = /_gateway/405;  # the code its location answers: 404 off the routes
    error_page 411 /_gateway/411;
    error_page 413 /_gateway/413;
    error_page 414 /_gateway/414;
    error_page 494 =431 /_gateway/431;
    error_page 501 /_gateway/501;
    error_page 505 /_gateway/505;
    error_page 502 504 =503 @unavailable;
    location = /healthz {{ return 200 '{{"status":"ok"}}'; }}
    location ~ /metrics/?$ {{ return 404 '{_error("not_found", "no route for this path")}'; }}
{locations}
    location = /ui {{ return 308 /ui/; }}
    location /ui/api/ {{
      proxy_pass http://pipeline;
      error_page 502 504 =503 @pipeline_unavailable;
    }}
    location /ui/ {{
      alias {UI_DIR}/;
      types {{ text/html html; text/css css; application/javascript js; image/png png; image/svg+xml svg; }}
      index index.html;
      charset utf-8;
      charset_types text/css application/javascript;
      add_header Cache-Control no-cache;
    }}
    location / {{ return 404 '{_error("not_found", "no route for this path")}'; }}
    location ^~ /_gateway/ {{
      internal;
      location = /_gateway/400 {{ return 400 '{_error("bad_request", "malformed HTTP request")}'; }}
      location = /_gateway/404 {{ return 404 '{_error("not_found", "no route for this path")}'; }}
      location = /_gateway/405 {{  # a method nginx refuses before routing (TRACE, CONNECT)
        if ($allowed = "") {{ return 404 '{_error("not_found", "no route for this path")}'; }}
        add_header Allow $allowed always;
        return 405 '{_error("method_not_allowed", "method not allowed; use $allowed")}';
      }}
      location = /_gateway/411 {{ return 411 '{_error("length_required", "the body needs a length")}'; }}
      location = /_gateway/413 {{ return 413 '{_error("payload_too_large", "the body is too large")}'; }}
      location = /_gateway/414 {{ return 414 '{_error("uri_too_long", "the request target is too long")}'; }}
      location = /_gateway/431 {{ return 431 '{_error("headers_too_large", "the headers are too large")}'; }}
      location = /_gateway/501 {{
        return 501 '{_error("not_implemented", "this transfer encoding is not supported")}';
      }}
      location = /_gateway/505 {{
        return 505 '{_error("http_version_not_supported", "use HTTP/1.0 or HTTP/1.1")}';
      }}
    }}
    location @pipeline_unavailable {{
      add_header Retry-After 1 always;
      return 503 '{_error("dependency_unavailable", "the pipeline server is unreachable")}';
    }}
    location @unavailable {{
      add_header Retry-After 1 always;
      return 503 '{_error("dependency_unavailable", "the function is unreachable or did not answer")}';
    }}
  }}
}}
"""


def main() -> None:
    services.ensure_packages(["nginx"])
    nginx = services.binary("nginx")
    assert nginx is not None
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    config = RUN_DIR / "nginx.conf"
    config.write_text(render_config())
    print(f"gateway (nginx) on http://{HOST}:{GATEWAY_PORT}; config {config}", file=sys.stderr, flush=True)
    # exec: nginx's master is this process, so the runner's signals and PDEATHSIG reach it.
    os.execv(nginx, [nginx, "-c", str(config), "-p", str(RUN_DIR), "-e", "stderr"])


if __name__ == "__main__":
    main()
