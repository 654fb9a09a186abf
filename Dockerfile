# Dynamics Token Broker: production image.
#
# Two stages on the same base image, so that the virtual environment built in the first one
# (whose python is a symlink to /usr/local/bin/python3.11) runs unchanged in the second:
#   build    builds the project's wheel and installs it with its dependencies into /opt/venv;
#   runtime  copies only /opt/venv: no compiler, no source tree, no wheels.
# The runtime user is the numeric UID 10001, so that Kubernetes' runAsNonRoot can verify it.
#
#   docker build -t token-broker:0.1.0 .
# A quick look with the embedded SQLite database in a volume at /app/var:
#   docker run --rm -v broker-var:/app/var token-broker:0.1.0 migrate
#   docker run --rm -v broker-var:/app/var -p 8080:8080 token-broker:0.1.0
# In production the settings come from the environment (deploy/k8s): BROKER_DATABASE_URL (MySQL),
# BROKER_ENCRYPTION_KEYS and BROKER_ADMIN_KEYS; the process then writes nothing to disk.

FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# .dockerignore is an allow-list: only pyproject.toml, README.md, service/ and alembic/ arrive here.
COPY . .

# The project's own wheel first (build isolation fetches setuptools), then that wheel and its
# dependencies into the venv. Every dependency ships binary wheels for CPython 3.11 on manylinux,
# so --only-binary holds and no compiler is needed even here: a dependency that loses its wheel
# fails the build loudly instead of half-compiling. The import proves the console script's module
# loads from the installed wheel (-I keeps /src off sys.path), migrations included.
RUN python -m venv /opt/venv \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: /wheels/*.whl \
    && /opt/venv/bin/python -I -c "import service.cli, service.migrations"


FROM python:3.11-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="dynamics-token-broker" \
      org.opencontainers.image.description="Keeps OAuth integration accounts for Microsoft Dynamics 365 and hands out valid access tokens."

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH="/opt/venv/bin:${PATH}"

# A fixed numeric UID/GID: the Deployment's securityContext names the same numbers.
# Only /app/var (the embedded SQLite default, for `docker run` without a database) is writable
# by it; the code in /opt/venv stays owned by root.
RUN groupadd --gid 10001 broker \
    && useradd --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin broker \
    && install -d -o 10001 -g 10001 -m 0700 /app/var

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
USER 10001:10001

EXPOSE 8080
STOPSIGNAL SIGTERM

# Kubernetes uses its own probes; this one serves `docker run` and compose. Python, not curl:
# the slim image has no curl.
HEALTHCHECK --interval=30s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('BROKER_PORT', '8080'), timeout=2)"]

ENTRYPOINT ["token-broker"]
CMD ["serve", "--host", "0.0.0.0"]
