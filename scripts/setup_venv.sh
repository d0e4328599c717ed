#!/usr/bin/env bash
# Create or refresh .venv from the pinned requirements; a no-op (under a second) when nothing changed.
# Usage: scripts/setup_venv.sh [cpu|gpu]   (default cpu; gpu uses requirements/gpu.txt and the CUDA vllm wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${1:-${FORAGE_FLAVOUR:-cpu}}"
req="requirements/${flavour}.txt"
[ -f "$req" ] || { echo "setup: no requirements file $req" >&2; exit 2; }
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
stamp=".venv/.forage-setup-stamp"
want="$flavour $(cat "$req" pyproject.toml scripts/setup_venv.sh scripts/patch_torchvision.py | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/python ]; then
  exit 0
fi
echo "setup: creating/refreshing .venv from $req (first time: ~3 minutes, ~4 GB)" >&2
[ -x .venv/bin/python ] || "$python" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's location warnings about the local mirrors are noise; real errors still fail the script.
.venv/bin/pip install -q -r "$req" 2> >(grep -v "WARNING: Location" >&2)
if [ "$flavour" = cpu ]; then
  # CUDA builds that cannot work beside torch+cpu and that nothing on our path needs (ENV.md).
  .venv/bin/pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true
  .venv/bin/python scripts/patch_torchvision.py "$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()[\"purelib\"])")" >&2
fi
# forage itself, editable, so vLLM's worker processes can import our worker extension.
.venv/bin/pip install -q --no-deps --no-build-isolation -e . 2> >(grep -v "WARNING: Location" >&2)
.venv/bin/python -c "import torch, torchvision, vllm, ray, zmq, msgspec, hydra, transformers, pyarrow" >&2
echo "$want" > "$stamp"
echo "setup: .venv ready" >&2
