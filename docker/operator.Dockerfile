# syntax=docker/dockerfile:1
# The Baton operator image: kopf + the Kubernetes client, no torch. Multi-stage: wheels are built in a
# builder stage; the runtime stage has only the virtualenv, runs as uid 65532, and works with a read-only
# root filesystem (the chart mounts an emptyDir on /tmp).
#
#   docker build -f docker/operator.Dockerfile -t baton/operator:0.1.0 .
#
# Pin the base image by digest for reproducible builds (resolve it with `docker buildx imagetools inspect
# python:3.11-slim-bookworm`), e.g. --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Dependencies first, in a layer of their own: a source change does not reinstall them (with layer caching).
COPY pyproject.toml constraints.txt ./
RUN python -m venv /opt/baton \
 && /opt/baton/bin/pip install --upgrade pip setuptools wheel \
 && /opt/baton/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && /opt/baton/bin/pip install -c constraints.txt -r /tmp/requirements.txt \
 && /opt/baton/bin/python -m compileall -q /opt/baton
COPY README.md ./
COPY baton ./baton
COPY operator ./operator
COPY worker ./worker
RUN /opt/baton/bin/pip install --no-deps -c constraints.txt . \
 && /opt/baton/bin/python -m compileall -q /opt/baton/lib/python3.11/site-packages/baton \
 && /opt/baton/bin/baton operator run --help >/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="baton-operator" \
      org.opencontainers.image.description="Baton Kubernetes operator (LLMService, prefill/decode disaggregation)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 65532 baton && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent \
      --no-create-home --shell /usr/sbin/nologin baton
COPY --from=build /opt/baton /opt/baton
ENV PATH=/opt/baton/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
USER 65532:65532
EXPOSE 8080 8081 9443
ENTRYPOINT ["baton"]
CMD ["operator", "run", "--all-namespaces"]
