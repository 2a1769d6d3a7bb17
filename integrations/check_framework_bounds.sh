#!/usr/bin/env bash
# Run each adapter's unit tests against the lowest framework release its pyproject admits, next to
# whatever the test venv holds (the highest, tested by CI).  Not part of CI: it downloads the old
# releases.  Run from the repository root inside the test venv (see the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

pip install -q --no-deps --target "$tmp/haystack" "haystack-ai==3.0.0"
PYTHONPATH="$tmp/haystack" python -m pytest -q -p no:cacheprovider tests/unit/test_haystack_ranker.py

# llama-index-core 0.13 wants llama-index-workflows 1.x (the test venv holds 2.x)
pip install -q --no-deps --target "$tmp/llama_index" "llama-index-core==0.13.0" "llama-index-workflows>=1.0.1,<2"
PYTHONPATH="$tmp/llama_index" python -m pytest -q -p no:cacheprovider tests/unit/test_llama_index_postprocessor.py
