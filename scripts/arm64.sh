#!/usr/bin/env bash
# Run a command on an emulated arm64 CPU: Cortex-A72 (Raspberry Pi 4) or Cortex-A76 (Pi 5).
#
#   scripts/arm64.sh a72|a76 [--] COMMAND [ARGS...]        as root; runs in the clone's top folder
#   scripts/arm64.sh a76 -- python3 -m pytest tests/test_sampling.py -q -p no:cacheprovider
#
# COMMAND runs in a Debian bookworm arm64 root (Python 3.11, aarch64 wheels from PyPI pinned to the
# dev venv's versions) under qemu-user with `-cpu cortex-a72|a76`, chrooted in a private mount
# namespace. The clone and $HOME/.cache are bind-mounted at their host paths, so paths printed on
# either side agree. The clone's code is an editable install (a small overlay built on the host per
# pyproject.toml), so `edge_qwen` and the `edge-qwen` command are the working tree's, never the
# cached root's. Child processes (sys.executable, edge-qwen) run under the same -cpu through
# binfmt_misc (QEMU_CPU); EDGE_QWEN_ARM64_CPU=a72|a76 tells tests which core they are on.
# The root is cached in ${EDGE_QWEN_ARM64_ROOT:-$HOME/.cache/edge-qwen-arm64}/<hash of the build
# section below>, built once (about a minute), and read-only while a command runs.
set -euo pipefail

say() { echo "arm64: $*" >&2; }
die() { say "$*"; exit 1; }

# >>> build section: its text is the recipe; changing anything here rebuilds the root.
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
DEBS=(python3)  # on top of --variant=minbase; Debian's python3 is 3.11.2 on bookworm
# The same versions as the dev venv (/work/venv, `pip freeze`) so that numbers compare; each has an
# aarch64 wheel for CPython 3.11. The runtime dependencies of pyproject.toml, theirs, pytest, pexpect.
PINS=(
  numpy==2.4.6 onnxruntime==1.32.0 tokenizers==0.23.3 protobuf==7.36.2 Jinja2==3.1.6 click==8.5.1
  tqdm==4.70.1 onnx==1.23.2 safetensors==0.8.0 gguf==0.19.0 huggingface_hub==2.4.0
  MarkupSafe==3.0.4 flatbuffers==25.12.19 packaging==26.4 ml_dtypes==0.7.0 typing_extensions==4.16.0
  PyYAML==6.0.4 requests==2.34.2 certifi==2026.10.19.post1 charset-normalizer==3.5.3 idna==3.20
  urllib3==2.8.0 filelock==4.3.2 fsspec==2026.9.0 hf-xet==1.8.0 httpx2==2.16.2 httpcore2==2.16.2
  h11==0.16.0 anyio==4.16.0 truststore==0.10.5
  pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 Pygments==2.21.0 pexpect==4.9.0 ptyprocess==0.7.0
)
SETUPTOOLS=setuptools==84.2.1  # on the host, to build the overlay (pyproject needs >= 77)
SITE=/usr/local/lib/python3.11/dist-packages  # the wheels
OVERLAY_SITE=/usr/lib/python3.11/dist-packages  # a site dir Debian's python3 reads and leaves empty

# /proc/cpuinfo as the Pi's kernel writes it, 2 cores. ONNX Runtime's cpuinfo reads it for the core
# type; the ISA features it uses come from HWCAP, which qemu derives from -cpu.
cpuinfo_text() {  # $1: a72 | a76
  local features part variant revision
  case $1 in
    a72) features="fp asimd evtstrm crc32 cpuid" part=0xd08 variant=0x0 revision=3 ;;
    a76) features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm"
         features+=" lrcpc dcpop asimddp"
         part=0xd0b variant=0x4 revision=1 ;;
  esac
  for n in 0 1; do
    printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$n" "$features"
    printf 'CPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
      "$variant" "$part" "$revision"
  done
}

# Folder $1 gets root/ (the arm64 system), tools/ (host setuptools), cpuinfo-a72/-a76. Log to $2.
build_root() {
  local dir=$1 log=$2 root=$1/root deb platforms=() v
  step "debootstrap --foreign: Debian $SUITE arm64, minbase + ${DEBS[*]} (download, unpack the base)"
  debootstrap --foreign --arch=arm64 --variant=minbase --include="$(IFS=,; echo "${DEBS[*]}")" \
    "$SUITE" "$root" "$MIRROR" >>"$log" 2>&1 || fail "debootstrap failed; check that $MIRROR is reachable"

  # Unpacking on the host instead of debootstrap's second stage: 4 s instead of 2+ minutes of
  # maintainer scripts under emulation, and no need for binfmt_misc to build.
  step "unpacking the other packages on the host"
  for deb in "$root"/var/cache/apt/archives/*.deb; do
    # --keep-directory-symlink: bookworm's /bin, /lib are symlinks into /usr (merged /usr)
    dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$root" || fail "cannot unpack $deb"
  done
  rm -rf "$root/debootstrap" "$root"/var/cache/apt/archives/*.deb "$root"/usr/share/{doc,man,info,locale}
  # The first stage leaves /proc -> /proc: a mount there would land on the host's /proc.
  rm -f "$root/proc" && mkdir "$root/proc"
  # What the maintainer scripts we skipped would have written:
  cp "$root/usr/share/base-passwd/passwd.master" "$root/etc/passwd"
  cp "$root/usr/share/base-passwd/group.master" "$root/etc/group"
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
  # Mount points and names for the run: the overlay, its entry points where tests look for them
  # (next to sys.executable), and qemu when binfmt_misc is not there.
  mkdir -p "$root$OVERLAY_SITE" "$root/usr/libexec"
  ln -s "../lib/python3.11/dist-packages/bin/edge-qwen" "$root/usr/bin/edge-qwen"
  touch "$root/usr/libexec/qemu-aarch64-static"

  step "pip: ${#PINS[@]} pinned aarch64 wheels for CPython 3.11 into $SITE (binary only)"
  # This pip does not widen manylinux_2_36 to older glibc tags itself: list them (bookworm: glibc 2.36).
  for v in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${v}_aarch64"); done
  "$PYTHON" -m pip install --disable-pip-version-check --no-input --no-compile --only-binary=:all: \
    "${platforms[@]}" --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp \
    --abi cp311 --target "$root$SITE" "${PINS[@]}" >>"$log" 2>&1 \
    || fail "pip could not fetch the aarch64 wheels; check that PyPI is reachable"
  # Its scripts point at the host's Python; give them the root's and put them on its PATH.
  sed -i '1s|^#!.*python.*$|#!/usr/bin/python3|' "$root$SITE"/bin/*
  mkdir -p "$root/usr/local/bin"
  mv "$root$SITE"/bin/* "$root/usr/local/bin/"
  rmdir "$root$SITE/bin"

  step "pip: $SETUPTOOLS for the host, to build the overlay of the clone"
  "$PYTHON" -m pip install --disable-pip-version-check --no-input --no-compile --target "$dir/tools" \
    "$SETUPTOOLS" >>"$log" 2>&1 || fail "pip could not install $SETUPTOOLS; check that PyPI is reachable"

  cpuinfo_text a72 >"$dir/cpuinfo-a72"
  cpuinfo_text a76 >"$dir/cpuinfo-a76"

  # The root is read-only at run time: without .pyc files each run would compile all it imports.
  # CPython 3.11.x share one bytecode format, so a 3.11 host compiles natively (10 s, 50 emulated).
  step "compiling the standard library and the wheels to bytecode"
  if "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    # (not sitecustomize.py: an absolute symlink into /etc, which here would be the host's file)
    "$PYTHON" -m compileall -q -j 0 -s "$root" -p / -x '/sitecustomize\.py$' \
      "$root/usr/lib/python3.11" "$root$SITE" >>"$log" 2>&1
  else
    in_root "$root" "$dir/cpuinfo-a76" cortex-a76 "" "$MODE" rw "$CLONE" /usr/bin/python3 -m compileall -q \
      /usr/lib/python3.11 "$SITE" >>"$log" 2>&1
  fi || fail "compileall failed"

  step "checking: ldconfig, then import onnxruntime, numpy, tokenizers, onnx (emulated)"
  in_root "$root" "$dir/cpuinfo-a76" cortex-a76 "" "$MODE" rw "$CLONE" /sbin/ldconfig >>"$log" 2>&1 \
    || fail "ldconfig failed in the root"
  in_root "$root" "$dir/cpuinfo-a76" cortex-a76 "" "$MODE" rw "$CLONE" /usr/bin/python3 -c \
    "import onnxruntime, numpy, tokenizers, onnx; print(onnxruntime.__version__, numpy.__version__)" \
    >>"$log" 2>&1 || fail "the root's Python cannot import onnxruntime"
}
# <<< build section

step() { STEP=$((STEP + 1)); say "build step $STEP, at $((SECONDS - BUILD_START)) s: $*"; }
fail() { die "cannot build the root: $1; log: $BUILD_LOG"; }

# Host packages come from apt-get when missing: CI machines start with none of them.
install_host() {  # $1: a Debian package
  say "installing $1 with apt-get"
  local log=/tmp/arm64-apt.log
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "$1"; } \
    >"$log" 2>&1 || die "cannot install $1: apt-get failed (log: $log); is deb.debian.org reachable?"
}

# A host Python with pip: the active venv's, else Debian's (pip 23 has every flag used here).
find_python() {
  for PYTHON in python3 /usr/bin/python3; do
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then return; fi
  done
  install_host python3-pip
  PYTHON=/usr/bin/python3
}

# aarch64 ELF -> qemu-aarch64-static with flag F (the kernel opens qemu now, so it also serves
# inside the chroot): Debian's own entry, the one systemd-binfmt would register. Only aarch64 ELF
# files match it, so the x86 host is unaffected; an aarch64 entry already there is kept. Sets MODE
# to binfmt, or to explicit where that cannot be had: then only the first process is emulated.
set_mode() {
  local dir=/proc/sys/fs/binfmt_misc conf=/usr/lib/binfmt.d/qemu-aarch64.conf entry unusable=""
  MODE=binfmt
  if [[ -e $dir/register ]] || mount -t binfmt_misc binfmt_misc "$dir" 2>/dev/null; then
    for entry in "$dir"/*; do
      grep -q '^magic 7f454c460201010000000000000000000200b700' "$entry" 2>/dev/null || continue
      if grep -q '^enabled' "$entry" && grep -q '^flags: .*F' "$entry"; then return; fi
      say "warning: $entry (aarch64) is disabled or lacks flag F, so it cannot serve in a chroot;" \
        "'echo -1 > $entry' lets this script register Debian's"
      unusable=$entry
      break
    done
    if [[ -z $unusable ]] && cat "$conf" >"$dir/register" 2>/dev/null; then return; fi
  fi
  MODE=explicit
  say "warning: no usable binfmt_misc: only the first process is emulated;" \
    "child processes (sys.executable, edge-qwen, sh) cannot start"
}

# Sets RUN to the command line that runs a command in a root; the arguments are enter_root's.
root_command() {
  RUN=(unshare --mount --propagation private -- bash -euo pipefail -c
    "$(declare -f enter_root); enter_root \"\$@\"" enter_root "$@")
}
in_root() { root_command "$@" && "${RUN[@]}"; }

# Runs in a new mount namespace (private: the host sees none of these mounts, and they go away
# with the last process), then becomes the command.
#   $1 root  $2 cpuinfo file  $3 qemu -cpu  $4 overlay or ""  $5 binfmt|explicit  $6 ro|rw  $7 clone
enter_root() {
  local root=$1 cpuinfo=$2 qemu_cpu=$3 overlay=$4 mode=$5 access=$6 clone=$7 d f line interp
  shift 7
  # A mount of its own, to make it read-only below. The first mount: say once why if mounts are barred.
  mount --bind "$root" "$root" 2>/dev/null \
    || { echo "arm64: cannot mount in a new mount namespace; run as root, outside containers that bar it" >&2
         exit 1; }
  mount -t proc proc "$root/proc"
  # The host's x86 /proc/cpuinfo and /sys/devices/system/cpu make ONNX Runtime's cpuinfo crash
  # (SIGSEGV at import): an ARM cpuinfo, and a /sys holding only the CPU lists, 2 CPUs.
  mount --bind "$cpuinfo" "$root/proc/cpuinfo"
  mount -t tmpfs -o mode=755,size=64k sys "$root/sys"
  mkdir -p "$root/sys/devices/system/cpu"
  for f in possible present online; do echo 0-1 >"$root/sys/devices/system/cpu/$f"; done
  mount --rbind /dev "$root/dev"  # /dev/pts for pexpect, /dev/shm for multiprocessing
  mount -t tmpfs -o mode=1777 tmp "$root/tmp"
  mount -t tmpfs -o mode=755 run "$root/run"
  mkdir -p "$root$HOME"
  mount -t tmpfs -o mode=700 home "$root$HOME"
  # The same paths as on the host: the overlay's finder points into the clone, caches are shared.
  mkdir -p "$HOME/.cache" "$root$HOME/.cache" "$root$clone"
  mount --bind "$HOME/.cache" "$root$HOME/.cache"
  mount --bind "$clone" "$root$clone"
  if [[ -n $overlay ]]; then mount --bind "$overlay" "$root/usr/lib/python3.11/dist-packages"; fi
  if [[ $access == ro ]]; then mount -o remount,bind,ro "$root"; fi
  if [[ $mode == explicit ]]; then
    # No binfmt_misc: qemu runs the first process itself, so it needs the ELF file's path.
    mount --bind "$(command -v qemu-aarch64-static)" "$root/usr/libexec/qemu-aarch64-static"
    if [[ $1 != */* ]]; then
      for d in /usr/lib/python3.11/dist-packages/bin /usr/local/bin /usr/bin /bin; do
        if [[ -x $root$d/$1 ]]; then set -- "$d/$1" "${@:2}" && break; fi
      done
    elif [[ $1 != /* ]]; then
      set -- "$clone/$1" "${@:2}"
    fi
    line=$(head -c 200 "$root$1" 2>/dev/null | head -n 1 | tr -d '\0')
    if [[ $line == '#!'* ]]; then read -ra interp <<<"${line#'#!'}" && set -- "${interp[@]}" "$@"; fi
    set -- /usr/libexec/qemu-aarch64-static -cpu "$qemu_cpu" "$@"
  fi
  cd /
  exec env -u PYTHONPATH -u PYTHONHOME -u PYTHONSTARTUP -u PYTHONUSERBASE -u VIRTUAL_ENV -u TMPDIR \
    -u LD_LIBRARY_PATH -u LD_PRELOAD -u CONDA_PREFIX \
    PATH=/usr/lib/python3.11/dist-packages/bin:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin \
    QEMU_CPU="$qemu_cpu" EDGE_QWEN_ARM64_CPU="${qemu_cpu#cortex-}" \
    unshare --root="$root" --wd="$clone" -- "$@"
}

# The root for this recipe: built when missing, in a temp folder renamed into place, one build at a time.
ensure_root() {
  local hash
  hash=$(sed -n '/^# >>> build section/,/^# <<< build section/p' "$SCRIPT" | sha256sum | cut -c1-16)
  DIR=$BASE/$hash
  if [[ -d $DIR ]]; then return; fi
  mkdir -p "$BASE"
  exec {BUILD_LOCK}>>"$BASE/.lock"
  flock -n "$BUILD_LOCK" || { say "waiting for another build of the root"; flock "$BUILD_LOCK"; }
  if [[ ! -d $DIR ]]; then
    command -v debootstrap >/dev/null || install_host debootstrap
    find_python
    rm -rf "$BASE"/.build-*  # left by a killed build: nobody else builds while we hold the lock
    BUILD_TMP=$(mktemp -d "$BASE/.build-$hash.XXXXXX")
    trap 'rm -rf "$BUILD_TMP"' EXIT
    BUILD_LOG=$BASE/build-$hash.log
    : >"$BUILD_LOG"
    BUILD_START=$SECONDS
    say "building the arm64 root $DIR (once per recipe; log: $BUILD_LOG)"
    build_root "$BUILD_TMP" "$BUILD_LOG"
    sed -n '/^# >>> build section/,/^# <<< build section/p' "$SCRIPT" >"$BUILD_TMP/recipe.txt"
    : >"$BUILD_TMP/.inuse"
    mv -T "$BUILD_TMP" "$DIR"
    trap - EXIT
    say "root built in $((SECONDS - BUILD_START)) s, $(du -sh "$DIR" | cut -f1) on disk"
  fi
  remove_old_roots
  exec {BUILD_LOCK}>&-
}

# Other recipes' roots (16 hex digits, with an .inuse file), unless a run still holds a shared
# lock on that file. Nothing else in $BASE is touched.
remove_old_roots() {
  local old fd
  for old in "$BASE"/*/.inuse; do
    old=${old%/.inuse}
    [[ $old != "$DIR" && ${old##*/} =~ ^[0-9a-f]{16}$ ]] || continue
    exec {fd}<"$old/.inuse"
    if flock -n -x "$fd"; then
      rm -rf "$old" "$BASE/build-${old##*/}.log"
      say "removed the root of an older recipe, $old"
    fi
    exec {fd}<&-
  done
}

# The clone as an editable install: a .pth and a finder that map edge_qwen.export -> ./export etc.
# (pyproject's package-dir, which PYTHONPATH alone cannot express), plus the entry points. Keyed by
# pyproject.toml and the clone's path; the code itself is read live from the clone.
ensure_overlay() {
  local key tmp
  key=$({ cat pyproject.toml; echo "$CLONE $SETUPTOOLS"; } | sha256sum | cut -c1-16)
  OVERLAY=$DIR/overlays/$key
  if [[ ! -d $OVERLAY ]]; then
    find_python
    mkdir -p "$DIR/overlays"
    find "$DIR/overlays" -mindepth 1 -maxdepth 1 -mtime +7 -exec rm -rf {} +
    tmp=$(mktemp -d "$DIR/overlays/.new.XXXXXX")
    PYTHONPATH=$DIR/tools "$PYTHON" -m pip install --disable-pip-version-check --no-input --no-deps \
      --no-build-isolation --no-compile --target "$tmp" -e "$CLONE" >"$tmp.log" 2>&1 \
      || die "cannot install the clone into the overlay: pip failed (log: $tmp.log); check pyproject.toml"
    if [[ -d $tmp/bin ]]; then sed -i '1s|^#!.*python.*$|#!/usr/bin/python3|' "$tmp"/bin/*; fi
    mv -T "$tmp" "$OVERLAY" 2>/dev/null || rm -rf "$tmp"  # a concurrent run made it first
    rm -f "$tmp.log"
  fi
  touch "$OVERLAY"
}

# All of it in a function: bash reads a script as it runs, and this one may be edited or checked
# out anew while a command it started still runs.
main() {
  local usage="usage: scripts/arm64.sh a72|a76 [--] COMMAND [ARGS...]"
  case ${1:-} in
    a72 | a76) CPU=$1 ;;
    *) die "$usage" ;;
  esac
  shift
  [[ ${1:-} != -- ]] || shift
  (($#)) || die "$usage"
  [[ $EUID -eq 0 ]] || die "needs root (mount namespace, chroot, binfmt_misc); run it as root or with sudo"
  [[ -n ${HOME:-} && $HOME != / ]] || die "HOME must be set (its .cache is shared with the root)"

  SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
  CLONE=$(dirname "$(dirname "$SCRIPT")")
  cd "$CLONE"
  BASE=${EDGE_QWEN_ARM64_ROOT:-$HOME/.cache/edge-qwen-arm64}
  STEP=0

  command -v qemu-aarch64-static >/dev/null || install_host qemu-user-static
  set_mode
  ensure_root
  ensure_overlay
  exec {INUSE}<"$DIR/.inuse"
  flock -s "$INUSE"  # inherited by the command: the root is not removed while it runs
  root_command "$DIR/root" "$DIR/cpuinfo-$CPU" "cortex-$CPU" "$OVERLAY" "$MODE" ro "$CLONE" "$@"
  exec "${RUN[@]}"
}

main "$@"
