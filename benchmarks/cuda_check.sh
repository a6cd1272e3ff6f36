#!/usr/bin/env bash
# The CUDA check, one self-contained run on a bare GPU machine (only the package registries
# reachable). From the repository root:
#
#     bash benchmarks/cuda_check.sh [--provider cuda|cpu] [--quick] [--reuse-env] OUTDIR
#
# 1. environment: a fresh virtualenv ($TMPDIR/normopt-venv-cuda, or $NORMOPT_CUDA_VENV) with onnxruntime-gpu
#    and its CUDA/cuDNN libraries from pip (onnxruntime-gpu[cuda,cudnn], matched to the driver's
#    CUDA major), installed BEFORE the project, which goes in with --no-deps so the CPU
#    onnxruntime never lands beside it; the project's other dependencies are read from
#    pyproject.toml. No torch: every model is built by normopt.models.llm or
#    benchmarks/cuda_models.py. --provider cpu installs the plain onnxruntime instead;
#    --reuse-env (or NORMOPT_CUDA_REUSE_ENV=1) uses the active Python environment as it is
#    (CI's dry run).
# 2. tests: `pytest -m cuda tests/test_cuda.py tests/test_harness.py` on the provider
#    (NORMOPT_TEST_PROVIDER); the output goes to OUTDIR/pytest.txt.
# 3. benchmark: benchmarks/cuda_bench.py (original vs normopt vs ORT's transformer optimizer,
#    IO binding, interleaved paired runs) writes OUTDIR/cuda-results.md and .json.
# Every phase is timed. Exits non-zero if the set-up fails, CUDA is asked for and not usable,
# a test fails, or a benchmarked normopt output fails verification.
#
# Overrides: NORMOPT_ORT_GPU (the pip requirement for onnxruntime-gpu), NORMOPT_CUDA_INSTALLER
# (uv or pip), NORMOPT_CHECK_BUDGET_S (the run's time budget, default 420 s: no benchmark case
# starts in its last minute), NORMOPT_BENCH_BUDGET_S (the benchmark's own budget instead).
set -uo pipefail
cd "$(dirname "$0")/.."

PROVIDER=cuda
QUICK=""
REUSE="${NORMOPT_CUDA_REUSE_ENV:-0}"
OUT=""
usage() { echo "usage: bash benchmarks/cuda_check.sh [--provider cuda|cpu] [--quick] [--reuse-env] OUTDIR" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --provider) [ $# -ge 2 ] || usage; PROVIDER="$2"; shift 2 ;;
        --provider=*) PROVIDER="${1#*=}"; shift ;;
        --quick) QUICK=1; shift ;;
        --reuse-env) REUSE=1; shift ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) [ -z "$OUT" ] || usage; OUT="$1"; shift ;;
    esac
done
[ -n "$OUT" ] || usage
case "$PROVIDER" in cuda|cpu) ;; *) echo "--provider must be cuda or cpu" >&2; exit 2 ;; esac
mkdir -p "$OUT" || { echo "cannot create $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
exec > >(tee "$OUT/cuda-check.log") 2>&1

T_START=$(date +%s.%N)
T_PHASE=$T_START
PHASES=()
phase_done() {  # name
    local now; now=$(date +%s.%N)
    local took; took=$(awk -v a="$T_PHASE" -v b="$now" 'BEGIN { printf "%.1f", b - a }')
    PHASES+=("$1 ${took} s")
    echo "[cuda_check] phase '$1' took ${took} s"
    T_PHASE=$now
}
finish() {  # exit code
    local total; total=$(awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    echo "[cuda_check] phases: ${PHASES[*]:-none}; total ${total} s"
    { echo; echo "## cuda_check.sh phases"; echo; for p in "${PHASES[@]:-}"; do echo "- $p"; done; echo "- total $total s"; } \
        >> "$OUT/cuda-results.md"
    echo "[cuda_check] exit $1 (results in $OUT)"
    exit "$1"
}
echo "[cuda_check] provider $PROVIDER${QUICK:+, quick}; output in $OUT; $(nproc) cores; $(date -u +%FT%TZ)"

# ---------------------------------------------------------------------------------------------
# 1. environment
if [ "$REUSE" = "1" ]; then
    PY="$(command -v python || command -v python3)"
    echo "[cuda_check] reusing the active environment: $PY"
else
    VENV="${NORMOPT_CUDA_VENV:-${TMPDIR:-/tmp}/normopt-venv-cuda}"
    PY3="$(command -v python3 || command -v python)"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY3" -m venv "$VENV" 2>/dev/null || { "$PY3" -m pip install -q virtualenv && "$PY3" -m virtualenv -q "$VENV"; } \
            || { echo "[cuda_check] cannot make a virtualenv with $PY3"; finish 2; }
    fi
    PY="$VENV/bin/python"
    "$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip -q || { echo "[cuda_check] no pip in $VENV"; finish 2; }
    INSTALLER="${NORMOPT_CUDA_INSTALLER:-uv}"
    if [ "$INSTALLER" = "uv" ] && ! { "$PY" -m pip install -q --disable-pip-version-check uv >/dev/null 2>&1 && "$VENV/bin/uv" --version >/dev/null 2>&1; }; then
        INSTALLER=pip  # uv downloads in parallel; pip is the fallback
    fi
    install() {
        if [ "$INSTALLER" = "uv" ]; then "$VENV/bin/uv" pip install -q --python "$PY" "$@"; else "$PY" -m pip install -q --disable-pip-version-check "$@"; fi
    }
    if [ "$PROVIDER" = "cuda" ]; then
        ORT_REQ="${NORMOPT_ORT_GPU:-}"
        if [ -z "$ORT_REQ" ]; then
            # onnxruntime-gpu >= 1.27 is built for CUDA 13 (a driver of 580 or later); 1.25 for CUDA 12
            DRV_CUDA="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1)"
            if [ -n "$DRV_CUDA" ] && [ "$DRV_CUDA" -lt 13 ]; then ORT_REQ="onnxruntime-gpu[cuda,cudnn]==1.25.1"
            else ORT_REQ="onnxruntime-gpu[cuda,cudnn]"; fi
            echo "[cuda_check] driver CUDA ${DRV_CUDA:-unknown (no nvidia-smi)}: $ORT_REQ"
        fi
    else
        ORT_REQ="onnxruntime"
    fi
    # the project's dependencies from pyproject.toml, less onnxruntime (installed first, above)
    "$PY" - > "$OUT/.deps" <<'EOF' || { echo "[cuda_check] cannot read pyproject.toml"; finish 2; }
import re
try:
    import tomllib
    with open("pyproject.toml", "rb") as f:
        proj = tomllib.load(f)["project"]
    deps = list(proj["dependencies"]) + [d for d in proj.get("optional-dependencies", {}).get("test", []) if d.startswith("pytest")]
except ModuleNotFoundError:  # Python < 3.11: the dependencies list, read plainly
    text = open("pyproject.toml").read()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M).group(1)
    deps = re.findall(r'"([^"]+)"', block) + ["pytest>=8"]
deps = [d for d in deps if not re.match(r"onnxruntime\b", d)]
print(" ".join(deps + ["sympy", "packaging"]))  # sympy, packaging: onnxruntime.transformers
EOF
    DEPS="$(cat "$OUT/.deps")"; rm -f "$OUT/.deps"
    echo "[cuda_check] installing with $INSTALLER: $ORT_REQ; then $DEPS; then the project (--no-deps)"
    install "$ORT_REQ" || { echo "[cuda_check] installing $ORT_REQ failed"; finish 2; }
    # shellcheck disable=SC2086
    install $DEPS || { echo "[cuda_check] installing the dependencies failed"; finish 2; }
    install --no-deps -e . || { echo "[cuda_check] installing the project failed"; finish 2; }
fi
"$PY" - "$PROVIDER" <<'EOF' || finish 2
import importlib.metadata as md, sys
provider = sys.argv[1]
names = {d.metadata["Name"].lower() for d in md.distributions()}
both = {"onnxruntime", "onnxruntime-gpu"} <= names
for n in ("onnxruntime", "onnxruntime-gpu", "onnx", "onnx-graphsurgeon", "numpy", "pytest"):
    if n in names:
        print(f"[cuda_check] {n} {md.version(n)}")
if provider == "cuda" and both:
    sys.exit("[cuda_check] onnxruntime (CPU) is installed next to onnxruntime-gpu: they share one module and the CPU one may win")
import normopt
from normopt.runtime_tests.providers import cuda_usable
print(f"[cuda_check] normopt from {normopt.__file__}")
if provider == "cuda":
    ok, why = cuda_usable()
    print(f"[cuda_check] CUDA: {why}")
    if not ok:
        sys.exit(1)
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/[cuda_check] GPU: /'
phase_done "environment"

# ---------------------------------------------------------------------------------------------
# 2. the cuda-marked tests on the provider
NORMOPT_TEST_PROVIDER="$PROVIDER" "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider tests/test_cuda.py tests/test_harness.py \
    > "$OUT/pytest.txt" 2>&1
TEST_RC=$?
tail -n 25 "$OUT/pytest.txt"
phase_done "tests"

# ---------------------------------------------------------------------------------------------
# 3. the benchmark
# the whole run stays inside NORMOPT_CHECK_BUDGET_S (default 420 s): no benchmark case starts
# later than a minute before it ends (the cases run in order of the targets they decide)
ELAPSED=$(awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%d", b - a }')
LEFT=$(( ${NORMOPT_CHECK_BUDGET_S:-420} - ELAPSED - 60 ))
[ "$LEFT" -gt 30 ] || LEFT=30
NORMOPT_BENCH_BUDGET_S="${NORMOPT_BENCH_BUDGET_S:-$LEFT}" "$PY" benchmarks/cuda_bench.py "$OUT" --provider "$PROVIDER" ${QUICK:+--quick}
BENCH_RC=$?
phase_done "benchmark"

RC=0
[ "$TEST_RC" -eq 0 ] || { echo "[cuda_check] tests FAILED (pytest exit $TEST_RC; see $OUT/pytest.txt)"; RC=1; }
[ "$BENCH_RC" -eq 0 ] || { echo "[cuda_check] benchmark FAILED (exit $BENCH_RC; see the table)"; RC=1; }
finish "$RC"
