# tori-shim (FastAPI) image; also runs Flower (same Celery version).
# Build from the repository root:
#   docker build -f docker/shim.Dockerfile -t tori-shim .
# Run with TORI_SHIM_API_KEYS=owner:key (or TORI_SHIM_API_KEYS_FILE): the
# shim exits 78 without keys, and --no-auth refuses the 0.0.0.0 bind below.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY docker/web-requirements.txt ./web-requirements.txt
RUN pip install --no-cache-dir -r web-requirements.txt
COPY python-bridge ./python-bridge
COPY fastapi-shim ./fastapi-shim
RUN pip install --no-cache-dir --no-deps ./python-bridge ./fastapi-shim \
 && useradd --system --uid 10001 --user-group --home-dir /data tori \
 && mkdir -p /data/shim \
 && chown -R tori:tori /data
USER 10001:10001
ENV TORI_STORAGE_ROOT=/data \
    TORI_SHIM_DATABASE_URL=sqlite:////data/shim/jobs.db \
    TORI_SHIM_HOST=0.0.0.0 \
    TORI_SHIM_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["tori-shim"]
