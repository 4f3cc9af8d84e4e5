# syntax=docker/dockerfile:1
#
# Prewarm's one image: the observer (`serve`), the reconciler (`reconcile`), the
# certificate tool (`python -m certs`), and the static no-op helper the pre-pull pods
# copy out of it (/usr/local/bin/prewarm-noop).
#
# Multi-arch: docker buildx build --platform linux/amd64,linux/arm64 -t IMAGE .
# Each platform's `noop` stage runs on (or emulates) that platform, so the helper is
# compiled natively for it; no cross toolchain is involved.

# -- the static no-op helper ------------------------------------------------------------
FROM debian:bookworm-slim AS noop
ARG TARGETARCH
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY hack/noop/noop.c /src/noop.c
# Static (no dynamic loader needed: the pull containers run it inside arbitrary images,
# scratch and distroless included), size-optimized and stripped. Running it once proves
# the binary executes on ${TARGETARCH}.
RUN mkdir -p /out \
 && gcc -static -Os -s -o /out/prewarm-noop /src/noop.c \
 && chmod 0755 /out/prewarm-noop \
 && /out/prewarm-noop --ignored args \
 && echo "prewarm-noop built for ${TARGETARCH:-$(uname -m)}"

# -- the application --------------------------------------------------------------------
FROM python:3.11-slim

# PYTHONPATH: `python -m webhook` and `python -m certs` work from any working directory.
# HOME: the root filesystem is read-only in the chart; /tmp is a writable emptyDir there.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    HOME=/tmp

WORKDIR /app

# Dependencies first, so code changes do not invalidate this layer.
COPY requirements.txt /app/requirements.txt
RUN pip install --no-cache-dir -r /app/requirements.txt

COPY webhook/ /app/webhook/
COPY certs/ /app/certs/
COPY --from=noop /out/prewarm-noop /usr/local/bin/prewarm-noop

# The chart also runs `cp` (the helper's copy into the pre-pull pods) and `sleep` (the
# observer's preStop drain) from this image: coreutils, in the python:slim base.

# Numeric, so `runAsNonRoot` can be verified by the kubelet without a passwd entry.
USER 65532:65532

EXPOSE 8443
ENTRYPOINT ["python", "-m", "webhook"]
CMD ["--help"]
