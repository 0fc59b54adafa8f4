#!/usr/bin/env bash
# The prepared GPU check: one command, run from the repository root on a machine with one
# NVIDIA GPU (H100 / H200), in under 8 minutes. It writes ONE markdown report:
#   device and versions (nvidia-smi, mswift env, mswift env --check);
#   the tests marked gpu (tests/gpu);
#   benchmarks/attention.py: varlen attention, bf16, head dim 128, causal, 16k/32k/64k tokens
#     of mixed lengths: mswift Triton vs SDPA flash per sample vs Transformer Engine (THD);
#   benchmarks/moe.py: permute+unpermute GB/s vs torch argsort/index_select and HBM, the
#     DeepSeek-V3 router vs torch, RMSNorm and cross-entropy GB/s vs torch (4k-64k tokens);
#   benchmarks/train_backends.py: tiny Llama and Qwen3-MoE at TP1 with each attention backend
#     and layer implementation: tokens/s, MFU, peak memory, losses of steps 1-5 compared.
# Every step runs under its own `timeout` (and within the total budget); a failing step is
# recorded in the report and the script goes on.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR]
#
# --out DIR: where gpu_check.md goes (default: $OUT when set, as on the device tool's machine,
# else runs/gpu_check). --dry-run (any machine, no GPU work): checks that every command it
# would run parses -- python files compile, --help works, every training run's settings pass
# mswift's config loader and pre-start checks, pytest collects the gpu tests -- and exits 1 if
# any does not. Wheels in .whl/ (see benchmarks/GPU_CHECK.md) are installed first, and mswift
# itself when it does not import.
set -uo pipefail

DRY_RUN=0
OUT_DIR="${OUT:-runs/gpu_check}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (expected --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done

PYTHON="${PYTHON:-python3}"
BUDGET_S=450          # all steps together; the device tool's call allows 600
START=$SECONDS
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/gpu_check.md"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
STEPS=()              # "| step | status | seconds |" rows
FAILED=0

# step NAME TIMEOUT_S COMMAND...: run under timeout (capped by what is left of the budget),
# output to $WORK/NAME.log (and the terminal); the outcome becomes a row of the steps table.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    if [ "$limit" -lt 10 ]; then
        STEPS+=("| $name | skipped: time budget spent | 0 |")
        FAILED=1
        return 1
    fi
    echo "== $name (timeout ${limit}s): $*"
    local began=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    local status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="timed out after ${limit}s"
    elif [ "$rc" -ne 0 ]; then
        local last
        last="$(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-120 | tr '|' '/')"
        status="failed (exit $rc): $last"
    fi
    [ "$status" = "ok" ] || FAILED=1
    STEPS+=("| $name | $status | $((SECONDS - began)) |")
    [ "$rc" -eq 0 ]
}

# what the machine has; wheels carried in .whl/ and mswift itself when missing
install_missing() {
    if compgen -G ".whl/*.whl" > /dev/null; then
        echo "wheels in .whl/: $(cd .whl && echo ./*.whl)"
        if [ "$DRY_RUN" -eq 0 ]; then
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target /tmp/site .whl/*.whl || return 1
            export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        fi
    else
        echo "no .whl/ folder: using the packages installed here"
    fi
    if "$PYTHON" -c "import mswift.kernels" 2> /dev/null; then
        echo "mswift imports from $("$PYTHON" -c 'import mswift; print(mswift.__file__)')"
    elif [ "$DRY_RUN" -eq 0 ]; then
        echo "installing mswift (editable, no dependencies, offline)"
        "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e . || return 1
    else
        echo "mswift does not import here" && return 1
    fi
}

# not under `timeout` (a function, and its PYTHONPATH must stay set): pip works offline here
began=$SECONDS
install_missing > "$WORK/install.log" 2>&1
rc=$?
cat "$WORK/install.log"
if [ "$rc" -eq 0 ]; then
    STEPS+=("| install | ok | $((SECONDS - began)) |")
else
    STEPS+=("| install | failed: see Installed here | $((SECONDS - began)) |")
    FAILED=1
fi
if [ "$DRY_RUN" -eq 1 ]; then
    step compile 60 "$PYTHON" -m py_compile benchmarks/attention.py benchmarks/train_backends.py \
        benchmarks/moe.py
    step attention-help 60 "$PYTHON" benchmarks/attention.py --help
    step moe-help 60 "$PYTHON" benchmarks/moe.py --help
    step env-help 60 "$PYTHON" -m mswift env --help
    step gpu-tests-collect 120 "$PYTHON" -m pytest -m gpu tests/gpu --collect-only -q
    step train-settings 240 "$PYTHON" benchmarks/train_backends.py --dry-run \
        --workdir "$WORK/train"
else
    step nvidia-smi 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
        --format=csv
    step env 60 "$PYTHON" -m mswift env
    step env-check 90 "$PYTHON" -m mswift env --check
    step gpu-tests 210 "$PYTHON" -m pytest -m gpu tests/gpu -q -rs --tb=short
    step attention 120 "$PYTHON" benchmarks/attention.py --iters 10 \
        --backends sdpa-flash-per-sample te-fused-thd --markdown "$WORK/attention.md"
    step moe 60 "$PYTHON" benchmarks/moe.py --iters 10
    left=$((BUDGET_S - (SECONDS - START) - 15))
    step train-backends 300 "$PYTHON" benchmarks/train_backends.py --workdir "$WORK/train" \
        --timeout 90 --budget "$left" --markdown "$WORK/train.md"
fi

# the report: written to a temporary name, renamed when complete
section() {  # section TITLE LOG [LINES]: the last LINES lines of a step's output, fenced
    echo "## $1"
    echo
    if [ -f "$WORK/$2.log" ]; then
        echo '```'
        tail -n "${3:-40}" "$WORK/$2.log"
        echo '```'
    else
        echo "not run"
    fi
    echo
}
{
    echo "# mswift GPU check"
    echo
    mode=""
    [ "$DRY_RUN" -eq 1 ] && mode=", DRY RUN (nothing ran on a GPU)"
    commit="$(git rev-parse --short HEAD 2> /dev/null || echo unknown)"
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname), commit $commit$mode," \
        "$((SECONDS - START)) s in all"
    echo
    echo "| step | status | seconds |"
    echo "|---|---|--:|"
    printf '%s\n' "${STEPS[@]}"
    echo
    section "Installed here" install 20
    if [ "$DRY_RUN" -eq 1 ]; then
        section "Tests marked gpu (collected)" gpu-tests-collect 20
        section "Training runs' settings" train-settings 30
    else
        section "Device" nvidia-smi 5
        section "mswift env" env 30
        section "mswift env --check" env-check 12
        section "Tests marked gpu" gpu-tests 30
        echo "## Varlen attention (benchmarks/attention.py)"
        echo
        cat "$WORK/attention.md" 2> /dev/null || echo "no table: see the steps above"
        echo
        section "MoE permutation, router, RMSNorm, cross-entropy (benchmarks/moe.py)" moe 40
        echo "## Training, TP1, each backend (benchmarks/train_backends.py)"
        echo
        cat "$WORK/train.md" 2> /dev/null || echo "no table: see the steps above"
    fi
} > "$REPORT.tmp" && mv "$REPORT.tmp" "$REPORT"
echo "report: $REPORT"
exit "$FAILED"
