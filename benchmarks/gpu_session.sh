#!/usr/bin/env bash
# Everything the accelerator results need from one GPU host, in one command that
# ends within ~9 minutes (about 1 + 6 + 2) (what a time-limited GPU session allows):
#
#   benchmarks/gpu_session.sh OUT_DIR [WHEELS_DIR]
#
# 1. The bundled main job (`assim-run`, plots and progress off, a fresh
#    compilation cache) on two cores of the host's CPU (`JAX_PLATFORMS=cpu
#    taskset -c 0,1`), the base the GPU's main job is compared with:
#    OUT_DIR/main_cpu.json (its metrics.json, the wall time added), main.log.
# 2. `bench_accelerator.py` at its GPU sizes (windows 32/128/512, gradients
#    256-2048, throughput, and the main job on the GPU twice into one fresh
#    compilation cache), no size started after BENCH_BUDGET_S seconds (default
#    300), its JSON rewritten after every row: OUT_DIR/accelerator.{json,log}.
# 3. The model and gradient tests on the GPU (`-p no:benchmark`: the
#    pytest-benchmark plugin, where installed, warns under xdist, and the test
#    settings make warnings errors): OUT_DIR/tests.log.
#
# The project must be importable: installed (`pip install -e .`), or, on a host
# without internet, its wheel (`pip wheel . --no-deps -w WHEELS_DIR`) in
# WHEELS_DIR with wheels of what the host's Python lacks (e.g. netCDF4, cftime,
# hydra-core, omegaconf, antlr4-python3-runtime, dask, partd, locket,
# cloudpickle): all installed with `pip --no-index --no-deps --target` into a
# temporary directory put on PYTHONPATH. Run it from the repository's root (the
# modules run with `python -P`: the source tree's `assim/`, which lacks the
# installed `assim.configs`, is not put first on the path). PYTHON: the
# interpreter (default python3).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [WHEELS_DIR]}
wheels=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if [ -n "$wheels" ]; then
    site=$(mktemp -d)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" "$wheels"/*.whl || exit 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$py" -P -c "import assim.configs, netCDF4, hydra" || {
    echo "the project or one of its dependencies is not importable (see above)"
    exit 1
}
"$py" -c "import jax; print(jax.devices(), jax.__version__)" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null

main_job() {  # main_job NAME [env ...]: the bundled assim-run, metrics kept
    local run
    run=$(mktemp -d)
    local t0=$SECONDS
    env "${@:2}" timeout "${MAIN_TIMEOUT_S:-150}" "$py" -P -m assim._cli.run \
        "hydra.run.dir=$run" "compilation_cache.dir=$run/cache" plot=false \
        progress=false ${MAIN_ARGS:-}
    local code=$?
    echo "main job on $1: exit $code, $((SECONDS - t0)) s wall"
    if [ -f "$run/metrics.json" ]; then
        "$py" - "$run/metrics.json" "$out/main_$1.json" "$((SECONDS - t0))" <<'EOF'
import json, sys
metrics = json.load(open(sys.argv[1]))
metrics["wall_s"] = float(sys.argv[3])
json.dump(metrics, open(sys.argv[2], "w"), indent=1)
print({k: metrics.get(k) for k in ("rmse_truth", "wall_s", "compilation")})
EOF
    fi
}
{
    if command -v taskset >/dev/null; then
        main_job cpu JAX_PLATFORMS=cpu taskset -c 0,1
    else
        echo "no taskset: the CPU run uses every core"
        main_job cpu JAX_PLATFORMS=cpu
    fi
} 2>&1 | tee "$out/main.log"

timeout "${BENCH_TIMEOUT_S:-360}" "$py" benchmarks/bench_accelerator.py \
    --budget-s "${BENCH_BUDGET_S:-300}" --json "$out/accelerator.json" \
    ${BENCH_ARGS:-} 2>&1 | tee "$out/accelerator.log"

timeout "${TESTS_TIMEOUT_S:-120}" "$py" -P -m pytest -p no:benchmark -q -x \
    tests/test_models.py tests/test_gradients.py 2>&1 | tee "$out/tests.log"
