#!/usr/bin/env bash
# Fill .whl/ with what benchmarks/gpu_check.sh needs on a GPU machine that has torch, timm,
# pyarrow and PIL but no Ray (Python 3.12, x86-64): ray (without its Java jars, 31 MiB that
# Python never loads, so the set fits a 64 MiB transfer) and the dependencies such machines
# lack. Run here, where pip reaches PyPI:   bash benchmarks/gpu_wheels.sh
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
for pkg in ray==2.60.0 jsonschema referencing rpds-py jsonschema-specifications \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types typing-inspection typing_extensions; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp $PLAT -d .whl "$pkg"
done
python3 - <<'PY'
import glob, os, zipfile
(src,) = glob.glob(".whl/ray-*.whl")
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if info.filename.startswith("ray/jars/"):
            continue
        data = zin.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if not l.startswith(b"ray/jars/"))
        zout.writestr(info, data)
os.replace(tmp, src)
PY
du -sh .whl
