# syntax=docker/dockerfile:1
# Jalur image: `jalur` on python:3.11-slim, run as uid 10001, no dev or test extras.
#   docker build -t jalur:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9901:9901 -v "$PWD/my.yaml:/etc/jalur/jalur.yaml:ro" jalur:0.1.0
# The config must listen on 0.0.0.0 inside a container (listen.host, admin.host), or
# nothing outside it can connect. Kubernetes manifests: config/k8s/.

# -- build: wheels for jalur and its dependencies ---------------------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --wheel-dir /wheels .

# -- runtime ---------------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels jalur \
    && groupadd --system --gid 10001 jalur \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/jalur \
       --shell /usr/sbin/nologin jalur \
    && install -d -o 10001 -g 10001 /var/lib/jalur /etc/jalur
# The working directory is writable by jalur, for the default audit log path
# (compliance.audit.path: jalur-audit.log); with a read-only root filesystem point it at
# a volume or at "-" (stderr), as config/k8s/configmap.yaml does.
WORKDIR /var/lib/jalur
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080 9901
# SIGTERM drains: /readyz 503, keep serving drain.delay, finish in-flight up to drain.timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["jalur"]
CMD ["run", "-c", "/etc/jalur/jalur.yaml"]
