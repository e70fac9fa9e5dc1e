#!/usr/bin/env bash
# GPU measurements in one prepared run: the benchmark (fp32 and fp16), the evaluation's throughput, the class maps and
# head ablation, and the model-family rows. Each step has its own time limit, so one failure or overrun leaves the
# others' results; every step's output is appended to OUT/log.txt and its status to OUT/steps.txt.
#
#   bash benchmarks/gpu.sh OUT [STEP ...]      (steps: tests kernels fp32 fp32-formed fp32-eager memory fp16 bf16
#                                               profile batch batch-bf16 eval-rate eval-bundled eval-vitb class-maps
#                                               ablation families graph-routes)
#
# Needs a CUDA device; weights are random (nothing is downloaded). Fashion-MNIST's test files are read from
# $VIZAPP_FMNIST_DIR (or the Debian package's folder).
set -u
OUT=${1:?usage: gpu.sh OUT [STEP ...]}
shift
mkdir -p "$OUT"
STEPS=${*:-tests kernels fp32 fp32-formed fp32-eager memory fp16 bf16 profile batch batch-bf16 eval-rate eval-bundled eval-vitb class-maps ablation families graph-routes}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

step() { # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$OUT/log.txt"
    local t0=$SECONDS
    timeout "$limit" "$@" >>"$OUT/log.txt" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
}

vitb_job() { # a transformers ViT-B/16 (random weights, 1000 classes) saved as a user's folder, and 32 photos
    local work=$1
    $PY - "$work" <<'EOF'
import sys
from pathlib import Path

import numpy as np
import skimage.data as sd
import transformers
from PIL import Image

work = Path(sys.argv[1])
(work / "imgs").mkdir(parents=True, exist_ok=True)
transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)).save_pretrained(work / "vitb")
photos = [sd.astronaut(), sd.chelsea(), sd.coffee(), sd.rocket()]
for i in range(32):
    im = Image.fromarray(np.asarray(photos[i % 4])).convert("RGB")
    im = im.rotate(90 * (i // 4 % 4), expand=True)
    if i // 16:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    im.save(work / "imgs" / f"img{i:03d}.png")
EOF
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$OUT/log.txt" 2>&1
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))" \
    | tee -a "$OUT/log.txt"

step tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
# the fused attention kernels' launches (vizapp.fused_attention's tiles, chosen without a GPU) timed against torch's
# attention of the same layers: which launch the next tiles should be (into log.txt only)
step kernels 120 $PY -m benchmarks.kernel_resources --time
# memory is measured in fresh subprocesses (GPU_MEMORY=1), about 15 s each on a GPU machine: off by default
MEM=--no-memory
[ "${GPU_MEMORY:-0}" = 1 ] && MEM="--mem-repeats 1"
step fp32 150 $PY -m benchmarks.bench --device cuda --threads 4 --repeats 7 --large-repeats 5 $MEM \
    --out "$OUT/benchmarks-cuda.md"
# the same two models with CUDA graphs off (the eager path), in the same run, for the ratio graphs buy
step fp32-eager 60 env VIZAPP_CUDA_GRAPHS=0 $PY -m benchmarks.bench --device cuda --threads 4 --repeats 7 \
    --large-repeats 5 --no-memory --no-profile --models vit_base_patch16_224 vit_large_patch16_384 \
    --out "$OUT/benchmarks-cuda-eager.md"
# the three largest default models with the attention formed instead of the fused kernels (vizapp.fused_attention),
# in the same run: what the kernels change of analyze / bare (the fp32 step's table says whether they ran)
step fp32-formed 120 env VIZAPP_FUSED_ATTENTION=0 $PY -m benchmarks.bench --device cuda --threads 4 --repeats 7 \
    --large-repeats 5 --no-memory --no-profile --models vit_base_patch16_224 vit_large_patch16_384 \
    vit_large_patch14_reg4_dinov2@img_size=518 --out "$OUT/benchmarks-cuda-formed.md"
step memory 120 $PY -m benchmarks.bench --device cuda --threads 4 --repeats 3 --large-repeats 3 --mem-repeats 1 \
    --no-profile --models vit_large_patch16_384 --out "$OUT/benchmarks-cuda-memory.md"
step fp16 60 $PY -m benchmarks.bench --device cuda --dtype float16 --threads 4 --repeats 7 --large-repeats 5 $MEM \
    --no-profile --models vit_base_patch16_224 vit_large_patch16_384 --out "$OUT/benchmarks-cuda-fp16.md"
step bf16 60 $PY -m benchmarks.bench --device cuda --dtype bfloat16 --threads 4 --repeats 7 --large-repeats 5 $MEM \
    --no-profile --models vit_base_patch16_224 vit_large_patch16_384 vit_large_patch14_reg4_dinov2@img_size=518 \
    --out "$OUT/benchmarks-cuda-bf16.md"
# the batch API (issue 23): analyze of 16 and 64 images and the class maps of 16 against a bare batched forward
step batch 90 $PY -m benchmarks.batch --device cuda --threads 4 --repeats 5 --out "$OUT/benchmarks-batch-cuda.md"
step batch-bf16 90 $PY -m benchmarks.batch --device cuda --dtype bfloat16 --threads 4 --repeats 5 \
    --out "$OUT/benchmarks-batch-cuda-bf16.md"
# the evaluation's rate against the floor of the forwards its protocol needs (issue 23, item 5)
# (--torch-profile: the device's busy time against the wall time of one more run, and its kernels of most time)
step eval-rate 200 $PY -m benchmarks.evaluation --device cuda --threads 4 --images 16 \
    --models vit_base_patch16_224 vit_base_patch16_224@embed_dim=48,img_size=32 \
    --repeats 2 --profile 30 --torch-profile 25 --out "$OUT/benchmarks-evaluation-cuda.md"
step profile 90 $PY -m benchmarks.gpu_profile --model vit_base_patch16_224
step eval-bundled 60 $PY -m vizapp.evaluate.throughput --images 512 --method-images 8
case " $STEPS " in *" eval-vitb "*) vitb_job /tmp/vizapp-vitb >>"$OUT/log.txt" 2>&1 ;; esac
step eval-vitb 30 $PY -m vizapp.evaluate /tmp/vizapp-vitb/imgs --model /tmp/vizapp-vitb/vitb --methods "" --steps 0 \
    --out /tmp/vizapp-vitb/stats --overwrite
step eval-vitb 60 $PY -m vizapp.evaluate /tmp/vizapp-vitb/imgs --model /tmp/vizapp-vitb/vitb \
    --methods rollout,grad_rollout,relevance,attention,random --limit 8 --out /tmp/vizapp-vitb/methods --overwrite
step eval-vitb 30 $PY -m vizapp.evaluate /tmp/vizapp-vitb/imgs --model /tmp/vizapp-vitb/vitb --methods flow --steps 0 \
    --limit 4 --out /tmp/vizapp-vitb/flow --overwrite
step class-maps 45 $PY -m benchmarks.class_maps --device cuda --threads 4 --repeats 3 --out "$OUT/benchmarks-class-maps-cuda.md"
step ablation 40 $PY -m benchmarks.ablation_cost --device cuda --threads 4 --repeats 5
step families 120 $PY -m benchmarks.bench --families --device cuda --threads 4 --repeats 5 --no-memory --no-profile \
    --out "$OUT/benchmarks-families-cuda.md"
# a batch's class maps with every layer's attention kept in the autograd graph against formed again in the backward
# (the GPU's rule today): whether keeping it would be faster where it fits (rows into log.txt only)
step graph-routes 100 $PY -m benchmarks.graph_memory --device cuda --threads 4 --repeats 5 \
    --case vit_base_patch16_224:64 --case vit_large_patch16_384:8 --interleave vit_base_patch16_224:64 \
    --out /tmp/benchmarks-graph-memory-cuda.md
echo "done $(date +%T)" | tee -a "$OUT/steps.txt"
