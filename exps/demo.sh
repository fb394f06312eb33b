#!/usr/bin/env bash
# The whole pipeline on a CPU in a few minutes, with the tiny tokenizer bundle and a tiny model:
#
#   bash .ci/setup.sh && . .venv/bin/activate && bash exps/demo.sh
#   OUT=/tmp/demo STEPS=40 bash exps/demo.sh          # another folder, a shorter run
#
# 1. synthetic data: coloured shapes at several aspect ratios, as captioning and text-to-image
#    conversations (Lumina JSON)
# 2. the tiny tokenizer bundle and a tiny HF-format Chameleon checkpoint that fits it
# 3. pre-tokenization with 2 ranks (two processes) per data set, concat_record, and a data_config YAML
#    that mixes the two record sets with a ratio
# 4. training with 2-process FSDP on CPU (torchrun, gloo): the first half, stop, then resume from the
#    checkpoint for the second half; the demo fails unless the loss falls below LOSS_TARGET
# 5. loss curves per data type (captions vs text-to-image) with the learning rate, from metrics.jsonl
#    (matplotlib), one inspected item, the HF export, and where everything is
#
# Everything goes under $OUT (default output/demo). Running it again is safe: finished stages are
# skipped or redone to the same result (pre-tokenization and training resume rather than repeat).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-output/demo}
N_IMAGES=${N_IMAGES:-64}        # images in the synthetic set (each gives a caption and a t2i item)
TARGET_SIZE=${TARGET_SIZE:-128} # image area budget for pre-tokenization (128 -> up to 8x8 codes)
EPOCHS=${EPOCHS:-10}            # the lr schedule spans this many epochs (12 steps each with 64 images)
STEPS=${STEPS:-120}             # optimizer steps in all; the run stops at STEPS/2 and resumes
LOSS_TARGET=${LOSS_TARGET:-4.0} # the demo fails unless the mean loss of the last 5 logged steps is below this
NPROC=${NPROC:-2}               # training processes (torchrun, gloo on CPU)
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
mkdir -p "$OUT"

say "1/5 synthetic data in $OUT/data"
$PYTHON exps/make_demo_data.py --out "$OUT/data" --n "$N_IMAGES" --seed 0

say "2/5 tiny tokenizer bundle and tiny HF-format Chameleon model"
$PYTHON model/make_tiny_bundle.py --out "$OUT/bundle" --seed 0
[ -f "$OUT/init_model/config.json" ] ||
  $PYTHON model/make_tiny_model.py --tokenizer_dir "$OUT/bundle" --out "$OUT/init_model" \
    --hidden_size 128 --num_layers 2 --num_heads 4 --seed 0

say "3/5 pre-tokenize (2 ranks per data set), concat, data config"
mkdir -p "$OUT/tokens"
for name in caption t2i; do
  pids=()
  for rank in 0 1; do
    $PYTHON pre_tokenize/pre_tokenize.py --splits 2 --rank $rank \
      --in_filename "$OUT/data/$name.json" --out_dir "$OUT/tokens/$name" \
      --target_size "$TARGET_SIZE" --tokenizer_dir "$OUT/bundle" --device cpu \
      --num_workers 0 --no_progress &> "$OUT/tokens/$name.rank$rank.log" & pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || { cat "$OUT/tokens/$name".rank*.log; exit 1; }; done
  tail -n 3 "$OUT/tokens/$name.rank0.log"
  $PYTHON pre_tokenize/concat_record.py --sub_record_dir "$OUT/tokens/$name" \
    --save_path "$OUT/tokens/$name/record.json"
done
cat > "$OUT/data.yaml" <<'EOF'
# Two record sets; a global batch holds one type. ratio draws int(len*ratio) items per epoch.
META:
  - path: tokens/caption/record.json
    type: caption
    ratio: 1.0
  - path: tokens/t2i/record.json
    type: t2i
    ratio: 0.5
EOF
echo "wrote $OUT/data.yaml"

train() {  # $1 = --max_steps for this leg
  torchrun --standalone --nproc_per_node "$NPROC" finetune_solver.py \
    --init_from "$OUT/init_model" --data_config "$OUT/data.yaml" --output_dir "$OUT/train" \
    --precision fp32 --batch_size 4 --accum_iter 1 --epochs "$EPOCHS" --max_steps "$1" \
    --lr 3e-3 --min_lr 3e-4 --warmup_epochs 0.5 --wd 0.0 --clip_grad 1.0 --max_seq_len 512 \
    --num_workers 0 --no_pin_mem --save_iteration_interval 30 --ckpt_max_keep 2 \
    --log_every 2 --unmask_image_logits --no_export_hf --seed 0
}
say "4/5 train with $NPROC-process FSDP on CPU: steps 1..$((STEPS / 2)), then resume to $STEPS"
train $((STEPS / 2))
echo "-- stopped at step $((STEPS / 2)); resuming from the newest checkpoint:"
ls -d "$OUT"/train/epoch* | sed 's/^/   /'
train "$STEPS"

say "5/5 loss curve, one inspected item, HF export"
$PYTHON exps/plot_loss.py "$OUT/train/metrics.jsonl" --labels demo --out "$OUT/loss.png"  # a curve per type
$PYTHON pre_tokenize/inspect_record.py "$OUT/tokens/caption/record.json" --ids 0 \
  --tokenizer_dir "$OUT/bundle" --render "$OUT/inspect"
last_ckpt=$(ls -d "$OUT"/train/epoch* | sort -V | tail -n 1)
$PYTHON model/export_hf.py --ckpt "$last_ckpt" --out "$OUT/hf_model"

final=$($PYTHON - "$OUT/train/metrics.jsonl" <<'EOF'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    if line.strip():
        r = json.loads(line); rows[r["step"]] = r["loss"]
last = [rows[s] for s in sorted(rows)][-5:]
print(f"{sum(last) / len(last):.3f}")
EOF
)
cat <<EOF

Done. Everything is under $OUT:
  data/            synthetic images and the two Lumina JSON files
  bundle/          tiny tokenizer bundle;   init_model/  tiny HF Chameleon it was trained from
  tokens/          per-rank shards, records, errors; record.json + record.json.index/ per data set
  data.yaml        the data config (caption ratio 1.0, t2i ratio 0.5)
  train/           metrics.jsonl, common.log, rank-N.log, checkpoints $(ls -d "$OUT"/train/epoch* | xargs -n1 basename | tr '\n' ' ')
  loss.png         loss per type and lr;   inspect/  the images of item 0 decoded from its tokens
  hf_model/        the trained model, loadable with ChameleonForConditionalGeneration.from_pretrained

Mean loss of the last 5 logged steps: $final (target: below $LOSS_TARGET)
EOF
$PYTHON -c "import sys; sys.exit(0 if float('$final') < float('$LOSS_TARGET') else 1)" ||
  { echo "loss $final did not fall below $LOSS_TARGET" >&2; exit 1; }

say "generate: two images and one caption from the trained model (generate.py)"
printf 'A red circle on a white background.\nA blue square on a black background.\n' > "$OUT/gen_prompts.txt"
cat > "$OUT/gen_caption.json" <<'EOF_JSON'
[{"conversations": [{"from": "human", "value": "<|image|>What is in this picture?"}, {"from": "gpt", "value": null}],
  "image": ["data/images/00000.png"]}]
EOF_JSON
# the demo's text-to-image items read "Draw this: <caption>"; 128x128 is a crop size of TARGET_SIZE 128
$PYTHON generate.py --model "$OUT/hf_model" --tokenizer_dir "$OUT/bundle" --prompts_file "$OUT/gen_prompts.txt" \
  --template "Draw this: {prompt}" --resolution 128x128 --cfg 3.0 --seed 0 --precision fp32 --device cpu \
  --out "$OUT/generated/images" > /dev/null
$PYTHON generate.py --model "$OUT/hf_model" --tokenizer_dir "$OUT/bundle" --conversations "$OUT/gen_caption.json" \
  --target_size "$TARGET_SIZE" --cfg 1.0 --greedy --max_new_tokens 32 --precision fp32 --device cpu \
  --out "$OUT/generated/caption" > /dev/null
caption=$($PYTHON -c "import json, sys; print(json.loads(open(sys.argv[1]).readline())['text'])" \
  "$OUT/generated/caption/generations.jsonl")
cat <<EOF_DONE
  generated/images/   00000_0.png, 00001_0.png (prompts in gen_prompts.txt), contact_sheet.png, generations.jsonl
  generated/caption/  the answer to data/images/00000.png: "$caption" (expected: $($PYTHON -c "import json; \
print(json.load(open('$OUT/data/caption.json'))[0]['conversations'][1]['value'])"))
EOF_DONE
