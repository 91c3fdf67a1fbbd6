#!/usr/bin/env bash
# The main job on a fresh machine: set-up, then a complete DreamBooth-LoRA run on the tiny SDXL on CPU:
# tiny base weights + a procedurally drawn subject -> class-image sampling -> training -> LoRA -> a sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT_DIR:-runs/quickstart}
$PY tools/make_tiny_model.py --config configs/inference/sd_xl_tiny.yaml --weight_ms checkpoints/sd_xl_tiny_ms.ckpt \
  --subject_dir "$OUT/subject"
$PY train_dreambooth.py \
  --config configs/training/sd_xl_tiny_dreambooth_lora_cpu.yaml \
  --weight checkpoints/sd_xl_tiny_ms.ckpt \
  --instance_data_path "$OUT/subject" \
  --instance_prompt "a photo of sks toy" \
  --class_data_path "$OUT/class_toy" \
  --class_prompt "a photo of toy" \
  --save_path "$OUT/train" \
  --ms_mode 0 \
  --device_target CPU
# Render the subject with the trained LoRA (the last checkpoint: total_step of the tiny training config).
LORA=$(ls "$OUT"/train/*_lora.ckpt | sort -V | tail -n 1)
$PY demo/sampling_without_streamlit.py --task txt2img --config configs/inference/sd_xl_tiny.yaml \
  --weight "checkpoints/sd_xl_tiny_ms.ckpt,$LORA" \
  --prompt "a photo of sks toy" --width 64 --height 64 --sample_step 10 --guidance_scale 5.0 \
  --seed 42 --num_images 4 --num_cols 2 --save_path "$OUT/samples" --ms_mode 0 --device_target CPU
echo "quick-start finished: see $OUT/train (LoRA *_lora.ckpt, loss.png, loss.csv, sample_final.png) and $OUT/samples"
