#!/usr/bin/env bash
# The GPU checks in one script, for a lent GPU machine (the `device` tool) with PyTorch, Triton, transformers, PEFT,
# onnx and onnxscript installed and nothing reachable. From the checkout's root there:
#
#   bash studies/gpu_check.sh STASH OUT
#
# STASH: a folder with onnxruntime-gpu's wheel split into part.* (it travels in pieces under the tool's size limit:
# `split -b 52M` of onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl, built for CUDA 13) and any other
# wheels to put in front of the machine's own (*.whl: peft). OUT: where the results go. Each step runs whatever
# the one before it gave, under its own time limit, and says what it ran. STEPS (default "kernels binding bench")
# picks steps; "profile" adds ONNX Runtime's CUDA profile by operator (studies.ort_cuda_profile).
#
# How it was sent (2026-12-04, results/gpu-check-h200.log): here, `pip download --no-deps --only-binary=:all:
# --python-version 3.12 --platform manylinux_2_28_x86_64 onnxruntime-gpu==1.31.1 peft==0.21.2`, the ORT wheel split
# into .device/c_part.NN/ (ignored by git; 5 parts, the PEFT wheel beside the last); one `run` per part, carrying
# it and copying it to /tmp/stash (the machine keeps /tmp while warm, 30 s), the last one then running this script.
set -u
STASH=${1:?usage: gpu_check.sh STASH OUT}; OUT=${2:?usage: gpu_check.sh STASH OUT}
STEPS=" ${STEPS:-kernels binding bench} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step() { echo; echo "== $* ($(date +%T))"; }

step machine
nvidia-smi -L; python3 --version
step install
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "promptmux did not install"; exit 1; }
whl=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
cat "$STASH"/part.* > "$whl"
python3 -m pip install -q --no-deps --no-index --target /tmp/site "$whl" "$STASH"/*.whl && export PYTHONPATH=/tmp/site
python3 -c "import onnxruntime as o, peft, transformers, torch; o.preload_dlls(); print('onnxruntime', o.__version__, \
o.get_available_providers(), 'peft', peft.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"

if want kernels; then
  step "the Triton MPT kernel compiled on the GPU (tests/test_kernels.py)"
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py 2>&1 | tail -12
  step "kernel against the PyTorch reference, timed (studies.kernels_mpt)"
  timeout 300 python3 -m studies.kernels_mpt --json "$OUT/kernels-mpt-h200.json" 2>&1 | tail -30
fi
if want binding; then
  step "onnxruntime-cuda's IO binding on the GPU against the CPU session (tests/test_device_backends.py)"
  PROMPTMUX_TEST_CUDA=1 timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_device_backends.py 2>&1 \
    | tail -15
fi

step "a MiniLM-shaped encoder (random weights) with two prompt-tuning tasks"
work=/tmp/gpu-check; rm -rf "$work"; mkdir -p "$work"
timeout 300 python3 - "$work" <<'PY'
import sys
from pathlib import Path

import torch
from peft import PromptTuningConfig, TaskType, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

work = Path(sys.argv[1])
torch.manual_seed(0)
cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, num_labels=2)
BertForSequenceClassification(cfg).save_pretrained(work / "base")
for name, n in (("sentiment", 8), ("topic", 12)):
    model = get_peft_model(BertForSequenceClassification.from_pretrained(work / "base"),
                           PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=n))
    model.save_pretrained(work / name)
PY
timeout 300 python3 -m promptmux export --quiet --base "$work/base" --adapter sentiment="$work/sentiment" \
  --adapter topic="$work/topic" --out "$work/deploy" 2>&1 | tail -3
if want bench; then
  step "exactness on the CUDA provider (studies.gpu_exactness)"
  timeout 200 python3 -m studies.gpu_exactness "$work/deploy" "$OUT/gpu-exactness-h200.json" 2>&1 | tail -8
  step "throughput: onnxruntime-cuda against PEFT on the same GPU (promptmux bench)"
  timeout 400 python3 -m promptmux bench "$work/deploy" --backend onnxruntime-cuda --baseline peft --mix uniform \
    --batch-sizes 1,8,32 --seq-lens 64,256 --new-tokens 0 --repeats 5 --out "$OUT/bench-cuda-minilm-shape-h200" \
    2>&1 | tail -25
fi
if want profile; then
  for shape in "32 256" "8 64"; do
    set -- $shape
    step "ONNX Runtime's CUDA profile by operator at B=$1 x $2 (studies.ort_cuda_profile)"
    timeout 200 python3 -m studies.ort_cuda_profile "$work/deploy" "$OUT/ort-cuda-profile-h200-b$1-s$2.json" \
      --batch "$1" --tokens "$2" 2>&1 | grep -v "W:onnxruntime" | tail -14
  done
fi
step done
