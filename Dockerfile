# One image for the three Dagster services of docker-compose.yml (code server, webserver, daemon).
# No CUDA base image is needed: the torch wheel from PyPI brings its own CUDA runtime; the host
# needs the NVIDIA driver and the NVIDIA Container Toolkit.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/home \
    FLEXYFACE_DATA_DIR=/opt/flexyface/data \
    FLEXYFACE_MODELS_DIR=/opt/flexyface/data/models \
    HF_HOME=/opt/flexyface/hf-cache

WORKDIR /opt/flexyface/app

# Dependencies first, so code changes do not reinstall them. hpsv2 and
# simple-aesthetics-predictor declare pins that conflict with dagster/diffusers: --no-deps.
COPY requirements.txt requirements-nodeps.txt ./
RUN pip install -r requirements.txt \
 && pip install --no-deps -r requirements-nodeps.txt

COPY pyproject.toml README.md ./
COPY flexyface_pipeline ./flexyface_pipeline
RUN pip install --no-deps .

# Instance settings: storage on PostgreSQL, connection from FLEXYFACE_PG_* (set by compose).
COPY deploy/dagster-postgres.yaml ${DAGSTER_HOME}/dagster.yaml
COPY deploy/workspace.docker.yaml /opt/flexyface/workspace.yaml

# Prompts ship with the image; docker-compose.yml mounts ./data over the data directory.
COPY data/prompts ${FLEXYFACE_DATA_DIR}/prompts
