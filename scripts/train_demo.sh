#!/usr/bin/env bash
# Trains the built-in demo model (sdcli/demo) from scratch with sdcli's own commands, then writes it into the
# package as fp16 safetensors with the training summaries and the README's grid and figures.
#
#   bash scripts/train_demo.sh     # on this project's 2-core CPU: about 25 + 15 min (VAE), 50 + 35 min (UNet)
#   WORK=/big/disk bash scripts/train_demo.sh
#
# Rerunning it after an interruption resumes each run from its latest checkpoint; a finished run is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/demo}
SUMMARY=scripts/demo  # metrics summaries, the grid and the evaluation, kept in the repository

# resume a run folder that has checkpoints; skip it once it reached its last step
resume() { if [ -d "$1/checkpoints" ]; then echo --resume; fi; }
finished() { [ -f "$1/metrics.jsonl" ] && grep -q "\"step\": $2," "$1/metrics.jsonl"; }

VALIDATION=(--validation-prompts "a large red circle on a blue background"
            --validation-prompts "a small yellow square on a black background in the top left"
            --validation-prompts "a large white triangle on a green background in the bottom right"
            --validation-prompts "a small purple circle on a orange background in the center")
POSITIONS=("${VALIDATION[@]:2:4}")  # the two prompts with a corner (the later runs' validation rows)

# 1. data: 20,000 64x64 pictures of the grammar, from seed 0
[ -f "$WORK/shapes/metadata.jsonl" ] || python scripts/make_shapes.py "$WORK/shapes" --n 20000 --seed 0 --size 64

# 2. the autoencoder: 4x downsampling, 4 latent channels (64x64 images -> 16x16x4 latents); L1 + KL, no GAN
finished "$WORK/vae" 2000 || sdcli train-vae "$WORK/shapes" --out "$WORK/vae" $(resume "$WORK/vae") \
    --arch tiny --resolution 64 --kl-weight 1e-6 --disc-start 1000000 \
    --batch-size 16 --lr 5e-4 --warmup-steps 100 --ema-decay 0.999 --max-steps 2000 --save-every 500 --seed 0

# 3. a sharper decoder: the same latent space (the encoder is frozen), the decoder trained on further
finished "$WORK/vae-decoder" 1500 || sdcli train-vae "$WORK/shapes" --out "$WORK/vae-decoder" \
    $(resume "$WORK/vae-decoder") --init "$WORK/vae" --decoder-only --resolution 64 --kl-weight 1e-6 \
    --disc-start 1000000 --batch-size 16 --lr 5e-4 --warmup-steps 50 --ema-decay 0.999 --max-steps 1500 \
    --save-every 500 --seed 1

# stop a run once its checkpoint at step $2 exists (the model folder is written before the checkpoint, so it
# is complete then); kill -KILL, not Ctrl-C, which would save a later step
train_until() {
    local run=$1 step; step=$(printf '%07d' "$2"); shift 2
    [ -f "$run/checkpoints/step-$step.pt" ] && return
    "$@" &
    local pid=$!
    until [ -f "$run/checkpoints/step-$step.pt" ]; do
        kill -0 $pid 2>/dev/null || { echo "train_demo.sh: $run ended before step $step" >&2; exit 1; }
        sleep 1
    done
    kill -KILL $pid
    wait $pid || true
}

# 4. the UNet and a new CLIP text encoder (real CLIP vocabulary), trained together on cached latents with
#    eps-prediction and Min-SNR weighting. Planned for 12000 steps, the run was stopped after its step-6000
#    save: by then it drew colours and shapes right but ignored the position words.
train_until "$WORK/unet" 6000 sdcli train-unet "$WORK/shapes" --out "$WORK/unet" --vae "$WORK/vae-decoder" \
    $(resume "$WORK/unet") --arch tiny --layers-per-block 2 --text-encoder-config tiny --resolution 64 \
    --cache-latents --snr-gamma 5 --noise-offset 0.05 --caption-dropout 0.1 \
    --batch-size 32 --lr 1e-3 --warmup-steps 200 --ema-decay 0.999 --max-steps 12000 --save-every 1000 \
    --seed 0 "${VALIDATION[@]}"

# 5. to v-prediction on a noisier schedule (--beta-end 0.02: 0.023% of the image left at the last step
#    instead of 0.47%), all timesteps; stopped after its step-1500 save. Positions still ignored.
train_until "$WORK/unet-p" 1500 sdcli train-unet "$WORK/shapes" --out "$WORK/unet-p" --init "$WORK/unet" \
    $(resume "$WORK/unet-p") --train-text-encoder --prediction v --beta-end 0.02 --resolution 64 \
    --cache-latents --noise-offset 0.05 --caption-dropout 0.1 --batch-size 32 --lr 5e-4 --warmup-steps 100 \
    --ema-decay 0.999 --max-steps 4000 --save-every 500 --seed 1 "${POSITIONS[@]}"

# 6. the high noise levels only (t >= 700, where the layout is decided) at a higher rate: the model starts to
#    follow the position words (top and bottom first), while its low-noise steps, untrained, degrade
finished "$WORK/unet-hi" 800 || sdcli train-unet "$WORK/shapes" --out "$WORK/unet-hi" --init "$WORK/unet-p" \
    $(resume "$WORK/unet-hi") --train-text-encoder --min-timestep 700 --resolution 64 --cache-latents \
    --noise-offset 0.05 --caption-dropout 0.1 --batch-size 32 --lr 1e-3 --warmup-steps 50 --ema-decay 0.99 \
    --max-steps 800 --save-every 400 --seed 2 "${POSITIONS[@]}"

# 7. more of the same: top, bottom, left and right now (the low-noise steps still untrained)
finished "$WORK/unet-hi2" 1500 || sdcli train-unet "$WORK/shapes" --out "$WORK/unet-hi2" --init "$WORK/unet-hi" \
    $(resume "$WORK/unet-hi2") --train-text-encoder --min-timestep 700 --resolution 64 --cache-latents \
    --noise-offset 0.05 --caption-dropout 0.1 --batch-size 32 --lr 1e-3 --warmup-steps 50 --ema-decay 0.99 \
    --max-steps 1500 --save-every 500 --seed 3 "${POSITIONS[@]}"

# 8. all timesteps again at a lower rate, which restores the low-noise steps (clean edges and colours)
finished "$WORK/unet-fix" 1000 || sdcli train-unet "$WORK/shapes" --out "$WORK/unet-fix" --init "$WORK/unet-hi2" \
    $(resume "$WORK/unet-fix") --train-text-encoder --resolution 64 --cache-latents --noise-offset 0.05 \
    --caption-dropout 0.1 --batch-size 32 --lr 3e-4 --warmup-steps 50 --ema-decay 0.999 --max-steps 1000 \
    --save-every 500 --seed 4 "${POSITIONS[@]}"

# 9. into the package: fp16 diffusers folder (EMA weights)
rm -rf sdcli/demo
sdcli export "$WORK/unet-fix" sdcli/demo

# 10. what the README shows: the training summaries (every 100th step, the validation rows and the last
#    row of each metrics.jsonl), the grid and the evaluation
mkdir -p "$SUMMARY"
for run in vae vae-decoder unet unet-p unet-hi unet-hi2 unet-fix; do
    { awk '/"val_/ || NR % 100 == 1' "$WORK/$run/metrics.jsonl"; tail -n 1 "$WORK/$run/metrics.jsonl"; } \
        > "$SUMMARY/$run-metrics.jsonl"
done
python scripts/demo_grid.py "$SUMMARY/grid.png"
python scripts/eval_demo.py --prompts 60 --seeds 3 | tee "$SUMMARY/eval.txt"
