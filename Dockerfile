# k2d container image. Build: docker build -t k2d:0.1.0 .   Run: see docker-compose.yml.
# Checked by tests/ops/test_containers.py (no container runtime on the build boxes).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Builder: build the wheel and install it with its dependencies into a venv at the path
# the runtime stage uses (a venv's scripts name their interpreter by absolute path).
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY k2d ./k2d
COPY actors ./actors
# k2d/kafka/schemas links here: the wheel carries the Avro schemas.
COPY schemas ./schemas
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/k2d \
 && /opt/k2d/bin/pip install /wheels/k2d-*.whl \
        'opentelemetry-exporter-otlp-proto-http>=1.27,<2'

# Runtime: the slim base, the venv, the shipped config; no compiler, no pip cache, not root.
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 k2d \
 && useradd --system --uid 10001 --gid k2d --home-dir /var/lib/k2d --no-create-home \
        --shell /usr/sbin/nologin k2d \
 && install -d -o k2d -g k2d -m 0750 /var/lib/k2d
COPY --from=builder /opt/k2d /opt/k2d
COPY config.toml /etc/k2d/config.toml
# Inside a container the API must listen beyond loopback for Prometheus and the port
# mapping to reach it; docker-compose.yml publishes it on the host's 127.0.0.1 only.
ENV PATH=/opt/k2d/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    K2D_STORAGE__DATA_DIR=/var/lib/k2d \
    K2D_API__HOST=0.0.0.0 \
    K2D_API__PORT=8765
USER 10001:10001
WORKDIR /var/lib/k2d
VOLUME /var/lib/k2d
EXPOSE 8765
# /ready is 200 once every actor runs and 503 while starting or draining. No curl in the
# image: the interpreter that is there does the request.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8765/ready', timeout=4).status != 200)"]
# SIGTERM drains and commits the last batch (shutdown.drain_timeout, 30 s by default):
# give the container longer than that to stop (docker-compose.yml: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/k2d/bin/k2d", "run", "--config", "/etc/k2d/config.toml"]
