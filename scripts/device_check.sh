#!/usr/bin/env bash
# The GPU machine's whole check in one command: bash scripts/device_check.sh OUTDIR
#
# Stages, each under its own `timeout` (SIGINT first, so pytest still writes its junit xml; SIGKILL 10 s later),
# each logging to OUTDIR/<stage>.log; OUTDIR/summary.md (and summary.json) list every stage with its status,
# seconds and a detail line, rewritten after every stage, so a stage that fails or overruns leaves the others'
# results in place and later stages still run:
#   env              nvidia-smi, nvcc, compute-sanitizer, python packages (test dependencies missing: named)
#   build            pip install --no-build-isolation --no-deps -e . with SAGE_EXT_CUDA=ON and
#                    SAGE_EXT_CUDA_ARCHS from nvidia-smi's compute capability (the machine's own torch), then
#                    sage_ext.ops.cuda_available() must be True
#   tests_ops        pytest tests/test_ops_cuda.py            (junit: junit_tests_ops.xml)
#   memcheck         compute-sanitizer memcheck over scripts/cuda_ops_once.py --only ops (every op, N=64,
#                    V=152064, bf16 and fp32)
#   racecheck        compute-sanitizer racecheck, same calls
#   bench_ops        benchmarks/bench_ops.py --device cuda --point (B=1, N=64, V=152064; CUDA events; a sync
#                    inside an op aborts it; each op also timed in a CUDA graph: its GPU time without the host's
#                    launch work)                               -> OUTDIR/bench_ops/ops_<gpu>.{json,md}
#   tests_engine     pytest tests/test_engine_cuda.py but the captured draft (pytest-xdist, 4 workers, when installed)
#   tests_devices    pytest tests/test_engine_devices.py (a target split over the GPU and the CPU)
#   memcheck_engine  compute-sanitizer memcheck over scripts/cuda_ops_once.py --only engine (tiny models)
#   e2e              benchmarks/bench_e2e.py --device cuda on the bundled pair, small settings -> OUTDIR/e2e/
#   tests_capture    pytest tests/test_engine_cuda.py -k captured_draft (capture_draft=True: CUDA graphs; last,
#                    since its Triton compiles take a time not measured yet)
#
# Budget (seconds; the stage timeouts add up to 690, and DEVICE_CHECK_BUDGET, default 540 = 9 minutes, caps the
# whole run: a stage gets at most what is left, and none starts with under 5 s left). Measured on the first GPU
# run (NVIDIA H200, 16 cores, 2026-12-04; benchmarks/results/device_check_h200.md), with headroom:
#   env 11 of 15 | build 60 of 140 (nvcc on 16 cores) | tests_ops 40 of 50 | memcheck 10 of 45 | racecheck 15 of
#   35 | bench_ops 9 of 25 | tests_engine 115 (313 tests, 4 workers, with start-up) of 150 | tests_devices 19 of 40
#   (66 tests) | memcheck_engine: 10 s for one generation under the sanitizer, so 4 generations of 8 tokens in
#   60 | e2e 27 of 40 | tests_capture: not run on a GPU yet, 90 (whatever the budget leaves)
#
# Environment: DEVICE_CHECK_DEVICE=cpu runs the stages that need no GPU as a dry run on the CPU (build: no pip,
# only the installed build is imported; sanitizer stages: the script without compute-sanitizer; tests: they skip;
# benchmarks on the CPU with tiny settings); DEVICE_CHECK_TIMEOUT_<stage>=SECONDS overrides a stage's timeout;
# DEVICE_CHECK_BUDGET=SECONDS the total; DEVICE_CHECK_STAGES=a,b,... runs only those (the others are listed
# as not selected); PYTHON the interpreter (default python3); DEVICE_CHECK_SHOW=1 prints
# each stage's command instead of running it.
# The device tool returns at most 8 files: pack OUTDIR, e.g.
#   bash scripts/device_check.sh /tmp/dc; tar czf $OUT/device_check.tgz -C /tmp dc; cp /tmp/dc/summary.md $OUT/
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
outdir=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
repo=$(pwd)
mode=${DEVICE_CHECK_DEVICE:-cuda}
budget=${DEVICE_CHECK_BUDGET:-540}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [ "$mode" != cpu ] && [ -d /usr/local/cuda/bin ]; then export PATH="$PATH:/usr/local/cuda/bin"; fi  # nvcc, sanitizer
t0=$(date +%s)
stages_file="$outdir/stages.tsv"
: >"$stages_file"

STAGES=(env build tests_ops memcheck racecheck bench_ops tests_engine tests_devices memcheck_engine e2e tests_capture)
declare -A TIMEOUT=([env]=15 [build]=140 [tests_ops]=50 [memcheck]=45 [racecheck]=35 [bench_ops]=25
                    [tests_engine]=150 [tests_devices]=40 [memcheck_engine]=60 [e2e]=40 [tests_capture]=90)

write_summary() {
  "$py" - "$outdir" "$mode" "$budget" "$(($(date +%s) - t0))" "${STAGES[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, mode, budget, elapsed, stages = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
done = {}
for line in (out / "stages.tsv").read_text().splitlines():
    name, status, seconds, limit, detail = (line.split("\t") + [""] * 5)[:5]
    done[name] = dict(stage=name, status=status, seconds=int(seconds), timeout=int(limit), detail=detail)
rows = [done.get(name, dict(stage=name, status="not run yet", seconds=0, timeout=0, detail="")) for name in stages]
machine = (out / "machine.txt").read_text().strip() if (out / "machine.txt").exists() else "(env stage not run)"
lines = [f"# sage_ext device check ({mode})", "", machine, "",
         f"Total {elapsed} s of a {budget} s budget. Logs: <stage>.log; junit: junit_<stage>.xml.", "",
         "| stage | status | seconds | timeout | detail |", "| --- | --- | ---: | ---: | --- |"]
lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['timeout']} | {r['detail']} |" for r in rows]
(out / "summary.md").write_text("\n".join(lines) + "\n")
(out / "summary.json").write_text(json.dumps(dict(mode=mode, budget_s=int(budget), elapsed_s=int(elapsed),
                                                  stages=rows), indent=1) + "\n")
EOF
}

# the detail line of a stage from what it wrote
junit_detail() {  # junit xml -> "P passed, F failed, E errors, S skipped" (+ failing test ids)
  "$py" - "$1" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception as error:  # noqa: BLE001
    print(f"no junit xml ({type(error).__name__})"); sys.exit()
cases = root.iter("testcase")
counts = dict(passed=0, failed=0, errors=0, skipped=0)
failing = []
for case in cases:
    kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
    key = {"failure": "failed", "error": "errors"}.get(kind, kind)
    counts[key] += 1
    if key in ("failed", "errors"):
        failing.append(case.get("name"))
text = ", ".join(f"{v} {k}" for k, v in counts.items())
print(text + (("; failing: " + " ".join(failing[:8]) + (" ..." if len(failing) > 8 else "")) if failing else ""))
EOF
}

stage_detail() {  # stage name, log -> one line
  local name=$1 log=$2
  case $name in
    tests_*) junit_detail "$outdir/junit_$name.xml" ;;
    memcheck*|racecheck)
      local summary calls
      summary=$(grep -Eo '(ERROR|RACECHECK) SUMMARY: .*' "$log" | tail -1)
      calls=$(grep -Eo '"calls": [0-9]+' "$log" | tail -1)
      echo "${summary:-no sanitizer summary}; ${calls:-calls not finished}" ;;
    bench_ops) grep -E '^per-step bundle' "$log" | tail -1 | tr -s ' ' ;;
    e2e) grep -E '^checks:' "$log" | tail -1 ;;
    build) tail -1 "$log" ;;
    env) head -1 "$outdir/machine.txt" 2>/dev/null ;;
  esac
}

run_stage() {  # name, command (a bash string)
  local name=$1 cmd=$2
  local limit=${TIMEOUT[$name]}
  local override="DEVICE_CHECK_TIMEOUT_$name"
  limit=${!override:-$limit}
  local left=$((budget - ($(date +%s) - t0)))
  local log="$outdir/$name.log"
  if [ -n "${DEVICE_CHECK_STAGES:-}" ] && [[ ",$DEVICE_CHECK_STAGES," != *",$name,"* ]]; then
    printf '%s\tskipped (not selected)\t0\t0\tDEVICE_CHECK_STAGES=%s\n' "$name" "$DEVICE_CHECK_STAGES" >>"$stages_file"
    write_summary
    return
  fi
  if [ "$left" -lt 5 ]; then
    printf '%s\tskipped (budget spent)\t0\t0\t%s s of %s s left\n' "$name" "$left" "$budget" >>"$stages_file"
    write_summary
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit} s)"
  if [ -n "${DEVICE_CHECK_SHOW:-}" ]; then  # print the command instead of running it
    printf '%s\n' "$cmd" | tee "$log"
    printf '%s\tshown\t0\t%s\t\n' "$name" "$limit" >>"$stages_file"
    write_summary
    return
  fi
  local start rc status
  start=$(date +%s)
  timeout -s INT -k 10 "$limit" bash -c "$cmd" >"$log" 2>&1
  rc=$?
  case $rc in
    0) status=pass ;;
    124|137) status="TIMEOUT (stopped after ${limit} s)" ;;
    *) status="FAIL (exit $rc)" ;;
  esac
  local detail
  detail=$(stage_detail "$name" "$log" 2>/dev/null | tr '\t|\n' '  ' | cut -c1-300)
  if [ "$rc" -eq 0 ] && [[ $name == tests_* ]] && [[ $detail == "0 passed"* ]]; then
    status="skipped (no test ran)"
  fi
  if [ "$rc" -eq 0 ] && [ "$mode" = cpu ] && [[ $name =~ ^(build|memcheck|racecheck|memcheck_engine)$ ]]; then
    status="pass (dry run)"
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - start))" "$limit" "$detail" >>"$stages_file"
  echo "   $status: $detail"
  write_summary
}

xdist=""
if "$py" -c "import xdist" 2>/dev/null; then xdist="-n 4"; fi
pytest_cmd() {  # stage name, test file
  echo "$py -m pytest -q -p no:cacheprovider -rfEs --junitxml='$outdir/junit_$1.xml' $2"
}

if [ "$mode" = cpu ]; then
  env_cmd="{ echo \"CPU dry run: \$(uname -n), \$(nproc) cores\"; $py -c 'import torch, transformers; print(\"torch\", torch.__version__, \"| transformers\", transformers.__version__)'; } | tee '$outdir/machine.txt'"
  build_cmd="$py -c 'from sage_ext import ops; print(\"dry run: would pip install --no-build-isolation --no-deps -e . with SAGE_EXT_CUDA=ON; installed build imports, cuda kernels:\", ops.cuda_available())'"
  ops_once="$py scripts/cuda_ops_once.py --device cpu"
  memcheck_cmd="$ops_once --only ops"
  racecheck_cmd="$ops_once --only ops --dtypes float32"
  memcheck_engine_cmd="$ops_once --only engine"
  bench_ops_cmd="$py benchmarks/bench_ops.py --device cpu --point --quick --threads 1 --out-dir '$outdir/bench_ops'"
  e2e_cmd="$py benchmarks/bench_e2e.py --device cpu --threads 1 --scenes 1 --repeats 1 --no-tune --tune-scenes 1 --max-new-tokens 16 --policies sage --out-dir '$outdir/e2e'"
  tests_engine_cmd="$(pytest_cmd tests_engine tests/test_engine_cuda.py) -k 'not captured_draft'"
  tests_devices_cmd="$(pytest_cmd tests_devices tests/test_engine_devices.py) -k 'gpu_and_cpu or partition'"
else
  env_cmd="{ nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader; nvcc --version | tail -2 | head -1; $py -c 'import torch, transformers; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"| transformers\", transformers.__version__)'; } | tee '$outdir/machine.txt'
    compute-sanitizer --version | head -2
    nvidia-smi
    $py -c 'import importlib.util as u; print(\"optional: pytest-xdist\", \"present\" if u.find_spec(\"xdist\") else \"missing (tests run in one process)\")'
    missing=\$($py -c 'import importlib.util as u; print(\" \".join(m for m in (\"pytest\", \"hypothesis\", \"scipy\", \"accelerate\", \"scikit_build_core\", \"pybind11\", \"ninja\", \"matplotlib\", \"PIL\") if u.find_spec(m) is None))')
    echo \"missing python packages: \${missing:-none}\"; [ -z \"\$missing\" ]"
  build_cmd="cap=\$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' '); arch=\${cap/./}
    echo \"compute capability \$cap -> SAGE_EXT_CUDA_ARCHS=\$arch\"
    nvcc_path=\$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
    SAGE_EXT_CUDA=ON CUDACXX=\$nvcc_path TORCH_CUDA_ARCH_LIST=\$cap CMAKE_BUILD_PARALLEL_LEVEL=\$(nproc) \
      $py -m pip install --no-build-isolation --no-deps --no-index -v -e . -Ccmake.define.SAGE_EXT_CUDA_ARCHS=\$arch || exit 1
    so=\$(cd /tmp && $py -c 'import sage_ext._C as m; print(m.__file__)')
    if nm -C --defined-only \"\$so\" 2>/dev/null | grep -q 'std::locale::classic'; then
      echo \"the module carries a static copy of libstdc++ (its error messages crash): see CMakeLists.txt\"; exit 1
    fi
    cd /tmp && $py -c 'from sage_ext import ops; import sys; ok = ops.cuda_available(); print(\"sage_ext built for sm_'\$arch', cuda kernels:\", ok); sys.exit(0 if ok else 1)'"
  sanitizer="compute-sanitizer --error-exitcode 1 --report-api-errors no --print-limit 40"
  memcheck_cmd="$sanitizer --tool memcheck $py scripts/cuda_ops_once.py --only ops"
  racecheck_cmd="$sanitizer --tool racecheck $py scripts/cuda_ops_once.py --only ops"
  memcheck_engine_cmd="$sanitizer --tool memcheck $py scripts/cuda_ops_once.py --only engine"
  bench_ops_cmd="$py benchmarks/bench_ops.py --device cuda --point --out-dir '$outdir/bench_ops'"
  e2e_cmd="$py benchmarks/bench_e2e.py --device cuda --scenes 3 --repeats 1 --no-tune --tune-scenes 1 --max-new-tokens 48 --out-dir '$outdir/e2e'"
  tests_engine_cmd="$(pytest_cmd tests_engine tests/test_engine_cuda.py) -k 'not captured_draft' $xdist"
  tests_devices_cmd="$(pytest_cmd tests_devices tests/test_engine_devices.py) $xdist"
fi

tests_capture_cmd="$(pytest_cmd tests_capture tests/test_engine_cuda.py) -k captured_draft"

echo "sage_ext device check ($mode) into $outdir, budget $budget s"
run_stage env "$env_cmd"
run_stage build "$build_cmd"
run_stage tests_ops "$(pytest_cmd tests_ops tests/test_ops_cuda.py)"
run_stage memcheck "$memcheck_cmd"
run_stage racecheck "$racecheck_cmd"
run_stage bench_ops "$bench_ops_cmd"
run_stage tests_engine "$tests_engine_cmd"
run_stage tests_devices "$tests_devices_cmd"
run_stage memcheck_engine "$memcheck_engine_cmd"
run_stage e2e "$e2e_cmd"
run_stage tests_capture "$tests_capture_cmd"
echo "total $(($(date +%s) - t0)) s; summary: $outdir/summary.md"
cat "$outdir/summary.md"
# exit status: 0 only when no stage failed or overran
! grep -qE $'\t(FAIL|TIMEOUT)' "$stages_file"
