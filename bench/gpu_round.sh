#!/usr/bin/env bash
# One GPU round, everything in one go: the HAM10000 study (configs/ham10000_gpu.yaml) from the compact archive, and
# the speed benchmarks of bench/, each ratio measured against its reference in the same process.
#
#   OUT=<results folder> bash bench/gpu_round.sh [budget seconds, default 560]
#   SMOKE=1 OUT=/tmp/round bash bench/gpu_round.sh 1200     # CPU check of the script at tiny sizes
#   SKIP_STUDY=1 ... / SKIP_BENCHES=1 ...                     # only the benchmarks / only the 3-seed study
#   SD_ARGS="--skip-train" ...                                # extra arguments of bench/bench_sd15.py
#   BENCHES="sampling sd15" ...                               # a subset of: sampling randaugment gen_train sd15 datapath
#   STUDY_SETS=bench/gpu_study_short.sets ...                 # a file of the study's --set overrides, one per line
#
# Needs data/ham10000-compact.tar.gz (bench/pack_ham10000.py). Order: the study with seed 0 (a complete report
# early), the benchmarks, then the study again with all three seeds (it resumes: seed 0 is not redone). Every step
# runs under a time limit cut to what is left of the budget. Writes $OUT/results.tgz (logs, benchmark JSON, the
# study without images or weights; its report embeds HAM10000 images: keep it out of git) and prints the summary
# last.
set -uo pipefail
BUDGET=${1:-560}
OUT=${OUT:-/tmp/gpu_round}
W=${WORK:-/tmp/dermsynth_round}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT" "$W/logs"
LOGS=$W/logs
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 DERMSYNTH_CACHE=$W/cache PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$SECONDS

step() {  # step NAME LIMIT CMD...: run CMD under min(LIMIT, time left), output to $LOGS/NAME.log
    local name=$1 lim=$2 left
    shift 2
    left=$((BUDGET - (SECONDS - T0) - 15))
    ((left < lim)) && lim=$left
    if ((lim < 10)); then echo "$name: skipped, budget spent" | tee -a "$LOGS/steps.txt"; return 0; fi
    local t=$SECONDS
    timeout "$lim" "$@" >"$LOGS/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - t)) s (limit $lim s)" | tee -a "$LOGS/steps.txt"
}

{ date -u; nvidia-smi 2>&1 | head -15; $PY -c "
import torch, diffusers, timm, transformers, peft, accelerate, torchmetrics
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')
print('diffusers', diffusers.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__,
      'peft', peft.__version__, 'accelerate', accelerate.__version__, 'torchmetrics', torchmetrics.__version__)"; } \
    >"$LOGS/env.txt" 2>&1
cat "$LOGS/env.txt"
tar xzf data/ham10000-compact.tar.gz -C "$W" || { echo "no data/ham10000-compact.tar.gz"; exit 1; }

STUDY=(-m dermsynth study -c configs/ham10000_gpu.yaml --set "data.root=$W/ham10000-compact" --out "$W/study")
if [[ -n ${STUDY_SETS:-} ]]; then  # one override per line; blank lines and '#' comments skipped
    while IFS= read -r line; do [[ $line =~ ^[[:space:]]*(#|$) ]] || STUDY+=(--set "$line"); done <"$STUDY_SETS"
fi
if [[ $SMOKE == 1 ]]; then  # the same path at toy sizes, on CPU
    STUDY+=(--set generator.data.image_size=16 --set generator.model.size=test --set generator.train.steps=20
            --set generator.train.checkpoint_every=10 --set generator.train.validate_every=0
            --set generator.sample.batch_size=32 --set generation.per_class=16 --set "generation.per_class_of={df: 8}"
            --set classifier.data.image_size=32
            --set classifier.model.name=test_efficientnet --set classifier.model.pretrained=none
            --set classifier.train.epochs=2 --set filter.features.input_size=32 --set quality.features.input_size=32
            # real-only, two cheap baselines (val picks one), the focal hybrid and the real-only finish (which needs
            # an epoch with synthetic images before its real-only one: the config's 3 real-only epochs do not fit 2)
            --set "conditions=[{name: real_effnet}, {name: oversampling, sampler: oversample},
                   {name: randaugment, randaugment: true}, {name: hybrid, loss: focal,
                   set: {train.focal_alpha: balanced}, synthetic: filtered, ratio: 1.0},
                   {name: hybrid_oversample_realend, sampler: oversample, synthetic: filtered, ratio: 1.0,
                   set: {train.real_only_last_epochs: 1}}]"
            --set "baselines=[oversampling, randaugment]" --set "primary_from=[hybrid, hybrid_oversample_realend]"
            --set quality.repeats=2 --set workers=2 --set n_boot=50 --set classifier.eval.n_boot=50)
    SAMPLING=(--size tiny --image-size 16 --batch 4 --repeats 1 --plain-steps 4 --steps 2)
    GENTRAIN=(--size tiny --image-size 16 --batch 4 --steps 2 --warmup 1)
    SD=(--tiny)
    RANDAUG=(--batch 8 --size 32 --repeats 1)
    DATAPATH=(--size 32 --steps 2 --blocks 1 --batch-size 16)
    SOFT=16 DDIM_N=16 HELDOUT_N=8
else
    # batch 128, one timed repeat: at batch 256 with 3 repeats it did not finish within 60 s on an H200
    SAMPLING=(--size base64 --image-size 64 --batch 128 --repeats 1)
    GENTRAIN=(--size base64 --image-size 64 --batch 128 --steps 40 --warmup 10)
    SD=(--warmup 1 --gen-repeats 2 ${SD_ARGS:-})
    RANDAUG=(--batch 64 --size 128 --repeats 5)
    DATAPATH=(--size 128 --batch-size 64 --steps 30 --blocks 3)
    SOFT=64 DDIM_N=256 HELDOUT_N=100
fi

if [[ ${SKIP_STUDY:-0} != 1 && ${SKIP_BENCHES:-0} != 1 ]]; then  # a complete one-seed report before the benchmarks
    step study_seed0 330 $PY "${STUDY[@]}" --set "seeds=[0]"
fi
BENCHES=" ${BENCHES:-sampling randaugment gen_train sd15 datapath} "
want() { [[ $BENCHES == *" $1 "* ]]; }
if [[ ${SKIP_BENCHES:-0} != 1 ]]; then
    want sampling && step bench_sampling 75 $PY bench/bench_sampling.py "${SAMPLING[@]}" --out "$LOGS/bench_sampling.json"
    want randaugment && step bench_randaugment 45 $PY bench/bench_randaugment.py "${RANDAUG[@]}"
    want gen_train && step bench_gen_train 60 $PY bench/bench_gen_train.py "${GENTRAIN[@]}" --out "$LOGS/bench_gen_train.json"
    want sd15 && step bench_sd15 180 $PY bench/bench_sd15.py "${SD[@]}" --out "$LOGS/bench_sd15.json"
fi
if [[ ${SKIP_BENCHES:-0} != 1 ]] && want datapath; then
    # needs a split: the study's, or one made here from the archive
    if [[ ! -f $W/study/split/split.json ]]; then
        step data_prepare 60 $PY -m dermsynth data prepare --source ham10000 --root "$W/ham10000-compact" --out "$W/study/data"
        step data_split 30 $PY -m dermsynth data split --manifest "$W/study/data/manifest.csv" --out "$W/study/split"
    fi
    step bench_clf_datapath 45 $PY bench/bench_clf_datapath.py --split "$W/study/split/split.json" "${DATAPATH[@]}"
fi
if [[ ${SKIP_STUDY:-0} != 1 ]]; then
    step study_3seeds 600 $PY "${STUDY[@]}"
    # synthetic images no classifier trained on: every class, another seed, the study's own sampling settings
    [[ -f $W/study/samples/samples.json ]] && step heldout 45 $PY -m dermsynth generate --like "$W/study/samples" \
        --classes akiec,bcc,bkl,df,mel,nv,vasc --per-class "$HELDOUT_N" --seed 1 --out "$W/heldout"
    HELD=() && [[ -f $W/heldout/manifest.csv ]] && HELD=(--synthetic "$W/heldout/manifest.csv")
    # do the seed-0 classifiers call soft (upsampled-looking) common lesions rare? (SOFT = the generator's size)
    # and synthetic common lesions (the synthetic look as a whole)?
    step softness 90 $PY bench/softness_shortcut.py --split "$W/study/split/split.json" --soft "$SOFT" "${HELD[@]}" \
        "$W"/study/classifiers/*/seed0 --out "$LOGS/softness.json"
    # test-time flips and the decision rule, rescored from every classifier's checkpoint (chosen on val only)
    step levers 90 $PY bench/eval_levers.py "$W/study" --out "$LOGS/levers.json"
    # what the fast sampler costs in quality: the study's generator, unfiltered samples of DDIM 50 (two seeds: how
    # much KID moves between draws) and of the study's DPM++ 25, each scored against the real test part with the
    # study's own quality config (the same in each of its quality folders); last, DPM++ 25 variations of real train
    # images (strength 0.25): how near the floor the generator comes when it keeps a real lesion's layout and colours
    step sampler_quality 180 $PY bench/sampler_quality.py --gen "$W/study/generator" \
        --split "$W/study/split/split.json" --out "$W/sampler_quality" --per-class "$DDIM_N" \
        -v ddim:50:0 -v ddim:50:1 -v dpmpp:25:0 -v dpmpp:25:0:0.25 -c "$(ls "$W"/study/quality/*/config.yaml | head -1)"
    cp "$W/sampler_quality/sampler_quality.json" "$LOGS/" 2>/dev/null
fi

$PY bench/study_summary.py "$W/study" >"$LOGS/summary.txt" 2>&1
# what comes back: logs, benchmark results, the study's tables, reports, grids and logs (no PNG samples, no weights)
tar czf "$OUT/results.tgz" -C "$W" logs \
    --exclude='*.safetensors' --exclude='*.pt' --exclude='*.npy' --exclude='*.npz' \
    --exclude='study/samples/images' --exclude='study/samples/*/*.png' --exclude='study/data' study 2>/dev/null
ls -la "$OUT"
for f in "$LOGS"/bench_*.log "$LOGS"/softness.log; do [[ -f $f ]] || continue; echo "== $f"; grep -v -e '%|' -e '^\s*$' "$f" | tail -14; done
[[ -f $LOGS/levers.log ]] && { echo "== $LOGS/levers.log"; grep -v -e '%|' -e '^\s*$' "$LOGS/levers.log" | tail -40; }
[[ -f $LOGS/sampler_quality.log ]] && { echo "== $LOGS/sampler_quality.log"; grep -v -e '%|' -e '^\s*$' "$LOGS/sampler_quality.log" | tail -24; }
echo "== steps"; cat "$LOGS/steps.txt"
echo "== summary"; cat "$LOGS/summary.txt"
