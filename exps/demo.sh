#!/usr/bin/env bash
# The whole pipeline on a CPU in a few minutes, with the tiny tokenizer bundle and a tiny model:
#
#   bash .ci/setup.sh && . .venv/bin/activate && bash exps/demo.sh
#   OUT=/tmp/demo STEPS=40 bash exps/demo.sh          # another folder, a shorter run
#
# 1. synthetic data: coloured shapes (128x128; SIZES adds other aspect ratios), as captioning and text-to-image
#    conversations (Lumina JSON), and N_FRESH fresh pictures (another seed) the model never trains on
# 2. the tiny tokenizer bundle, its VQGAN fitted to the demo's pictures (make_tiny_bundle.py --fit_images:
#    real runs use Meta's Chameleon VQGAN instead), and a tiny HF-format Chameleon checkpoint that fits it
# 3. pre-tokenization with 2 ranks (two processes) per data set, concat_record, and a data_config YAML
#    that mixes the two record sets with a ratio
# 4. training with 2-process FSDP on CPU (torchrun, gloo): the first half, stop, then resume from the
#    checkpoint for the second half; the demo fails unless the loss falls below LOSS_TARGET
#    training samples every SAMPLE_EVERY steps into train/samples/step{N}/ (contact_sheet.png)
# 5. loss curves per data type (captions vs text-to-image) with the learning rate, from metrics.jsonl
#    (matplotlib), one inspected item, the HF export, and where everything is
# 6. the model draws every colour x shape x background prompt (cfg 3, fresh seed) and captions the fresh
#    pictures (greedy); exps/score_demo.py scores both and the demo fails below the floors (MIN_*)
#
# Everything goes under $OUT (default output/demo). Running it again is safe: finished stages are
# skipped or redone to the same result (pre-tokenization and training resume rather than repeat).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-output/demo}
N_IMAGES=${N_IMAGES:-256}       # images in the synthetic set (each gives a caption and a t2i item)
N_FRESH=${N_FRESH:-24}          # fresh pictures (another seed) the trained model is asked to caption
SIZES=${SIZES:-128x128}         # picture sizes the data and the fresh pictures are drawn at (any of make_demo_data's
                                # SIZES, e.g. 128x128,192x128,128x192,256x128: 4x the pictures to learn, see README)
FIT_STEPS=${FIT_STEPS:-1000}    # steps fitting the bundle's VQGAN to the demo's pictures
FIT_THREADS=${FIT_THREADS:-2}   # torch threads of the fit (the other stages run one per process)
TARGET_SIZE=${TARGET_SIZE:-128} # image area budget for pre-tokenization (128 -> up to 8x8 codes)
BATCH=${BATCH:-16}              # items per rank per step (a global batch of 32 with 2 ranks)
EPOCHS=${EPOCHS:-4}             # the lr schedule spans this many epochs (40 steps each: (256 + 4 * 256) items / 32)
STEPS=${STEPS:-160}             # optimizer steps in all; the run stops at STEPS/2 and resumes
HIDDEN=${HIDDEN:-192}           # tiny model: hidden size, layers, heads
LAYERS=${LAYERS:-3}
HEADS=${HEADS:-4}
LR=${LR:-3e-3}                  # peak learning rate (cosine to LR/10)
T2I_RATIO=${T2I_RATIO:-4.0}     # text-to-image items per epoch, per caption item (data.yaml ratio): drawing
                                # 64 codes takes more learning than naming three words
SAMPLE_EVERY=${SAMPLE_EVERY:-60} # training samples (4 prompts) every this many steps, into train/samples/
LOSS_TARGET=${LOSS_TARGET:-4.0} # the demo fails unless the mean loss of the last 5 logged steps is below this
# floors of the scores (fractions): the demo fails below them; 0 reports a score without failing
MIN_COLOUR=${MIN_COLOUR:-0.90} MIN_SHAPE=${MIN_SHAPE:-0.75} MIN_BACKGROUND=${MIN_BACKGROUND:-0.90}
MIN_CAPTIONS=${MIN_CAPTIONS:-0.85}
NPROC=${NPROC:-2}               # training processes (torchrun, gloo on CPU)
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
mkdir -p "$OUT"

say "1/6 synthetic data in $OUT/data, fresh pictures in $OUT/fresh"
$PYTHON exps/make_demo_data.py --out "$OUT/data" --n "$N_IMAGES" --seed 0 --sizes "$SIZES"
$PYTHON exps/make_demo_data.py --out "$OUT/fresh" --n "$N_FRESH" --seed 1 --sizes "$SIZES"

say "2/6 tiny tokenizer bundle, its VQGAN fitted to the demo's pictures; tiny HF-format Chameleon model"
# the fit is seeded; a finished one (same images and steps) is kept when the demo runs again
fit_stamp="images=$N_IMAGES sizes=$SIZES steps=$FIT_STEPS"
if [ "$(cat "$OUT/bundle/fit.stamp" 2>/dev/null)" != "$fit_stamp" ]; then
  OMP_NUM_THREADS=$FIT_THREADS $PYTHON model/make_tiny_bundle.py --out "$OUT/bundle" --seed 0 \
    --fit_images "$OUT/data/images" --fit_steps "$FIT_STEPS"  # the fit runs alone: all its threads
  echo "$fit_stamp" > "$OUT/bundle/fit.stamp"
fi
[ -f "$OUT/init_model/config.json" ] ||
  $PYTHON model/make_tiny_model.py --tokenizer_dir "$OUT/bundle" --out "$OUT/init_model" \
    --hidden_size "$HIDDEN" --num_layers "$LAYERS" --num_heads "$HEADS" --seed 0

say "3/6 pre-tokenize (2 ranks per data set), concat, data config"
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
cat > "$OUT/data.yaml" <<EOF
# Two record sets; a global batch holds one type. ratio draws int(len*ratio) items per epoch.
META:
  - path: tokens/caption/record.json
    type: caption
    ratio: 1.0
  - path: tokens/t2i/record.json
    type: t2i
    ratio: $T2I_RATIO
EOF
echo "wrote $OUT/data.yaml"

# training samples: four prompts, drawn every SAMPLE_EVERY steps, as the demo's t2i data asks for pictures
printf '%s\n' "A red circle on a white background." "A blue square on a black background." \
  "A yellow triangle on a black background." "A green diamond on a white background." > "$OUT/sample_prompts.txt"
min_lr=$($PYTHON -c "print(float('$LR') / 10)")
# --disable_length_clustering: the demo's items come in a few lengths, so batches of alike lengths would each
# hold copies of a few pictures, and the model would learn them in turn (bench/RESULTS.md: 10x the loss)
train() {  # $1 = --max_steps for this leg
  torchrun --standalone --nproc_per_node "$NPROC" finetune_solver.py \
    --init_from "$OUT/init_model" --data_config "$OUT/data.yaml" --output_dir "$OUT/train" \
    --precision fp32 --batch_size "$BATCH" --accum_iter 1 --epochs "$EPOCHS" --max_steps "$1" \
    --lr "$LR" --min_lr "$min_lr" --warmup_epochs 0.5 --wd 0.0 --clip_grad 1.0 --max_seq_len 512 \
    --num_workers 0 --no_pin_mem --save_iteration_interval 30 --ckpt_max_keep 2 \
    --log_every 2 --unmask_image_logits --no_export_hf --seed 0 --disable_length_clustering \
    --sample_prompts "$OUT/sample_prompts.txt" --sample_every "$SAMPLE_EVERY" --sample_tokenizer_dir "$OUT/bundle" \
    --sample_resolution 128x128 --sample_cfg 3.0 --sample_template "Draw this: {prompt}"
}
say "4/6 train with $NPROC-process FSDP on CPU: steps 1..$((STEPS / 2)), then resume to $STEPS"
train $((STEPS / 2))
echo "-- stopped at step $((STEPS / 2)); resuming from the newest checkpoint:"
ls -d "$OUT"/train/epoch* | sed 's/^/   /'
train "$STEPS"

say "5/6 loss curve, one inspected item, HF export"
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
  data/            synthetic images and the two Lumina JSON files;   fresh/  pictures never trained on
  bundle/          tiny tokenizer bundle, VQGAN fitted to data/images;   init_model/  tiny HF Chameleon
  tokens/          per-rank shards, records, errors; record.json + record.json.index/ per data set
  data.yaml        the data config (caption ratio 1.0, t2i ratio $T2I_RATIO)
  train/           metrics.jsonl, common.log, rank-N.log, checkpoints $(ls -d "$OUT"/train/epoch* | xargs -n1 basename | tr '\n' ' ')
  train/samples/   step{N}/contact_sheet.png: the sample prompts drawn as training went on
  loss.png         loss per type and lr;   inspect/  the images of item 0 decoded from its tokens
  hf_model/        the trained model, loadable with ChameleonForConditionalGeneration.from_pretrained

Mean loss of the last 5 logged steps: $final (target: below $LOSS_TARGET)
EOF
$PYTHON -c "import sys; sys.exit(0 if float('$final') < float('$LOSS_TARGET') else 1)" ||
  { echo "loss $final did not fall below $LOSS_TARGET" >&2; exit 1; }

say "6/6 the trained model draws every prompt and captions the fresh pictures; scores"
$PYTHON - "$OUT/gen_prompts.txt" <<'EOF_PROMPTS'
import sys
sys.path.insert(0, "exps")
from make_demo_data import BACKGROUNDS, COLOURS, SHAPES, ShapeSpec
with open(sys.argv[1], "w") as f:  # every colour x shape x background, in the demo's caption words
    for c in sorted(COLOURS):
        for s in SHAPES:
            for b in sorted(BACKGROUNDS):
                f.write(ShapeSpec(c, s, b, (128, 128)).caption + "\n")
EOF_PROMPTS
# the fresh pictures' questions, without their answers (the answers stay in fresh/caption.json for the scorer)
$PYTHON -c "import json, sys; items = json.load(open(sys.argv[1])); [i['conversations'][-1].update(value=None) \
for i in items]; json.dump(items, open(sys.argv[2], 'w'))" "$OUT/fresh/caption.json" "$OUT/fresh/questions.json"
rm -rf "$OUT/generated"
# the demo's text-to-image items read "Draw this: <caption>"; 128x128 is a crop size of TARGET_SIZE 128
$PYTHON generate.py --model "$OUT/hf_model" --tokenizer_dir "$OUT/bundle" --prompts_file "$OUT/gen_prompts.txt" \
  --template "Draw this: {prompt}" --resolution 128x128 --cfg 3.0 --seed 1 --precision fp32 --device cpu \
  --batch_size 8 --out "$OUT/generated/images" > /dev/null
$PYTHON generate.py --model "$OUT/hf_model" --tokenizer_dir "$OUT/bundle" --conversations "$OUT/fresh/questions.json" \
  --target_size "$TARGET_SIZE" --cfg 1.0 --greedy --max_new_tokens 32 --precision fp32 --device cpu \
  --batch_size 8 --out "$OUT/generated/caption" > /dev/null
cat <<EOF_DONE
  generated/images/   one picture per prompt of gen_prompts.txt; contact_sheet.png shows each with its prompt
  generated/caption/  generations.jsonl: the model's captions of fresh/images/ (true ones in fresh/caption.json)
  scores.json         the scorer's verdict per picture and caption
EOF_DONE
$PYTHON exps/score_demo.py --t2i "$OUT/generated/images" --captions "$OUT/generated/caption" \
  --truth "$OUT/fresh/caption.json" --out "$OUT/scores.json" --min_colour "$MIN_COLOUR" --min_shape "$MIN_SHAPE" \
  --min_background "$MIN_BACKGROUND" --min_captions "$MIN_CAPTIONS"
