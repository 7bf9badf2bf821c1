# syntax=docker/dockerfile:1
# Images for docker-compose.yml. Targets:
#   api            the HTTP API alone: CPU torch (the CLIP text tower), no diffusers, no qwen-tts
#   processor-cpu  a processor on CPU (any capability)
#   processor      a processor on NVIDIA GPUs: torch from PyPI, which ships with its CUDA libraries
# All run as the unprivileged user "app"; models download once into /models (a volume in compose).

ARG PYTHON_VERSION=3.11
ARG TORCH_PACKAGES="torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0"

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 app \
    && mkdir -p /models /srv/ams \
    && chown app:app /models
WORKDIR /srv/ams

# the project's files, copied once and taken by each target
FROM base AS source
COPY pyproject.toml README.md ./
COPY api api
COPY contract contract
COPY infra infra
COPY models models
COPY processor processor
COPY launcher launcher

FROM base AS torch-cpu
ARG TORCH_PACKAGES
RUN pip install --index-url https://download.pytorch.org/whl/cpu ${TORCH_PACKAGES}

FROM base AS torch-cuda
ARG TORCH_PACKAGES
RUN pip install ${TORCH_PACKAGES}

FROM torch-cpu AS api
COPY --from=source /srv/ams /srv/ams
RUN pip install .
USER app
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=10s --start-period=300s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=5)"
CMD ["python", "-m", "api"]

FROM torch-cpu AS processor-cpu
COPY --from=source /srv/ams /srv/ams
RUN pip install ".[processor]"
USER app
EXPOSE 9101
CMD ["python", "-m", "processor"]

FROM torch-cuda AS processor
COPY --from=source /srv/ams /srv/ams
RUN pip install ".[processor]"
USER app
EXPOSE 9101
CMD ["python", "-m", "processor"]
