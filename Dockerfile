# fedadapt app image: the `fedadapt` CLI, Flower 1.41 (flower-superlink, flower-supernode,
# flower-superexec) and the app's dependencies, so runs never install anything at run
# time (the SuperLink is started with --disable-runtime-dependency-installation).
#
#   docker build -t fedadapt:latest .
#   docker build -t fedadapt:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# No certificates, keys, site folders or data are baked in (.dockerignore): they are
# mounted at run time (docker-compose.yml).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp/home \
    FLWR_HOME=/tmp/flwr

# torch first, from the CPU (or, with the build arg, CUDA) wheel index; the project's
# pin (torch==2.13.0) is then already satisfied.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedadapt/ fedadapt/
COPY server/ server/
COPY client/ client/
COPY strategies/ strategies/
COPY privacy/ privacy/
COPY simulations/ simulations/
COPY imaging/ imaging/
COPY continual/ continual/
COPY report/ report/
COPY deploy/ deploy/
RUN pip install . && fedadapt --help > /dev/null

# Containers run as the user that owns the mounted certs and site folders
# (docker-compose.yml: user: ${FEDADAPT_UID}:${FEDADAPT_GID}); any user may write here.
RUN mkdir -p /tmp/home /tmp/flwr /app/runs && chmod 1777 /tmp/home /tmp/flwr /app/runs
USER 49999:49999

CMD ["fedadapt", "--help"]
