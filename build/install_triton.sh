#!/usr/bin/env bash
# Assemble a runnable Triton 2.51 tree under build/triton/ (git-ignored):
#   build/triton/bin/{tritonserver,perf_analyzer}        symlinks to the real binaries
#   build/triton/backends/python/                         libtriton_python.so, utils, stub
#   build/triton/backends/pets/model.py                   copy of backend/model.py
#   build/triton/backends/pets_admin/model.py             copy of backend/pets_admin/model.py
#   build/triton/lib/{libb64.so.0d,libcudart.so.12}       sonames perf_analyzer links against
#   build/triton/env.sh                                   LD_LIBRARY_PATH + PATH for the server
#
# Sources, in order:
#   PETS_TRITON_RUNTIME=<dir>  a packed runtime (shared/tools/pack-triton-runtime.sh unpacked
#                              into <dir>, i.e. <dir>/trt/{bin,backends,lib}); for the GPU host
#                              without package access. Its stub must match the python below.
#   otherwise                  the nvidia-pytriton==0.7.0 wheel (Triton 2.51.0) installed in
#                              the python below, plus perf_analyzer from tritonclient==2.51.0.
# Python: PETS_PYTHON, else .venv/bin/python, else python3. The stub embeds that python's
# libpython; env.sh puts its LIBDIR on LD_LIBRARY_PATH and its bin/ first on PATH (the stub
# takes sys.prefix, hence site-packages, from the first python3 on PATH).
# Only source env.sh for tritonserver / perf_analyzer processes, not for torch programs.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out="$root/build/triton"
die() { echo "install_triton: $*" >&2; exit 1; }

py=${PETS_PYTHON:-}
if [[ -z "$py" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py=$(command -v python3); fi
fi
[[ -x "$py" ]] || die "python '$py' is not executable; set PETS_PYTHON or run build/setup_env.sh"
read -r pyver libdir bindir < <("$py" -c 'import os, sys, sysconfig
print(f"{sys.version_info[0]}.{sys.version_info[1]}", sysconfig.get_config_var("LIBDIR") or "/usr/lib",
      os.path.dirname(os.path.abspath(sys.executable)))')
# Triton 2.51's stub decodes BYTES inputs only under numpy 1.x (pets.protocol.check_stub_numpy).
npver=$("$py" -c 'import numpy; print(numpy.__version__)' 2>/dev/null || echo none)
[[ "$npver" == 1.* ]] || die "numpy $npver in $py; the Triton 2.51 stub needs numpy 1.x (it aborts on the first request under numpy 2): pip install 'numpy<2' there, or offline put a numpy 1.26 wheel in .whl/ and rerun build/setup_env.sh"

if [[ -n "${PETS_TRITON_RUNTIME:-}" ]]; then
  trt="$PETS_TRITON_RUNTIME/trt"
  [[ -d "$trt" ]] || die "PETS_TRITON_RUNTIME=$PETS_TRITON_RUNTIME has no trt/ folder; unpack the tarball of shared/tools/pack-triton-runtime.sh there (tar -xJf FILE -C DIR)"
  server="$trt/bin/tritonserver"; pa="$trt/bin/perf_analyzer"
  pyback="$trt/backends/python"; stub="$pyback/triton_python_backend_stub"; libs="$trt/lib"
  # The packed stub was built for one python; it must be the one that runs the engine.
  need=$(readelf -d "$stub" 2>/dev/null | sed -n 's/.*Shared library: \[libpython\([0-9.]*\)\.so.*/\1/p' || true)
  if [[ -n "$need" && "$need" != "$pyver" ]]; then
    die "the packed stub links libpython$need but $py is $pyver; repack with: pack-triton-runtime.sh OUT.tar.xz $pyver"
  fi
else
  site=$("$py" -c 'import importlib.util as u, os
s = u.find_spec("pytriton")
print(os.path.dirname(list(s.submodule_search_locations)[0]) if s else "")')
  [[ -n "$site" ]] || die "nvidia-pytriton is not installed in $py; run build/setup_env.sh (pip install nvidia-pytriton==0.7.0) or set PETS_TRITON_RUNTIME"
  t="$site/pytriton/tritonserver"
  server="$t/bin/tritonserver"; pyback="$t/backends/python"; libs="$site/nvidia_pytriton.libs"
  stub="$t/python_backend_stubs/$pyver/triton_python_backend_stub"
  pa="$bindir/perf_analyzer"
fi
for f in "$server" "$pyback/libtriton_python.so" "$pyback/triton_python_backend_utils.py" "$stub"; do
  [[ -f "$f" ]] || die "missing $f (expected Triton 2.51 files; for python $pyver the stub must exist)"
done

mkdir -p "$out/bin" "$out/lib" "$out/backends/python" "$out/backends/pets" "$out/backends/pets_admin"
cp -f "$pyback/libtriton_python.so" "$pyback/triton_python_backend_utils.py" "$out/backends/python/"
cp -f "$stub" "$out/backends/python/triton_python_backend_stub"
chmod +x "$out/backends/python/triton_python_backend_stub"
cp -f "$root/backend/model.py" "$out/backends/pets/model.py"
cp -f "$root/backend/pets_admin/model.py" "$out/backends/pets_admin/model.py"
ln -sfn "$server" "$out/bin/tritonserver"
if [[ -x "$pa" ]]; then ln -sfn "$pa" "$out/bin/perf_analyzer"
else echo "install_triton: note: no perf_analyzer at $pa (install tritonclient[all]==2.51.0)" >&2; fi
b64=$(ls "$libs"/libb64*.so.0d 2>/dev/null | head -n1 || true)
cudart=$(ls "$libs"/libcudart*.so.12* 2>/dev/null | head -n1 || true)
[[ -n "$b64" ]] && ln -sfn "$b64" "$out/lib/libb64.so.0d"
[[ -n "$cudart" ]] && ln -sfn "$cudart" "$out/lib/libcudart.so.12"

cat > "$out/env.sh" <<EOF
# generated by build/install_triton.sh; source before running tritonserver/perf_analyzer
export PETS_TRITON_HOME="$out"
export PETS_TRITON_BACKENDS="$out/backends"
export PATH="$bindir:$out/bin:\$PATH"
export LD_LIBRARY_PATH="$libs:$libdir:$out/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOF
echo "install_triton: Triton 2.51 runtime in $out (python $pyver, libs from $libs)"
