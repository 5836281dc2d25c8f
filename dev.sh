#!/usr/bin/env bash
# telescope's development entry point. Each command first makes sure the local virtual
# environment .venv (in this directory) exists and is up to date, then runs:
#
#   ./dev.sh run  [args...]         the main job: the ntk-double-descent study, quick preset
#                                   (`telescope study ntk-double-descent --preset quick
#                                   --out out/ntk-double-descent --workers 2 [args...]`)
#   ./dev.sh test [pytest args...]  the whole test suite (pytest)
#   ./dev.sh lint [ruff args...]    ruff check (default: src, tests, bench and tools)
#   ./dev.sh setup                  only set up / update .venv
#
# Setup: python3.11 (else any python3 >= 3.10; override with PYTHON=...) creates .venv; torch is
# installed first, pinned to exactly TORCH_VERSION (a CPU build), so that the project's own
# `torch>=...` requirement is already satisfied and can never pull another (CUDA) build; then
# `pip install -e '.[dev]'`, skipped while .venv/.telescope-stamp holds the sha256 of
# pyproject.toml.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

TORCH_VERSION="2.13.0"
VENV=".venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.telescope-stamp"
CONSTRAINTS="$VENV/.telescope-constraints.txt"

say() { printf 'dev.sh: %s\n' "$*" >&2; }
die() { printf 'dev.sh: error: %s\n' "$*" >&2; exit 1; }

usage() {
    cat >&2 <<'EOF'
usage: ./dev.sh run  [telescope study args...]  set up .venv if needed, run the main study
       ./dev.sh test [pytest args...]           set up .venv if needed, run the test suite
       ./dev.sh lint [ruff args...]             set up .venv if needed, ruff check (src tests bench)
       ./dev.sh setup                           only set up / update .venv
EOF
}

# A Python >= 3.10 to create the venv with: $PYTHON, else python3.11, else python3.
find_python() {
    local cand
    for cand in ${PYTHON:-} python3.11 python3; do
        if command -v "$cand" >/dev/null 2>&1 &&
            "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
                >/dev/null 2>&1; then
            printf '%s\n' "$cand"
            return 0
        fi
    done
    return 1
}

torch_ok() {
    "$VPY" - "$TORCH_VERSION" >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    installed = version("torch")
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if installed.split("+")[0] == sys.argv[1] else 1)
EOF
}

pyproject_hash() {
    "$VPY" -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())'
}

ensure_venv() {
    if [[ ! -x "$VPY" ]]; then
        local py
        py="$(find_python)" || die "Python >= 3.10 not found (python3.11 preferred); set PYTHON=/path/to/python"
        say "creating $VENV with $py ($("$py" --version 2>&1))"
        "$py" -m venv "$VENV" ||
            die "could not create $VENV (on Debian/Ubuntu: apt-get install python3-venv); remove $VENV and retry"
    fi
    "$VPY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null ||
        die "$VENV is broken or its Python is older than 3.10: remove it (rm -rf $VENV) and retry"

    local want fresh=0
    want="$(pyproject_hash)"
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/telescope" ]]; then
        fresh=1
    fi

    # torch first, pinned. The version check reads metadata (fast); the slower `import torch`
    # check runs only when the project is about to be (re)installed anyway.
    printf 'torch==%s\n' "$TORCH_VERSION" >"$CONSTRAINTS"
    if ! torch_ok; then
        say "installing torch==$TORCH_VERSION (CPU) into $VENV ..."
        "$VPY" -m pip install -q "torch==$TORCH_VERSION" ||
            die "installing torch==$TORCH_VERSION failed"
        torch_ok || die "$VENV does not have torch $TORCH_VERSION after installing it"
        fresh=0
    elif [[ $fresh == 0 ]] && ! "$VPY" -c 'import torch' >/dev/null 2>&1; then
        say "torch $TORCH_VERSION does not import: reinstalling it ..."
        "$VPY" -m pip install -q --force-reinstall --no-deps "torch==$TORCH_VERSION" ||
            die "reinstalling torch==$TORCH_VERSION failed"
    fi
    if [[ $fresh == 1 ]]; then
        return 0
    fi

    say "installing telescope (editable) with its dev tools into $VENV ..."
    "$VPY" -m pip install -q -c "$CONSTRAINTS" -e '.[dev]' ||
        die "pip install -e '.[dev]' failed"
    torch_ok || die "the editable install changed torch away from $TORCH_VERSION"
    printf '%s\n' "$want" >"$STAMP"
    say "environment ready ($("$VPY" --version 2>&1), torch $TORCH_VERSION)"
}

# src, tests, bench and tools, those that exist (git does not keep empty folders)
lint_paths() {
    local d
    for d in src tests bench tools; do
        [[ -d "$d" ]] && printf '%s\n' "$d"
    done
    return 0
}

cmd="${1:-}"
if [[ $# -gt 0 ]]; then
    shift
fi

# figures are written to files: never ask for a display
export MPLBACKEND="${MPLBACKEND:-Agg}"

case "$cmd" in
    run)
        ensure_venv
        # "Can NTK theory predict double descent in transformers?" on the embedded MNIST-1D;
        # two worker processes (one thread each); re-running resumes, --force starts over.
        exec "$VENV/bin/telescope" study ntk-double-descent --preset quick \
            --out out/ntk-double-descent --workers 2 "$@"
        ;;
    test)
        ensure_venv
        exec "$VPY" -m pytest "$@"
        ;;
    lint)
        ensure_venv
        if [[ $# -gt 0 ]]; then
            exec "$VENV/bin/ruff" check "$@"
        fi
        mapfile -t paths < <(lint_paths)
        exec "$VENV/bin/ruff" check "${paths[@]}"
        ;;
    setup)
        ensure_venv
        ;;
    -h | --help | help)
        usage
        ;;
    "")
        usage
        exit 2
        ;;
    *)
        say "unknown command: $cmd"
        usage
        exit 2
        ;;
esac
