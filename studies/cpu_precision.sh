#!/usr/bin/env bash
# The CPU backend x precision results of results/cpu-precision.md, on the demo deployments (2 threads).
# Every system runs in its own process (promptmux bench's default), rounds alternating.
#   bash studies/cpu_precision.sh           (about 25 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
R=results
T=${THREADS:-2}
mkdir -p out
python -m studies.machine_limits --threads "$T" --out $R/machine-limits.json
[ -f out/minilm-demo/manifest.json ] || promptmux demo --out out/minilm-demo --quiet > /dev/null
[ -f out/gpt2-small/manifest.json ] || python -m promptmux.bench.deployments gpt2-small --out out/gpt2-small
[ -f out/smollm2-demo/manifest.json ] || promptmux demo --model smollm2 --out out/smollm2-demo --quiet > /dev/null
CLS="--backend onnxruntime,openvino,openvino/bf16 --baseline peft,peft-bf16 --mix uniform --repeats 3 --threads $T"
promptmux --quiet bench out/minilm-demo $CLS --batch-sizes 1,8,32 --seq-lens 64 --out $R/cpu-minilm-s64.json
promptmux --quiet bench out/minilm-demo $CLS --batch-sizes 8 --seq-lens 256 --out $R/cpu-minilm-s256.json
promptmux --quiet bench out/gpt2-small $CLS --batch-sizes 1,8,32 --seq-lens 32 --requests 32 --out $R/cpu-gpt2-small.json
# held-out predictions of the demo tasks: bf16 against PEFT fp32 (= the exact deployment's, test_demo)
promptmux --quiet bench out/minilm-demo --backend openvino/bf16 --skip-throughput --accuracy --threads "$T" \
    --out $R/cpu-accuracy-minilm-bf16.json
GEN="--backend onnxruntime,openvino,onnxruntime/int8 --baseline peft,peft-bf16 --mix uniform --repeats 3 --threads $T --seq-lens 32 --new-tokens 32"
promptmux --quiet bench out/smollm2-demo $GEN --batch-sizes 1 --requests 6 --out $R/cpu-smollm2-b1.json
promptmux --quiet bench out/smollm2-demo $GEN --batch-sizes 8 --requests 16 --out $R/cpu-smollm2-b8.json
promptmux --quiet bench out/smollm2-demo --backend openvino/bf16 --baseline peft --mix uniform --repeats 3 \
    --threads "$T" --seq-lens 32 --new-tokens 32 --batch-sizes 1 --requests 6 --out $R/cpu-smollm2-bf16-b1.json
python -m studies.generation_accuracy out/smollm2-demo --systems onnxruntime/fp32,onnxruntime/int8 \
    --out $R/generation-accuracy-smollm2.json
python -m studies.int8_classifier out/minilm-demo --out $R/int8-classifier-minilm.json
python -m studies.ort_fusions out/minilm-demo --out $R/ort-fusions-minilm.json
python -m studies.cpu_engines out/minilm-demo --threads "$T" --out $R/cpu-engines-minilm.json
python -m studies.precision_report $R/cpu-{minilm-s64,minilm-s256,gpt2-small,smollm2-b1,smollm2-b8,smollm2-bf16-b1}.json \
    --limits $R/machine-limits.json --notes $R/cpu-precision-notes.md --out $R/cpu-precision.md
