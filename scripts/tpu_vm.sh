#!/usr/bin/env bash
# Cloud TPU VM slices with gcloud: create one, put this checkout and a Python 3.12 venv on every
# worker, run one command on all workers at once, read logs, stop, delete.
#
#   scripts/tpu_vm.sh create NAME --zone ZONE --type v5p-128 [--version IMAGE] [--spot]
#   scripts/tpu_vm.sh setup  NAME --zone ZONE          # copy the checkout, install (every worker)
#   scripts/tpu_vm.sh run    NAME --zone ZONE -- python train.py llama3-8b train.run_dir=gs://b/run
#   scripts/tpu_vm.sh logs   NAME --zone ZONE [--worker N]   # follow one worker's log (default 0)
#   scripts/tpu_vm.sh stop   NAME --zone ZONE          # SIGTERM on every worker: checkpoint, exit
#   scripts/tpu_vm.sh delete NAME --zone ZONE
#
# `run` starts the command detached under nohup in ~/tessera on every worker (output in
# ~/tessera/run.log): closing the terminal does not stop training. jax finds the slice's other
# hosts through the TPU metadata server; train.py initializes jax.distributed by itself.
# Stock TPU VM images ship Python 3.10; setup installs Python 3.12 with uv (from PyPI).
# GCLOUD overrides the gcloud binary (the tests use a recording stand-in).
set -euo pipefail

GCLOUD=${GCLOUD:-gcloud}
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[[ $# -ge 2 ]] || usage
action=$1 name=$2
shift 2
zone="" type="" version="tpu-ubuntu2204-base" spot="" worker=0 cmd=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --zone) zone=$2; shift 2 ;;
    --type) type=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --spot) spot="--spot"; shift ;;
    --worker) worker=$2; shift 2 ;;
    --) shift; cmd=("$@"); break ;;
    *) echo "error: unknown option $1" >&2; usage ;;
  esac
done
[[ -n $zone ]] || { echo "error: --zone is required" >&2; exit 2; }

tpu() { "$GCLOUD" compute tpus tpu-vm "$@" --zone="$zone"; }
on_all() { tpu ssh "$name" --worker=all --command="$1"; }

case $action in
  create)
    [[ -n $type ]] || { echo "error: create needs --type (e.g. v5p-128, v5litepod-256, v6e-64)" >&2; exit 2; }
    tpu create "$name" --accelerator-type="$type" --version="$version" ${spot:+"$spot"}
    ;;
  setup)
    root=$(cd "$(dirname "$0")/.." && pwd)
    archive=$(mktemp --suffix=.tar.gz)
    trap 'rm -f "$archive"' EXIT
    # Tracked and new files, as git sees them: no venvs, runs or caches.
    (cd "$root" && git ls-files -z --cached --others --exclude-standard | tar czf "$archive" --null -T -)
    tpu scp "$archive" "$name":tessera.tar.gz --worker=all
    on_all 'set -e; mkdir -p ~/tessera && tar xzf ~/tessera.tar.gz -C ~/tessera && cd ~/tessera &&
      (command -v uv >/dev/null || python3 -m pip install --user -q uv) && export PATH=$HOME/.local/bin:$PATH &&
      uv python install 3.12 && uv venv --allow-existing --python 3.12 .venv &&
      uv pip install --python .venv/bin/python -q ".[tpu]" && .venv/bin/python -c "import jax; print(jax.devices())"'
    ;;
  run)
    [[ ${#cmd[@]} -gt 0 ]] || { echo "error: run needs a command after --" >&2; exit 2; }
    [[ ${cmd[0]} == python ]] && cmd[0]=.venv/bin/python
    quoted=$(printf '%q ' "${cmd[@]}")
    on_all "cd ~/tessera && nohup $quoted > run.log 2>&1 < /dev/null & echo started on \$(hostname)"
    ;;
  logs)
    tpu ssh "$name" --worker="$worker" --command='tail -n 200 -F ~/tessera/run.log'
    ;;
  stop)
    on_all 'pkill -TERM -f "[p]ython.*(train|serve|sweep).py" || true'
    ;;
  delete)
    tpu delete "$name" --quiet
    ;;
  *) usage ;;
esac
