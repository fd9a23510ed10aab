# syntax=docker/dockerfile:1
# The Baton worker image: `baton worker --role prefill|decode|both` and `baton router` (one image, three
# roles; the operator renders pods that run it as uid 1000, all capabilities dropped).
#
#   CPU (default; torch pinned to the CPU wheel by constraints.txt, ~1 GB image):
#     docker build -f docker/worker.Dockerfile --build-arg TORCH_INDEX=<PyTorch CPU wheel index URL> \
#       -t baton/worker:0.1.0 .
#   GPU: use a CUDA runtime base and the matching PyTorch CUDA wheel index, e.g.
#     --build-arg PYTHON_IMAGE=<cuda-runtime image with Python 3.11> --build-arg TORCH_INDEX=<cu12x index>
#     (GPU fleets normally run the vLLM engine image instead: spec.engine.kind=vllm; the router still uses
#     this image). Pin every base image by digest: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
#   Without a registry: `baton images build worker` (buildah, a local Debian base, the machine's torch CPU wheel).
#   Without TORCH_INDEX, pip's configured index is used (on PyPI, Linux torch wheels pull CUDA libraries).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Three stages: `deps` (torch + the dependencies: GBs, rebuilt only when pyproject.toml or constraints.txt
# change), `build` (Baton itself on top), and the runtime image: the `deps` image itself plus Baton's own files
# as a layer of their own -- so a source change rebuilds, saves and imports a few MB of layer, not the venv, and
# the venv is never copied into a second 1.3 GB layer (a copy and a commit that cost ~50 s of a 195 s build on
# an idle machine, and more on CI's loaded one).
FROM ${PYTHON_IMAGE} AS deps
ARG TORCH_INDEX=""
# TORCH_WHEELS: a folder (mounted into the build) holding the torch CPU wheel; `baton images build` uses it
ARG TORCH_WHEELS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Dependencies first, in a layer of their own: a source change does not reinstall torch (with layer caching).
# torch's C++ tests, headers and test/protoc binaries (~200 MB of the 1.4 GB image) go: the worker runs torch
# eagerly (no torch.compile, no C++ extensions), so nothing reads them; torch_shm_manager stays (tensor sharing).
COPY pyproject.toml constraints.txt ./
RUN python -m venv /opt/baton \
 && /opt/baton/bin/pip install --upgrade pip setuptools wheel \
 && if [ -n "$TORCH_INDEX" ]; then /opt/baton/bin/pip install -c constraints.txt --index-url "$TORCH_INDEX" torch; fi \
 && if [ -n "$TORCH_WHEELS" ]; then /opt/baton/bin/pip install -c constraints.txt --no-index --no-deps --find-links "$TORCH_WHEELS" torch; fi \
 && /opt/baton/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['worker']))" > /tmp/requirements.txt \
 && /opt/baton/bin/pip install -c constraints.txt -r /tmp/requirements.txt \
 && cd /opt/baton/lib/python3.11/site-packages/torch \
 && rm -rf test include && find bin -type f ! -name torch_shm_manager -delete && cd /src \
 && /opt/baton/bin/python -m compileall -q -x "torch/testing/_internal" /opt/baton

FROM deps AS build
COPY README.md ./
COPY baton ./baton
COPY operator ./operator
COPY worker ./worker
# Baton's own files (its package, dist-info and console script), gathered under /app for the runtime stage
RUN /opt/baton/bin/pip install --no-deps -c constraints.txt . \
 && /opt/baton/bin/python -m compileall -q /opt/baton/lib/python3.11/site-packages/baton \
 && /opt/baton/bin/baton worker --help >/dev/null \
 && mkdir /app && cd / \
 && cp -a --parents opt/baton/lib/python3.11/site-packages/baton opt/baton/lib/python3.11/site-packages/baton-*.dist-info \
      opt/baton/bin/baton /app/

FROM deps
LABEL org.opencontainers.image.title="baton-worker" \
      org.opencontainers.image.description="Baton worker (prefill/decode/both) and router" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN rm -rf /src \
 && groupadd --system --gid 1000 baton && useradd --system --uid 1000 --gid 1000 --create-home \
      --home-dir /home/baton --shell /usr/sbin/nologin baton
COPY --from=build /app/opt/baton /opt/baton
ENV PATH=/opt/baton/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/home/baton
USER 1000:1000
WORKDIR /home/baton
EXPOSE 8000
ENTRYPOINT ["baton"]
CMD ["worker", "--help"]
