#!/usr/bin/env bash
# Train the ShapesWorld model family and the English-pivot experiment with the public commands.
#
#   scripts/shapes_family.sh            # everything: data, family (rows a, b), ablation (row c), eval
#
# Independent stages run side by side, one core each (OMP_NUM_THREADS=1). Outputs: data/shapes,
# runs/shapes/*, runs/shapes/eval-*.json. The shipped default is row b (chat, evidence first, llm_learning_rate,
# continued on three seeds' data, then on v3's varied data and v3.1's reading-order descriptions) + paint-zhplus;
# package it with
#   python scripts/package_default.py runs/shapes/chat-reading-settle/final runs/shapes/paint-zhplus/final
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
C=configs/shapes
EN_ONLY='data.train=["../../data/shapes/multimodal/instruct_en.jsonl"]'

viscpm data shapes --out data/shapes --seed 0

# 1. the bilingual LLMs (text only: d=128 for paint and the pivot rows, d=256 for the packaged
#    chat model) and the image autoencoder
viscpm train lm --config $C/lm.toml &
viscpm train vae --config $C/vae.toml &
wait
viscpm train lm --config $C/lm-256.toml &

# 2. paint (English captions, frozen bilingual LLM) beside the chat stages: recipe v2's model is
#    this run continued twice at a lower learning rate; the packaged one is paint-zhplus below
( viscpm train paint-xattn --config $C/paint.toml
  viscpm train paint-xattn --config $C/paint.toml --set model.init=../../runs/shapes/paint/final \
      --set train.output_dir=../../runs/shapes/paint-long --set train.max_steps=2500 --set train.learning_rate=5e-4
  viscpm train paint-xattn --config $C/paint.toml --set model.init=../../runs/shapes/paint-long/final \
      --set train.output_dir=../../runs/shapes/paint-longer --set train.max_steps=3000 --set train.learning_rate=5e-4
  # recipe v3: a wider UNet with Min-SNR loss weights in one run, then its Chinese-plus variant
  # (+ the small translated-Chinese caption set)
  viscpm train paint-xattn --config $C/paint-wide.toml
  viscpm train paint-xattn --config $C/paint-zhplus.toml ) &
PAINT=$!
viscpm train chat-align --config $C/chat-align.toml
# row b: English dialogues + the small translated-Chinese set
viscpm train chat-sft --config $C/chat-sft.toml
# row b continued for another 2,500 steps (recipe v2's packaged chat model)
viscpm train chat-sft --config $C/chat-sft.toml --set model.init=../../runs/shapes/chat-sft/final \
    --set train.output_dir=../../runs/shapes/chat-sft-long
# row a: English dialogues only
viscpm train chat-sft --config $C/chat-sft.toml --set "$EN_ONLY" --set train.output_dir=../../runs/shapes/chat-sft-en
wait $PAINT
wait  # lm-256

# rows a and b over the larger LLM (row b's recipe, refined below, gives the packaged chat model)
viscpm train chat-align --config $C/chat-align-256.toml
viscpm train chat-sft --config $C/chat-sft.toml --set model.init=../../runs/shapes/chat-align-256/final \
    --set train.output_dir=../../runs/shapes/chat-sft-256
viscpm train chat-sft --config $C/chat-sft.toml --set "$EN_ONLY" --set model.init=../../runs/shapes/chat-align-256/final \
    --set train.output_dir=../../runs/shapes/chat-sft-en-256

# row c (ablation): an English-only LLM, then the same multimodal data as row a
viscpm train lm --config $C/lm.toml --set data.train=../../data/shapes/text/corpus_en.jsonl --set train.output_dir=../../runs/shapes/lm-en
viscpm train chat-align --config $C/chat-align.toml --set model.llm_init=../../runs/shapes/lm-en/final \
    --set train.output_dir=../../runs/shapes/chat-align-lm-en
viscpm train chat-sft --config $C/chat-sft.toml --set "$EN_ONLY" --set model.init=../../runs/shapes/chat-align-lm-en/final \
    --set train.output_dir=../../runs/shapes/chat-sft-lm-en

# yes/no answers evidence first ("It is big. Yes.") in the instruction dialogues only; the text
# corpus and vocabulary are unchanged, so the LLM and chat-align-256 carry over (no gain at this rate: README)
viscpm data shapes --out data/shapes-evidence --seed 0 --evidence-first
viscpm train chat-sft --config $C/chat-sft.toml --set model.init=../../runs/shapes/chat-align-256/final \
    --set 'data.train=["../../data/shapes-evidence/multimodal/instruct_en.jsonl", "../../data/shapes-evidence/multimodal/instruct_zh.jsonl"]' \
    --set train.output_dir=../../runs/shapes/chat-sft-256-ev

# the LLM's unit-scale weights at 10x the rate of the vision side (README: Training); row b's
# dialogues, then the evidence-first ones: the packaged chat model
viscpm train chat-sft --config $C/chat-sft.toml --set model.init=../../runs/shapes/chat-align-256/final \
    --set train.llm_learning_rate=5e-3 --set train.output_dir=../../runs/shapes/chat-sft-256-llmlr
viscpm train chat-sft --config $C/chat-sft.toml --set model.init=../../runs/shapes/chat-align-256/final \
    --set 'data.train=["../../data/shapes-evidence/multimodal/instruct_en.jsonl", "../../data/shapes-evidence/multimodal/instruct_zh.jsonl"]' \
    --set train.llm_learning_rate=5e-3 --set train.output_dir=../../runs/shapes/chat-sft-256-ev-llmlr

# two more corpora under other seeds whose training images avoid seed 0's evaluation scenes (same
# vocabulary): three times the images for a continuation of the chat model above (packaged) and of
# paint-zhplus (not packaged: README)
viscpm data shapes --out data/shapes-evidence-s1 --seed 1 --evidence-first --avoid-eval-of data/shapes
viscpm data shapes --out data/shapes-evidence-s2 --seed 2 --evidence-first --avoid-eval-of data/shapes
D=../../data/shapes-evidence
viscpm train chat-sft --config $C/chat-sft.toml --set model.init=../../runs/shapes/chat-sft-256-ev-llmlr/final \
    --set "data.train=[\"$D/multimodal/instruct_en.jsonl\", \"$D/multimodal/instruct_zh.jsonl\", \"$D-s1/multimodal/instruct_en.jsonl\", \"$D-s1/multimodal/instruct_zh.jsonl\", \"$D-s2/multimodal/instruct_en.jsonl\", \"$D-s2/multimodal/instruct_zh.jsonl\"]" \
    --set train.llm_learning_rate=5e-3 --set train.seed=1 --set train.output_dir=../../runs/shapes/chat-sft-256-ev-llmlr-more
# a third round on five seeds' dialogues (80 k images): no further gain (README)
viscpm data shapes --out data/shapes-evidence-s3 --seed 3 --evidence-first --avoid-eval-of data/shapes
viscpm data shapes --out data/shapes-evidence-s4 --seed 4 --evidence-first --avoid-eval-of data/shapes
FIVE=$(for s in "" -s1 -s2 -s3 -s4; do printf '"%s/multimodal/instruct_en.jsonl", "%s/multimodal/instruct_zh.jsonl", ' "$D$s" "$D$s"; done)
viscpm train chat-sft --config $C/chat-sft.toml --set model.init=../../runs/shapes/chat-sft-256-ev-llmlr-more/final \
    --set "data.train=[${FIVE%, }]" --set train.llm_learning_rate=5e-3 --set train.seed=3 \
    --set train.output_dir=../../runs/shapes/chat-sft-256-ev-llmlr-more2
viscpm train paint-xattn --config $C/paint-zhplus.toml --set model.init=../../runs/shapes/paint-zhplus/final \
    --set "data.train=[\"../../data/shapes/multimodal/captions.jsonl\", \"../../data/shapes/multimodal/captions_zh.jsonl\", \"$D-s1/multimodal/captions.jsonl\", \"$D-s1/multimodal/captions_zh.jsonl\", \"$D-s2/multimodal/captions.jsonl\", \"$D-s2/multimodal/captions_zh.jsonl\"]" \
    --set train.max_steps=3000 --set train.seed=2 --set train.output_dir=../../runs/shapes/paint-zhplus-more

# v3: the chat above continued on data varied as people type and draw (docs/shapesworld.md: v3), three rounds
viscpm data shapes --out data/shapes-robust --evidence-first --robust --zh-instruct 6400
viscpm data shapes --out data/shapes-robust-1 --seed 1 --evidence-first --robust --zh-instruct 6400 --avoid-eval-of data/shapes-robust
viscpm data shapes --out data/shapes-2 --seed 2 --evidence-first --zh-instruct 3200 --avoid-eval-of data/shapes-robust
viscpm train chat-sft --config $C/chat-robust.toml --set model.init=../../runs/shapes/chat-sft-256-ev-llmlr-more/final
viscpm train chat-sft --config $C/chat-robust-more.toml
viscpm train chat-sft --config $C/chat-robust-settle.toml
# v3.1: descriptions in reading order (the count, then each shape after its place), two rounds: the packaged chat
viscpm data shapes --out data/shapes-ro --evidence-first --robust --reading-order --zh-instruct 6400
viscpm data shapes --out data/shapes-ro-1 --seed 1 --evidence-first --robust --reading-order --zh-instruct 6400 --avoid-eval-of data/shapes-ro
viscpm data shapes --out data/shapes-ro-2 --seed 2 --evidence-first --reading-order --zh-instruct 3200 --avoid-eval-of data/shapes-ro
viscpm train chat-sft --config $C/chat-reading.toml --set model.init=../../runs/shapes/chat-robust-settle/final
viscpm train chat-sft --config $C/chat-reading-settle.toml
# descriptions asked for in 60 % of dialogues, on top of v3.1 (not packaged: docs/shapesworld.md)
viscpm data shapes --out data/shapes-ro-3 --seed 3 --evidence-first --robust --reading-order --describe-share 0.6 --zh-instruct 6400 --avoid-eval-of data/shapes-ro
viscpm train chat-sft --config $C/chat-describe.toml --set model.init=../../runs/shapes/chat-reading-settle/final

# 64 queries (VisCPM's count; one per 8x8 patch here) instead of 16: chat-align again over lm-256,
# then one SFT run on the three seeds' evidence-first dialogues at the packaged recipe's rates
# (max_tokens + 48 keeps the same text budget)
viscpm train chat-align --config $C/chat-align-256.toml --set model.config=chat-256-q64.json \
    --set train.output_dir=../../runs/shapes/chat-align-256-q64
viscpm train chat-sft --config $C/chat-sft.toml --set model.init=../../runs/shapes/chat-align-256-q64/final \
    --set "data.train=[\"$D/multimodal/instruct_en.jsonl\", \"$D/multimodal/instruct_zh.jsonl\", \"$D-s1/multimodal/instruct_en.jsonl\", \"$D-s1/multimodal/instruct_zh.jsonl\", \"$D-s2/multimodal/instruct_en.jsonl\", \"$D-s2/multimodal/instruct_zh.jsonl\"]" \
    --set data.max_tokens=368 --set train.llm_learning_rate=5e-3 --set train.output_dir=../../runs/shapes/chat-sft-256-q64
# … and its second round, as the packaged model had: EN 75.5 %, ZH 63.3 % (README; not packaged)
viscpm train chat-sft --config $C/chat-sft.toml --set model.init=../../runs/shapes/chat-sft-256-q64/final \
    --set "data.train=[\"$D/multimodal/instruct_en.jsonl\", \"$D/multimodal/instruct_zh.jsonl\", \"$D-s1/multimodal/instruct_en.jsonl\", \"$D-s1/multimodal/instruct_zh.jsonl\", \"$D-s2/multimodal/instruct_en.jsonl\", \"$D-s2/multimodal/instruct_zh.jsonl\"]" \
    --set data.max_tokens=368 --set train.llm_learning_rate=5e-3 --set train.seed=1 --set train.output_dir=../../runs/shapes/chat-sft-256-q64-more
# … then 1,000 steps with the translated-Chinese dialogues listed three times (EN 78.5 %, ZH 64.5 %)
EN3=$(for s in "" -s1 -s2; do printf '"%s/multimodal/instruct_en.jsonl", ' "$D$s"; done)
ZH3=$(for r in 1 2 3; do for s in "" -s1 -s2; do printf '"%s/multimodal/instruct_zh.jsonl", ' "$D$s"; done; done)
viscpm train chat-sft --config $C/chat-sft.toml --set model.init=../../runs/shapes/chat-sft-256-q64-more/final \
    --set "data.train=[${EN3}${ZH3%, }]" --set data.max_tokens=368 --set train.llm_learning_rate=5e-3 --set train.seed=2 \
    --set train.max_steps=1000 --set train.warmup_steps=50 --set train.output_dir=../../runs/shapes/chat-sft-256-q64-zh3
# … and 1,000 more with them six times (EN 74.8 %, ZH 64.5 %)
ZH6=$(for r in 1 2 3 4 5 6; do for s in "" -s1 -s2; do printf '"%s/multimodal/instruct_zh.jsonl", ' "$D$s"; done; done)
viscpm train chat-sft --config $C/chat-sft.toml --set model.init=../../runs/shapes/chat-sft-256-q64-zh3/final \
    --set "data.train=[${EN3}${ZH6%, }]" --set data.max_tokens=368 --set train.llm_learning_rate=5e-3 --set train.seed=3 \
    --set train.max_steps=1000 --set train.warmup_steps=50 --set train.output_dir=../../runs/shapes/chat-sft-256-q64-zh6

# row c's paint: the first paint recipe over the English-only LLM, on the 4 k-image corpus it was run on
viscpm data shapes --out data/shapes-4k --seed 0 --train-images 4000
viscpm train paint-xattn --config $C/paint.toml --set model.llm_init=../../runs/shapes/lm-en/final \
    --set data.train=../../data/shapes-4k/multimodal/captions.jsonl --set train.output_dir=../../runs/shapes/paint-lm-en

# 3. scores on the held-out sets
viscpm eval shapes --data data/shapes --chat runs/shapes/chat-sft/final --paint runs/shapes/paint-longer/final --out runs/shapes/eval-b.json
viscpm eval shapes --data data/shapes --chat runs/shapes/chat-sft-long/final --skip-paint --out runs/shapes/eval-b-long.json
viscpm eval shapes --data data/shapes --chat runs/shapes/chat-sft-en/final --skip-paint --out runs/shapes/eval-a.json
viscpm eval shapes --data data/shapes --chat runs/shapes/chat-sft-lm-en/final --skip-paint --out runs/shapes/eval-c.json
viscpm eval shapes --data data/shapes --chat runs/shapes/chat-sft-256/final --skip-paint --out runs/shapes/eval-b-256.json
viscpm eval shapes --data data/shapes --chat runs/shapes/chat-sft-en-256/final --skip-paint --out runs/shapes/eval-a-256.json
viscpm eval shapes --data data/shapes --chat runs/shapes/chat-sft-256-ev/final --skip-paint --out runs/shapes/eval-b-256-ev.json
viscpm eval shapes --data data/shapes --chat runs/shapes/chat-sft-256-llmlr/final --skip-paint --out runs/shapes/eval-b-256-llmlr.json
viscpm eval shapes --data data/shapes --chat runs/shapes/chat-sft-256-ev-llmlr/final --skip-paint --out runs/shapes/eval-b-256-ev-llmlr.json
viscpm eval shapes --data data/shapes --paint runs/shapes/paint-wide/final --skip-chat --out runs/shapes/eval-paint-wide.json
viscpm eval shapes --data data/shapes --paint runs/shapes/paint-zhplus/final --skip-chat --out runs/shapes/eval-paint-zhplus.json
viscpm eval shapes --data data/shapes --chat runs/shapes/chat-sft-256-ev-llmlr-more/final --skip-paint --out runs/shapes/eval-b-256-more.json
viscpm eval shapes --data data/shapes --chat runs/shapes/chat-sft-256-ev-llmlr-more2/final --skip-paint --out runs/shapes/eval-b-256-more2.json
viscpm eval shapes --data data/shapes --paint runs/shapes/paint-zhplus-more/final --skip-chat --out runs/shapes/eval-paint-zhplus-more.json
viscpm eval shapes --data data/shapes-robust --chat runs/shapes/chat-robust-settle/final --skip-paint --out runs/shapes/eval-robust-settle.json
viscpm eval shapes --data data/shapes-ro --chat runs/shapes/chat-reading/final --skip-paint --out runs/shapes/eval-reading.json
viscpm eval shapes --data data/shapes-ro --chat runs/shapes/chat-reading-settle/final --skip-paint --out runs/shapes/eval-reading-settle.json
viscpm eval shapes --data data/shapes-ro --chat runs/shapes/chat-describe/final --skip-paint --out runs/shapes/eval-describe.json
viscpm eval shapes --data data/shapes --chat runs/shapes/chat-sft-256-q64/final --skip-paint --out runs/shapes/eval-b-256-q64.json
viscpm eval shapes --data data/shapes --chat runs/shapes/chat-sft-256-q64-more/final --skip-paint --out runs/shapes/eval-b-256-q64-more.json
viscpm eval shapes --data data/shapes --chat runs/shapes/chat-sft-256-q64-zh3/final --skip-paint --out runs/shapes/eval-b-256-q64-zh3.json
viscpm eval shapes --data data/shapes --chat runs/shapes/chat-sft-256-q64-zh6/final --skip-paint --out runs/shapes/eval-b-256-q64-zh6.json
viscpm eval shapes --data data/shapes --paint runs/shapes/paint/final --skip-chat --out runs/shapes/eval-paint-2400.json
viscpm eval shapes --data data/shapes --paint runs/shapes/paint-lm-en/final --skip-chat --out runs/shapes/eval-paint-lm-en.json
# the packaged paint model's guidance (README): 4 is what its generation_config.json sets
for g in 2 3 4 5 7.5 10; do viscpm eval shapes --data data/shapes --skip-chat --guidance $g --out runs/shapes/eval-paint-guidance-$g.json; done
