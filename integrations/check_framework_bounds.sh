#!/usr/bin/env bash
# Tested bounds: run unit tests against the lowest release each pyproject admits, and against what the
# test venv holds (the newest; CI runs the whole suite there).
#
#   integrations/check_framework_bounds.sh [core] [haystack] [llama_index]    (default: all three)
#
#   core         torch and transformers at the core's lower bounds, in a fresh venv holding the core,
#                pytest and hypothesis only (pip resolves everything else), then the same tests here;
#   haystack     haystack-ai at its lower bound, next to what the test venv holds;
#   llama_index  llama-index-core at its lower bound, next to what the test venv holds.
#
# Not part of CI: it downloads the old releases. Run from the repository root inside the test venv (see
# the README's "Development and tests"). The lower bounds below are the pyprojects' (a unit test checks
# that they agree: tests/unit/test_conventions.py).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

TORCH_LOWER=2.13.0          # pyproject.toml: torch>=2.13 (older CPU builds are not on PyPI: see there)
TRANSFORMERS_LOWER=5.0.0    # pyproject.toml: transformers>=5.0,<6
HAYSTACK_LOWER=3.0.0        # integrations/haystack/pyproject.toml: haystack-ai>=3.0,<4
LLAMA_INDEX_LOWER=0.13.0    # integrations/llama_index/pyproject.toml: llama-index-core>=0.13,<0.15

pytest=(-m pytest -q -o addopts= -p no:cacheprovider)
# what the core's bounds touch: model loading and the GGUF cache, attention capture, prompts, scoring, ranking
core_tests=(tests/unit/test_backbone.py tests/unit/test_attention.py tests/unit/test_prompt.py
            tests/unit/test_scoring.py tests/unit/test_reranker.py tests/unit/test_batched.py
            tests/unit/test_devices.py tests/unit/test_conventions.py)

versions() { "$1" -c "import sys, importlib.metadata as m; print(*(f'{d} {m.version(d)}' for d in sys.argv[1:]), sep=', ')" "${@:2}"; }

check_core() {
    echo "== core: torch $TORCH_LOWER, transformers $TRANSFORMERS_LOWER (fresh venv)"
    python3 -m venv "$tmp/core"
    "$tmp/core/bin/pip" install -q "torch==$TORCH_LOWER"
    mkdir "$tmp/src" && git ls-files -z | xargs -0 cp --parents -t "$tmp/src"  # built there: no build/ left here
    "$tmp/core/bin/pip" install -q "transformers==$TRANSFORMERS_LOWER" "$tmp/src" pytest hypothesis
    versions "$tmp/core/bin/python" torch transformers
    "$tmp/core/bin/python" "${pytest[@]}" "${core_tests[@]}"
    echo "== core: the test venv's torch and transformers"
    versions python torch transformers
    python "${pytest[@]}" "${core_tests[@]}"
}

check_haystack() {
    echo "== haystack-ai $HAYSTACK_LOWER"
    pip install -q --no-deps --target "$tmp/haystack" "haystack-ai==$HAYSTACK_LOWER"
    PYTHONPATH="$tmp/haystack" python "${pytest[@]}" tests/unit/test_haystack_ranker.py
    echo "== the test venv's haystack-ai ($(versions python haystack-ai))"
    python "${pytest[@]}" tests/unit/test_haystack_ranker.py
}

check_llama_index() {
    echo "== llama-index-core $LLAMA_INDEX_LOWER"
    # llama-index-core 0.13 wants llama-index-workflows 1.x (the test venv holds 2.x)
    pip install -q --no-deps --target "$tmp/llama_index" "llama-index-core==$LLAMA_INDEX_LOWER" "llama-index-workflows>=1.0.1,<2"
    PYTHONPATH="$tmp/llama_index" python "${pytest[@]}" tests/unit/test_llama_index_postprocessor.py
    echo "== the test venv's llama-index-core ($(versions python llama-index-core))"
    python "${pytest[@]}" tests/unit/test_llama_index_postprocessor.py
}

for part in "${@:-core haystack llama_index}"; do
    for name in $part; do "check_$name"; done
done
