#!/usr/bin/env bash
# The CUDA checks and GPU figures in docs/benchmarks.md, in one run on a GPU machine whose
# python3 has torch, scikit-learn, scikit-image and pytest (no venv: nothing to install).
#   bash benchmarks/gpu.sh [OUT_DIR]
set -uo pipefail
out=${1:-.}
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
# Every CUDA-marked test of the attacks (the p2p one needs grpc/protobuf of our versions).
python3 -m pytest -q -p no:cacheprovider -m gpu tests/attacker/test_analytic.py \
    tests/attacker/test_analytic_batch.py tests/attacker/test_dlg.py tests/attacker/test_ig.py \
    2>&1 | tee "$out/gpu_tests.log" | tail -8
python3 -m pytest -q -p no:cacheprovider -m gpu tests/p2p/test_peer.py 2>&1 | tail -3
# k = 16 captured updates, together vs one by one, on the GPU.
for attack in analytic ig; do
    timeout 150 python3 benchmarks/attack_speed.py --device cuda --parts 3 --many-attack "$attack" \
        --k 16 2>&1 | tee -a "$out/gpu_bench.log"
done
# Batches of 4 and 8 at a 10 s budget each, published DLG beside ours, on the GPU.
timeout 150 python3 benchmarks/attack_speed.py --device cuda --parts 2 --batch-attacks analytic,ig \
    --budget 10 2>&1 | tee -a "$out/gpu_bench.log"
