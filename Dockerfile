# gradcheck-svc: the gradient checker as a gRPC service (port 50051).
#
# Stages
#   requires  the dependency list of pyproject.toml as a requirements file
#   deps      a virtual environment with torch and the project's dependencies (no test dependencies);
#             rebuilt only when that list or a torch argument changes
#   builder   builds the gradcheck-svc wheel from the source
#   venv      the base image + the dependency venv (shared by runtime and tests)
#   runtime   the default target: the venv + the wheel on a clean base, non-root, healthcheck,
#             `gradcheck-svc serve`; no compilers, no test dependencies, no source tree
#   tests     the same + pytest + examples/remote_suite (the compose `tests` service; --target tests)
#
# Build arguments
#   BASE_IMAGE      a Python 3.11+ image with `python3 -m venv` (default python:3.11-slim; a Debian
#                   image with python3 + python3-venv works too). Builder and runtime use the same one.
#   TORCH_SPEC      the pip requirement for torch. Default: the CPU build, "torch==2.13.0+cpu", which
#                   pip finds on PyTorch's CPU wheel index (pass it as TORCH_INDEX_URL) or in a folder
#                   of wheels (PIP_FIND_LINKS). A plain "torch==2.13.0" also matches a local "+cpu" wheel.
#                   CUDA variant for GPU hosts: TORCH_SPEC="torch==2.13.0" with no TORCH_INDEX_URL: the
#                   default index's Linux wheels are CUDA builds that bring their CUDA runtime as pip
#                   packages, so the host needs only the NVIDIA driver and container toolkit (compose
#                   profile `gpu`). A specific CUDA version: TORCH_INDEX_URL=<PyTorch index>/whl/cu128.
#   TORCH_INDEX_URL an extra index used for the torch install only (empty: none).
#   PIP_FIND_LINKS  a folder (or URL) of wheels pip may install from, e.g. a folder mounted into the
#                   build that holds the torch wheel (empty: none).
#
#   docker build -t gradcheck-svc --build-arg TORCH_INDEX_URL=<PyTorch index>/whl/cpu .        # CPU
#   docker build -t gradcheck-svc --build-arg PIP_FIND_LINKS=/wheels ...  # CPU, wheel folder mounted
#   docker build -t gradcheck-svc:cuda --build-arg TORCH_SPEC=torch==2.13.0 .                 # CUDA

ARG BASE_IMAGE=python:3.11-slim

# Every stage carries the label io.gradcheck-svc.stage=<stage>, so leftovers of earlier builds can be
# pruned selectively: podman image prune -f --filter label=io.gradcheck-svc.stage
# ------------------------------------------------------------------------------------------------ base
FROM ${BASE_IMAGE} AS base
LABEL io.gradcheck-svc.stage=base
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --home-dir /home/gradcheck --uid 10001 --user-group --shell /usr/sbin/nologin gradcheck

# -------------------------------------------------------------------------------------------- requires
# The dependency list of pyproject.toml as a requirements file: the deps stage below stays cached until
# the list itself changes (not on every edit of pyproject.toml).
FROM ${BASE_IMAGE} AS requires
LABEL io.gradcheck-svc.stage=requires
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c "import tomllib; \
print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
    > /requirements.txt

# ------------------------------------------------------------------------------------------------ deps
FROM ${BASE_IMAGE} AS deps
LABEL io.gradcheck-svc.stage=deps
ARG TORCH_SPEC="torch==2.13.0+cpu"
ARG TORCH_INDEX_URL=""
ARG PIP_FIND_LINKS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120
RUN python3 -m venv /opt/venv
# torch first, in its own layer: by far the largest download, and the one that changes least often.
RUN set -eu; \
    [ -n "${PIP_FIND_LINKS}" ] || unset PIP_FIND_LINKS; \
    /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC}"
COPY --from=requires /requirements.txt /requirements.txt
RUN set -eu; \
    [ -n "${PIP_FIND_LINKS}" ] || unset PIP_FIND_LINKS; \
    /opt/venv/bin/pip install -r /requirements.txt

# --------------------------------------------------------------------------------------------- builder
FROM deps AS builder
LABEL io.gradcheck-svc.stage=builder
COPY . /src
RUN /opt/venv/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /dist /src

# ------------------------------------------------------------------------------------------------ venv
# The dependency venv on the clean base: one layer shared by the runtime and tests images.
FROM base AS venv
COPY --from=deps /opt/venv /opt/venv

# --------------------------------------------------------------------------------------------- runtime
FROM venv AS runtime
LABEL io.gradcheck-svc.stage=runtime \
      org.opencontainers.image.title=gradcheck-svc \
      org.opencontainers.image.description="Gradient checker (finite differences vs autograd) as a gRPC service" \
      org.opencontainers.image.licenses=Apache-2.0
# Settings of `gradcheck-svc serve` (gradcheck_svc/settings.py); flags on the command line win.
# The container listens on every interface of its own network namespace; the host publishes the
# port (compose: 127.0.0.1 only). Set GRADCHECK_AUTH_TOKENS or TLS to protect a wider exposure.
ENV GRADCHECK_HOST=0.0.0.0 \
    GRADCHECK_PORT=50051 \
    GRADCHECK_DEVICE=auto \
    GRADCHECK_INSECURE=true
COPY --from=builder /dist /dist
RUN pip install --no-deps --no-index /dist/*.whl && rm -rf /dist \
    && gradcheck-svc --help >/dev/null
USER 10001:10001
WORKDIR /home/gradcheck
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=15s --start-period=60s --retries=3 \
    CMD ["gradcheck-svc", "health", "--target", "127.0.0.1:50051"]
STOPSIGNAL SIGTERM
CMD ["gradcheck-svc", "serve", "--host", "0.0.0.0", "--port", "50051"]

# ----------------------------------------------------------------------------------------------- tests
# A client image: runs examples/remote_suite against $GRADCHECK_SERVER (default server:50051).
# Shares the base and venv layers with runtime; adds pytest, the wheel and the suite.
FROM venv AS tests
LABEL io.gradcheck-svc.stage=tests
ARG PIP_FIND_LINKS=""
RUN set -eu; \
    [ -n "${PIP_FIND_LINKS}" ] || unset PIP_FIND_LINKS; \
    pip install "pytest>=8"
COPY --from=builder /dist /dist
RUN pip install --no-deps --no-index /dist/*.whl && rm -rf /dist
COPY examples/remote_suite /suite
USER 10001:10001
WORKDIR /suite
ENV GRADCHECK_SERVER=server:50051
CMD ["pytest", "-v"]

# ------------------------------------------------------------------------------- default target: runtime
FROM runtime
