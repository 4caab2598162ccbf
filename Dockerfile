# One Dockerfile for every image of the system.
#
#   function image:  docker build --build-arg FUNCTION=get_todos -t todo-cqrs-get-todos .
#   ops image:       docker build --target ops -t todo-cqrs-ops .   (the Jobs: migrations, rebuild, dead letters)
#
# `make images` builds all of them (mk/deploy.mk). A function image holds only that function's
# third-party packages (functions/$FUNCTION/requirements.txt), the shared package todo_cqrs/ and
# functions/$FUNCTION/. requirements.lock is used as a pip *constraint*: it installs nothing by itself,
# it only fixes the versions of whatever the requirements pull in transitively.

# Pinned to an exact patch release, and fully qualified so that Podman needs no short-name alias. To pin
# the digest as well, resolve it once and pass it:
#   docker build --build-arg PYTHON_IMAGE=docker.io/library/python:3.11.14-slim-bookworm@sha256:<digest> ...
# Where that registry is unreachable, `make images` builds on a local Debian base instead (make base-image):
# any base works that has `python` and `pip` on PATH, useradd and groupadd.
ARG PYTHON_IMAGE=docker.io/library/python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
# todo_cqrs is imported from /app (PYTHONPATH) rather than pip-installed: no build backend to fetch,
# and the alembic scripts under todo_cqrs/migrations/ are there exactly as in the repository.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONPATH=/app
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app
WORKDIR /app
COPY requirements.lock /tmp/constraints.txt

# ---- ops: the Jobs of knative/ (migrations) and knative/ops/ (read-model rebuild, dead letters) ---------
FROM base AS ops
# Package names only: the versions come from requirements.lock. mk/deploy.mk passes the same list.
ARG OPS_PACKAGES="alembic SQLAlchemy PyMySQL aiomysql greenlet orjson redis hiredis prometheus_client boto3 requests cloudevents"
RUN pip install ${OPS_PACKAGES} -c /tmp/constraints.txt && rm /tmp/constraints.txt
COPY todo_cqrs/ /app/todo_cqrs/
USER 10001:10001
CMD ["python", "-m", "todo_cqrs.migrations", "upgrade"]

# ---- one function (the default target) -----------------------------------------------------------------
FROM base AS function
ARG FUNCTION
RUN test -n "${FUNCTION}" || { echo "build with --build-arg FUNCTION=<folder under functions/>" >&2; exit 1; }
# Dependencies first, so editing code does not invalidate the pip layer.
COPY functions/${FUNCTION}/requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt -c /tmp/constraints.txt \
 && rm /tmp/requirements.txt /tmp/constraints.txt
COPY todo_cqrs/ /app/todo_cqrs/
COPY functions/${FUNCTION}/ /app/functions/${FUNCTION}/
# FUNCTION_TARGET is also what functions-framework and todo_cqrs.settings read for the function's name.
# The server: functions-framework's ASGI server, as `--asgi` runs it (todo_cqrs/serve.py: the function's
# requests straight to it, the framework's app for the rest): gunicorn with one uvicorn worker (uvloop,
# httptools), one event loop serving the pod's containerConcurrency requests at once
# (knative/services/*.yaml). One worker per pod: more throughput comes from more pods, and the
# Prometheus metrics of the one process are the pod's. PORT is set by Knative (default 8080).
# XDG_RUNTIME_DIR: gunicorn (25.1+) opens a control socket in $XDG_RUNTIME_DIR, else in $HOME/.gunicorn,
# and the app user's home is /nonexistent: it logged "Control server error" at every start. The root
# filesystem is read-only in the cluster (readOnlyRootFilesystem), /tmp is the pod's writable emptyDir
# (knative/services/*.yaml). todo_cqrs/serve.py builds gunicorn through BaseApplication, as
# functions-framework does, which reads neither GUNICORN_CMD_ARGS nor a gunicorn.conf.py.
ENV FUNCTION_TARGET=${FUNCTION} \
    WORKERS=1 \
    PORT=8080 \
    XDG_RUNTIME_DIR=/tmp
USER 10001:10001
EXPOSE 8080
# Shell form so the variables expand; exec so gunicorn is PID 1 and gets SIGTERM directly.
# tests/deploy/test_manifests.py runs this exact line locally against the function, and
# tests/deploy/test_images.py runs it in the built image; tools/run.py runs the same command (`make run`).
CMD exec python -m todo_cqrs.serve --target "$FUNCTION_TARGET" --source "functions/$FUNCTION_TARGET/main.py"
