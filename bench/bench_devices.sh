#!/usr/bin/env bash
# One prepared run for a GPU machine: the same zoo subset and the shared MNIST network analysed on each
# device in DEVICES (default "cuda cpu"), one process per device, results in $OUT (default bench/results/devices).
#   OUT=/tmp/dev bash bench/bench_devices.sh            # on a machine with a GPU
#   DEVICES=cpu MODELS=alexnet bash bench/bench_devices.sh   # a dry run here
# MNIST weights: $LIPGRAPH_SHARED/lipsdp_mnist_784_50_10.npz (default ../shared/benchmarks).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/devices}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
$PY -c "import torch, torchvision, platform, os
print('torch', torch.__version__, 'torchvision', torchvision.__version__, platform.machine(), os.cpu_count(), 'cores,',
      torch.get_num_threads(), 'threads;', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
MODELS=${MODELS:-resnet18,vgg11,resnet50,densenet121,vit_b_16,alexnet,mobilenet_v2,convnext_tiny,efficientnet_b0}
for dev in ${DEVICES:-cuda cpu}; do
  timeout "${MNIST_TIMEOUT:-90}" $PY bench/bench_devices_mnist.py --device "$dev" --out "$OUT/mnist_$dev.txt" \
    2> "$OUT/mnist_$dev.err" || echo "mnist on $dev: exit $?"
  limit=ZOO_TIMEOUT_${dev^^}
  timeout "${!limit:-${ZOO_TIMEOUT:-240}}" $PY bench/bench_zoo.py --models "$MODELS" --device "$dev" --keep-going \
    --out "$OUT/zoo_$dev.txt" 2> "$OUT/zoo_$dev.err" || echo "zoo on $dev: exit $?"
done
for f in "$OUT"/*.err; do [ -s "$f" ] && { echo "== $f"; grep -v "FutureWarning\|warnings.warn" "$f" | tail -n 40; }; done
exit 0
