#!/usr/bin/env bash
# CI step: tinyvlm's Numba kernel tests run as aarch64 machine code, under qemu-user on this x86-64 Debian host.
#
#   .ci/arm64.sh                              as root; called by .ci/run
#   ARM64_TESTS="tests/a.py tests/b.py" .ci/arm64.sh   another list of test files (run as one group)
#
# Setup (skipped on a re-run when already done): qemu-user-static and binfmt_misc; an aarch64 CPython 3.11
# unpacked from Debian's arm64 packages, fetched through a private apt state (the host's dpkg architectures are
# untouched); aarch64 wheels, pinned, unpacked by the host's pip. The tests import neither torch nor transformers
# (none is installed there). Everything lives in $ARM64_DIR except the qemu package and the binfmt_misc entry.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
W=${ARM64_DIR:-${RUNNER_TEMP:-/tmp}/tinyvlm-arm64}
HOST_PY=${HOST_PY:-python}  # only downloads and unpacks wheels
# Two groups, one pytest process per core: under qemu the time goes into LLVM compiling the kernels (one thread
# each), and the integer kernels' tests compile most of all (fresh copies for their codegen and other-family
# checks). Measured one after the other: 560 s; each group alone takes about 300. Not run here:
# tests/test_kernels_gemm.py, the prefill GEMM that only x86-64 dispatches to (its two compiles took 445 s alone).
if [ -n "${ARM64_TESTS:-}" ]; then
  TESTS_A=$ARM64_TESTS TESTS_B=""
else
  TESTS_A="tests/test_kernels_int8.py"
  TESTS_B="tests/test_kernels_quant.py tests/test_kernels_numba.py tests/test_kernels.py tests/test_golden_logits.py
tests/test_k_quants.py"
fi
TEST_TIMEOUT=${ARM64_TEST_TIMEOUT:-480}  # s, per group
DEBS="python3.11 libgomp1 libstdc++6 libgcc-s1"  # libgomp1: numba's OpenMP layer; libstdc++6, libgcc-s1: llvmlite
# What the x86 CI resolves (pyproject.toml) and what the tests import, each pinned. --no-deps: the packages'
# other dependencies (gguf's requests, tokenizers' huggingface_hub) are never imported by these tests.
WHEELS="numba==0.68.1 llvmlite==0.50.0 numpy==2.4.6 pillow==13.0.0 safetensors==0.8.0 tokenizers==0.23.3
gguf==0.19.0 pyyaml==6.0.3 pytest==9.2.0 iniconfig==2.3.0 packaging==26.2 pluggy==1.6.0 pygments==2.20.0
hypothesis==6.170.15 sortedcontainers==2.4.0"

die() { echo "arm64.sh: $*" >&2; exit 1; }
T0=$SECONDS T=$SECONDS
step() { echo "arm64: $* ..."; }
took() { echo "arm64:   done in $((SECONDS - T)) s"; T=$SECONDS; }

[ "$(uname -m)" = x86_64 ] || die "expects an x86-64 host, this is $(uname -m)"
[ "$(id -u)" = 0 ] || die "needs root (apt-get, binfmt_misc)"
command -v apt-get >/dev/null && command -v dpkg >/dev/null || die "needs apt-get and dpkg (a Debian host)"
$HOST_PY -m pip --version >/dev/null 2>&1 || die "needs pip for the host's '$HOST_PY' (set HOST_PY)"
mkdir -p "$W" || die "cannot create the work dir $W"

step "1/4 qemu-user-static and binfmt_misc"
if ! command -v qemu-aarch64-static >/dev/null; then
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes apt-get install -y -qq --no-install-recommends qemu-user-static >/dev/null ||
    die "apt-get install qemu-user-static failed"
fi
# Without a registered qemu-aarch64 entry an emulated process cannot exec another aarch64 binary (tests run
# sys.executable in subprocesses). Debian's entry has the F flag: the kernel opens qemu once, at registration.
BINFMT=/proc/sys/fs/binfmt_misc
[ -e $BINFMT/register ] || mount -t binfmt_misc binfmt_misc $BINFMT 2>/dev/null || die "cannot mount binfmt_misc on $BINFMT"
if [ ! -e $BINFMT/qemu-aarch64 ]; then
  [ -f /usr/lib/binfmt.d/qemu-aarch64.conf ] || die "qemu-user-static has no /usr/lib/binfmt.d/qemu-aarch64.conf"
  cat /usr/lib/binfmt.d/qemu-aarch64.conf > $BINFMT/register || die "cannot register qemu-aarch64 in binfmt_misc"
fi
[ "$(head -1 $BINFMT/qemu-aarch64)" = enabled ] || die "the binfmt_misc entry qemu-aarch64 is disabled"
echo "arm64:   $(qemu-aarch64-static --version | head -1); binfmt qemu-aarch64 enabled"
took

step "2/4 aarch64 Python 3.11 from Debian's arm64 packages"
R=$W/root  # the aarch64 filesystem: qemu finds the dynamic loader and libraries under it
export QEMU_LD_PREFIX=$R
PY=$R/usr/bin/python3.11
# It sees its own files and the project's only: not the host's PYTHONPATH nor the user's site-packages (x86
# wheels may be there); it writes no bytecode into the checkout.
unset PYTHONHOME
export PYTHONPATH=$ROOT PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1
if [ "$(cat "$R/.debs" 2>/dev/null)" = "$DEBS" ] && $PY -c pass 2>/dev/null; then
  echo "arm64:   already there"
else
  # A private apt state: the host's Debian sources restricted to arm64, its own lists, cache and empty status.
  A=$W/apt
  rm -rf "$A" "$R"
  mkdir -p "$A/sources" "$A/lists/partial" "$A/archives/partial" "$R"
  : > "$A/status"
  for f in /etc/apt/sources.list.d/*.sources; do  # deb822: one Architectures line per stanza
    [ -f "$f" ] && sed -e '/^Architectures:/d' -e 's/^Types:.*/&\nArchitectures: arm64/' "$f" > "$A/sources/$(basename "$f")"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do  # one-line format: [arch=arm64 ...]
    [ -f "$f" ] && sed -En -e 's/arch=[^] ]*//' -e 's/^deb +(\[([^]]*)\] +)?/deb [arch=arm64 \2] /p' "$f" \
      > "$A/sources/$(basename "$f" .list).list"
  done
  cat > "$A/apt.conf" <<EOF
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
Dir::Etc::SourceList "$A/sources/none.list";
Dir::Etc::SourceParts "$A/sources";
Dir::State "$A";
Dir::State::Lists "$A/lists";
Dir::State::status "$A/status";
Dir::Cache "$A";
Dir::Cache::archives "$A/archives";
Acquire::Languages "none";
APT::Install-Recommends "false";
EOF
  APT_CONFIG=$A/apt.conf apt-get update -qq || die "apt-get update (arm64, private state in $A) failed"
  # python3.11 pulls its stdlib, libc6, libssl3, libffi8, zlib1g, ... (about 40 packages, 16 MB)
  APT_CONFIG=$A/apt.conf apt-get install -y -qq --download-only $DEBS >/dev/null ||
    die "downloading the arm64 packages ($DEBS) failed"
  for deb in "$A"/archives/*.deb; do dpkg -x "$deb" "$R"; done
  $PY -c pass || die "the aarch64 python does not start under qemu ($PY)"
  echo "$DEBS" > "$R/.debs"
fi
$PY -c 'import platform, sys; print("arm64:  ", platform.machine(), "Python", sys.version.split()[0])'
took

step "3/4 aarch64 wheels"
SITE=$R/usr/local/lib/python3.11/dist-packages  # on Debian python3.11's sys.path
if [ "$(cat "$SITE/.wheels" 2>/dev/null)" = "$WHEELS" ]; then
  echo "arm64:   already there"
else
  PLATFORMS=""
  for v in $(seq 17 36); do PLATFORMS="$PLATFORMS --platform manylinux_2_${v}_aarch64"; done  # Debian 12: glibc 2.36
  rm -rf "$SITE"
  # shellcheck disable=SC2086
  $HOST_PY -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --only-binary=:all: \
    --platform manylinux2014_aarch64 $PLATFORMS --python-version 3.11 --implementation cp --abi cp311 \
    --target "$SITE" $WHEELS || die "pip could not install the aarch64 wheels into $SITE"
  echo "$WHEELS" > "$SITE/.wheels"
fi
$PY -c 'import numba, numpy, llvmlite.binding as ll; print("arm64:   numba", numba.__version__, "numpy",
numpy.__version__, "LLVM host cpu", ll.get_host_cpu_name())'
took

step "4/4 pytest under qemu-aarch64: $(echo $TESTS_A) | $(echo $TESTS_B)"
# Under qemu LLVM reads the host's x86 cpuinfo and would target a generic core: name a real one, with the
# dotprod extension (sdot). Fresh caches of their own (one per group), so x86 and aarch64 compilations never mix.
export NUMBA_CPU_NAME=neoverse-n1
# Every example of a property test runs under qemu: 10 each here (the x86 run keeps the tests' own 25-40).
export TINYVLM_TEST_EXAMPLES=${TINYVLM_TEST_EXAMPLES:-10}
unset TINYVLM_BACKEND NUMBA_DISABLE_JIT NUMBA_NUM_THREADS
run_group() {  # name, test files...: pytest into $W/pytest-<name>.log
  local name=$1
  shift
  rm -rf "$W/numba-cache-$name"
  # Not a single torch test: test_kernels.py's torch oracles are marked "torch" and deselected here. Past the
  # time limit pytest gets SIGINT, so it still reports what failed and what took long.
  NUMBA_CACHE_DIR="$W/numba-cache-$name" timeout -s INT -k 30 "$TEST_TIMEOUT" $PY -m pytest -q -p no:cacheprovider \
    --durations=5 -m "not torch" "$@" > "$W/pytest-$name.log" 2>&1
}
status=0
# shellcheck disable=SC2086
run_group a $TESTS_A & A=$!
if [ -n "$TESTS_B" ]; then
  # shellcheck disable=SC2086
  run_group b $TESTS_B & B=$!
fi
wait $A || status=1
if [ -n "$TESTS_B" ]; then wait $B || status=1; fi
cat "$W/pytest-a.log"
if [ -n "$TESTS_B" ]; then cat "$W/pytest-b.log"; fi
[ $status = 0 ] || die "aarch64 tests failed (or ran past ${TEST_TIMEOUT} s)"
took
echo "arm64: all passed in $((SECONDS - T0)) s"
