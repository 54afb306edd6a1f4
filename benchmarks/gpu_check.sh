#!/bin/bash
# Device check for issue 10: fit report + real plugin-training steps of t5-large in bf16.
# Usage: bash benchmarks/gpu_check.sh OUTDIR [VARIANT [scan|runtimes]]  (default t5-large; t5-small
# for a quick try; "scan": only the scanned-vs-unrolled step ratio at VARIANT's widths, ~5 min;
# "runtimes": only the encoder's speedup table in bf16 on JAX (cuDNN attention), PyTorch and
# torch.compile, benchmarks/runtimes.py)

OUT=$1; V=${2:-t5-large}; SIZE=${V#t5-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import jax, flax, optax, orbax.checkpoint, transformers; print(jax.__version__, jax.devices(), flax.__version__, transformers.__version__)"
if [ "$3" = scan ]; then
  # The plugin train step with layers scanned vs unrolled, interleaved rounds, one process
  # (float32, i.e. TF32 matmuls); writes compile-<machine>-speed-VARIANT.{json,md} to OUT.
  timeout 420 python3 -m benchmarks.compile --speed-only --speed-variant $V --speed-batch 16 \
      --speed-repeats 6 --out $OUT 2>&1 | grep -v "^WARNING" | tail -12
  ls $OUT; exit
fi
if [ "$3" = runtimes ]; then
  # Writes runtimes-<machine>.{json,md} to OUT; ONNX Runtime is CPU-only here, so left out.
  timeout 540 python3 -m benchmarks.runtimes --variant $V --layers 12 --dtype bfloat16 \
      --attention cudnn --runtimes jax,torch,torch.compile --rounds 7 --out $OUT 2>&1 \
      | grep -v "^WARNING" | tail -20
  ls $OUT; exit
fi
# 1. The fit report (--dry_run: no weights) on this device, released pre-training batch.
python3 train.py --config=configs/plugin.py:stage=pretrain,size=$SIZE,ratio=4 --config.dtype=bfloat16 \
    --config.remat=full --workdir=$OUT/fit --dry_run 2>&1 | tail -20
cp $OUT/fit/fit.json $OUT/fit-$V.json
# 2. Step time, MFU, peak memory: plugin step vs full fine-tuning step, bf16, released batch.
timeout 240 python3 -m benchmarks.train_step --variant $V --batch 64 --input-length 224 \
    --target-length 32 --dtype bfloat16 --remat none --repeats 10 --out $OUT 2>&1 | tail -12
# 3. A few real steps of train.py on a random HF backbone of these sizes (data, loop, checkpoint).
python3 - <<PY
import transformers, torch
from variator_jax.t5 import T5Config
hf = transformers.T5Config(**T5Config.variant("$V").to_hf())
torch.manual_seed(0)
transformers.T5ForConditionalGeneration(hf).save_pretrained("/tmp/backbone")
print("saved random", "$V")
PY
timeout 180 python3 train.py --config=configs/plugin.py:stage=pretrain,size=$SIZE,ratio=4 \
    --config.backbone=/tmp/backbone --config.tokenizer=byte --config.dtype=bfloat16 \
    --config.total_steps=100 --config.log_every=25 --config.checkpoint_every=100 \
    --workdir=/tmp/run 2>&1 | tail -15
cp /tmp/run/metrics.jsonl $OUT/train-$V-metrics.jsonl 2>/dev/null
ls $OUT
