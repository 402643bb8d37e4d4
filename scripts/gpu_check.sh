#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA GPU, torch, transformers and no network: the gpu-marked
# tests, then `offload check-gpu` (random Mixtral-shaped and 128-expert checkpoints drawn on the GPU,
# decode speed against transformers and the bandwidth bounds). 2-3 minutes on an H200 (measured).
# Installs nothing from the network: the project itself is linked in with --no-deps if needed.
# Arguments go to `offload check-gpu` (e.g. --shapes mixtral --tokens 32 --dir /scratch/x).
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import offload.cache" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())" || exit 1
mapfile -t files < <(grep -l "mark.gpu" tests/test_*.py)
python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider "${files[@]}"
tests=$?
offload check-gpu "$@"
check=$?
exit $(( tests || check ))
