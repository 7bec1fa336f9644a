# syntax=docker/dockerfile:1
# One image, either role: `nlpserve serve` (API replica) or `nlpserve worker` (inference).
#   docker build --target cpu -t nlpserve:cpu .
#   docker build --target gpu -t nlpserve:gpu .
# No torch in either image: training happens elsewhere; models/ is copied in (or mounted
# read-only over /models).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---- build: a virtualenv with the serving runtime only (wheels; no compilers reach the final image)
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The exact versions CI tests with (deploy/pin_image_deps.py): a rebuild installs the same.
COPY deploy/constraints.txt ./
COPY pyproject.toml README.md LICENSE ./
COPY service ./service
COPY training ./training
# [explain]: shap for /v1/{detect,polarity}/explain (without it they answer 501); [grpc]:
# grpcio for NLPSERVE_GRPC_PORT (~10 MB; off unless set); no torch.
RUN pip install -c constraints.txt ".[explain,grpc]"

# ---- cpu: slim runtime, non-root
FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --system --uid 10001 --no-create-home nlpserve
COPY --from=build /opt/venv /opt/venv
COPY --chown=root:root --chmod=a=rX models /models
# NUMBA_CACHE_DIR: shap's numba functions cache their compiled code; the venv is read-only
# to the nlpserve user, who has no home, so numba would find no place and fail the import.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    NLPSERVE_MODEL_DIR=/models \
    NLPSERVE_HOST=0.0.0.0 \
    NLPSERVE_PORT=8000 \
    NLPSERVE_HEALTH_URL=http://127.0.0.1:8000/healthz
USER nlpserve
EXPOSE 8000 8001 9100
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
ENTRYPOINT ["nlpserve"]
CMD ["serve"]

# ---- gpu: CUDA 13 + cuDNN 9 runtime, onnxruntime-gpu (built against CUDA 13)
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home nlpserve
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY deploy/constraints.txt ./
COPY pyproject.toml README.md LICENSE ./
COPY service ./service
COPY training ./training
# The CPU and GPU wheels both provide the `onnxruntime` module: keep only the GPU one.
RUN pip install -c constraints.txt ".[explain,grpc]" && pip uninstall -y onnxruntime \
    && pip install -c constraints.txt onnxruntime-gpu && rm -rf /src
WORKDIR /
COPY --chown=root:root --chmod=a=rX models /models
ENV PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    NLPSERVE_MODEL_DIR=/models \
    NLPSERVE_HOST=0.0.0.0 \
    NLPSERVE_PORT=8000 \
    NLPSERVE_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider \
    NLPSERVE_HEALTH_URL=http://127.0.0.1:8000/healthz
USER nlpserve
EXPOSE 8000 8001 9100
HEALTHCHECK --interval=15s --timeout=3s --start-period=90s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
ENTRYPOINT ["nlpserve"]
CMD ["serve"]
