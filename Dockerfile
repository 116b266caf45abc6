# The product image: the `job` CLI (QLoRA fine-tuning) on a CUDA base.
#
#   GPU image (what users pull):  docker build -t job:gpu .      (or: buildah bud --layers -t job:gpu .)
#   CPU test image:               image/build-test.sh            (local Debian base + CPU torch wheel)
#
#   docker run --gpus all -v /mnt/storage:/data -e BASE_MODEL=org/model IMAGE run
#   docker run IMAGE --help
#
# Build arguments
#   BASE_IMAGE   base with (or able to apt-get) python3, python3-venv and tini.
#                Default: CUDA 13.0 Ubuntu 24.04 "base" flavour (libcudart + driver hooks); the CUDA
#                libraries torch needs come pinned with the torch wheel (nvidia-* wheels), so the
#                "runtime" flavour would only add a second copy of them.
#   TORCH_SPEC   what pip installs for torch: a requirement (default torch==2.13.0, the CUDA 13.0
#                build on PyPI) or a wheel under image/wheels/ mounted at /wheels, e.g.
#                /wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl.
#   APP_UID      uid of the non-root user `job` (default 1000); files on /data are written as it.
#   VERSION, REVISION, SOURCE, CREATED   OCI labels (image/build-gpu.sh fills them from git).
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL   optional package mirrors (builder stage only).
# Build secret (optional): --secret id=pip_cert,src=/path/ca-bundle.crt for a TLS-intercepting proxy.
#
# Every Python dependency is pinned by constraints.txt (the lock the Makefile uses) plus
# image/constraints-cuda.txt (the CUDA-only packages the GPU torch wheel pulls in).

ARG BASE_IMAGE=docker.io/nvidia/cuda:13.0.2-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# os: the base plus python3, venv support and tini (installed only where the base lacks them).
FROM ${BASE_IMAGE} AS os
RUN set -eu; \
    if ! command -v tini >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then \
        export DEBIAN_FRONTEND=noninteractive; \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 python3-venv tini ca-certificates; \
        apt-get clean; \
        rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log; \
    fi; \
    tini --version; python3 --version

# ---------------------------------------------------------------------------------------------
# builder: the virtualenv at /opt/venv. Binary wheels only, so no compiler is ever needed; the
# pip cache lives in a build cache mount and the sources in this stage only.
FROM os AS builder
ARG TORCH_SPEC=torch==2.13.0
# GPU extras (liger kernels, DeepSpeed); the CPU test build passes an empty value
ARG EXTRA_REQUIREMENTS=requirements-gpu.txt
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_NO_INPUT=1
RUN python3 -m venv /opt/venv

# Dependencies first: this layer is rebuilt only when the lock files (or TORCH_SPEC) change.
COPY requirements.txt requirements-gpu.txt constraints.txt /lock/
COPY image/constraints-cuda.txt /lock/
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=image/wheels,target=/wheels \
    --mount=type=secret,id=pip_cert,required=false \
    set -eu; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    /opt/venv/bin/pip install --only-binary=:all: \
        -c /lock/constraints.txt -c /lock/constraints-cuda.txt \
        "${TORCH_SPEC}" -r /lock/requirements.txt ${EXTRA_REQUIREMENTS:+-r /lock/$EXTRA_REQUIREMENTS}; \
    /opt/venv/bin/pip check

# Then the package itself (no dependencies: they are all above). Only what the distribution is
# built from is copied, so changes to tests, scripts or image tooling do not rebuild anything.
COPY pyproject.toml README* LICENSE* /src/
COPY job/ /src/job/
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert,required=false \
    set -eu; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    /opt/venv/bin/pip install --no-deps /src; \
    /opt/venv/bin/job --help >/dev/null

# ---------------------------------------------------------------------------------------------
# final: base + python + tini + the venv; runs as the non-root user `job`.
FROM os AS final
ARG APP_UID=1000
RUN set -eu; \
    existing="$(getent passwd "${APP_UID}" | cut -d: -f1)"; \
    if [ -n "${existing}" ]; then userdel --remove "${existing}" 2>/dev/null || userdel "${existing}"; fi; \
    if getent group "${APP_UID}" >/dev/null; then groupdel "$(getent group "${APP_UID}" | cut -d: -f1)"; fi; \
    groupadd --gid "${APP_UID}" job; \
    useradd --uid "${APP_UID}" --gid job --create-home --shell /bin/bash job; \
    mkdir -p /data/hf /data/output; \
    chown -R job:job /data

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/hf \
    OUTPUT_DIR=/data/output \
    TINI_SUBREAPER=1
WORKDIR /data
# tini is PID 1: it reaps zombies and, with -g, forwards SIGTERM/SIGINT to the whole process group
# of `job` (whose launcher passes them on to the training process). TINI_SUBREAPER keeps reaping
# working where tini is not PID 1 (shared process namespaces, `buildah run`).
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "job"]
CMD ["--help"]
USER job

# The venv (root-owned, read-only for `job`) and the labels come last: everything above stays
# cached, and REVISION/CREATED, which change every build, only touch the label step.
COPY --from=builder /opt/venv /opt/venv
ARG BASE_IMAGE VERSION=dev REVISION=unknown SOURCE=unknown CREATED=unknown
LABEL org.opencontainers.image.title="job" \
      org.opencontainers.image.description="QLoRA fine-tuning job: the job CLI with a pinned torch" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
