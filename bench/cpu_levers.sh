#!/usr/bin/env bash
# The synthetic-data levers of the HAM10000 study at CPU size (configs/ham10000_cpu.yaml, 3 seeds), all chosen among
# on VALIDATION by the study itself (primary_from):
#   - ratio: hybrid_oversample (filtered synthetic images + the oversampling baseline's sampler) at synthetic:real
#     0.25, 0.5, 1 and 2 for each rare class, with oversampling as ratio 0. Enough samples are drawn for ratio 2
#     after filtering (the config's 120 per class cap mel at a ratio of 0.14);
#   - class: the same recipe with synthetic images of mel only, or of df and vasc only;
#   - every class (second form): at ratio 0.25, synthetic images for all seven classes, not only the rare ones,
#     beside the rare-only recipe on the same samples. Why: if "looks synthetic" is evidence for a rare class, real
#     lesions of that class, which do not look synthetic, lose recall; with synthetic images in every class the look
#     predicts nothing.
#
#   - real-only finish (third form, on the second form's folder): both ratio-0.25 recipes again, with their last
#     epoch drawing real images only (train.real_only_last_epochs=1). Why: the synthetic look lowered recall on real
#     lesions; a last epoch on real photos refits the decision to them and keeps what the features learned.
#   - classifier strength (fourth form, same folder): 4 epochs instead of 2 for oversampling and for the every-class
#     recipe with its real-only last epoch (the realend recipe the study chose on validation).
#   - generator quality (fifth form, on another copy of that folder): the generator trained 4x longer (2,400 steps),
#     new samples, filter and quality, and the recipe chosen above (all-class, real-only last epoch, 2 epochs).
#     gen2400_e4 adds both 4-epoch recipes of the fourth form (copy its oversampling_e4 runs and their units/
#     records into the folder first, and they are reused).
#   - other settings (gen2400_e6_with KEY=VALUE ..., on a copy of the gen2400_e6 folder): the 6-epoch pair validation
#     chose, 3 seeds, with settings changed; the units they invalidate rerun, the rest (the generator, the
#     oversampling runs) are reused. Measured with it:
#       generation.guidance=1.0 / 3.0 (and 4.0 with the filter below): the samples drawn at classifier-free
#         guidance 1, 3 or 4 instead of 2. Why: guidance trades diversity for class fidelity; the filter drops
#         unfaithful images, so lower guidance may give the classifier more varied rare lesions, higher guidance
#         more typical ones.
#       filter.class_prob_quantile=0.5 (with guidance 3, validation's choice): a stricter filter (a synthetic image
#         must look as much like its class to the reference classifier as the median real validation image, capped
#         by filter.min_class_prob). Why: at guidance 1 the classifier lost most where the filter refused the most
#         samples for a low class probability, so class fidelity may be what the classifier needs.
#       filter.detector_keep=0.5 (with guidance 3, the stricter filter and the larger draw of the ratio-0.5 form
#         below, given as generation.per_class_of={...}, so that ratio 0.25 is still covered): the filter's check (d)
#         keeps the half of each class's samples that a real-vs-synthetic classifier finds least synthetic. Why: that
#         classifier tells the samples from real images with AUC 0.83-1.00 (quality's C2ST), and the synthetic look
#         is what the classifier could learn as a class cue.
#       generation.strength=0.5 (with guidance 3 and the stricter filter): image-to-image samples, each a real train
#         image of its class noised halfway and denoised by the generator. Why: no selection among from-noise
#         samples removed the synthetic look; images that keep a real lesion's layout and colours may carry less.
#       generator.train.snr_gamma=5.0 (with guidance 3 and the stricter filter, from noise): the generator trained
#         with min-SNR-5 loss weighting. Why: it lowered KID_lite0 against validation in every rare class for two
#         generator seeds (bench/sampler_quality.py); do images nearer the real statistics help the classifier?
#       HYBRID_SET='train.synthetic_loss_weight: 0.5' (with generation.strength=0.25, guidance 3 and the stricter
#         filter): each synthetic image counts half as much as a real one in the hybrid's loss. Why: the classifier
#         learnt the synthetic look as a class cue; a lighter weight keeps the synthetic variety in every batch while
#         it pulls the decision less.
#   - ratio 0.5 (gen2400_e6_r0.5_with KEY=VALUE ..., on a copy of a gen2400_e6_with folder): the same pair with
#     twice the synthetic images per class (more samples are drawn). Why: at ratio 0.25 the stricter filter's recipe
#     gained in the mean over oversampling (within noise); the rare-only sweep of the first form lost least at 0.5.
#   - redraw (redraw_with KEY=VALUE ..., on a copy of a gen2400_e6_with folder): the pair's hybrid beside the same
#     hybrid with data.synthetic_redraw (each epoch draws its synthetic images afresh from all that were kept, at the
#     same ratio), both on a larger draw of the classes oversampling repeats most (REDRAW_DRAW: the kept pool 2-4x
#     what ratio 0.25 asks in df, vasc, akiec, bcc, bkl and mel; nv, drawn less than once an epoch, as before). Why:
#     with oversampling each synthetic df image was seen ~12 times an epoch, so the classifier could learn the few
#     images one by one; a fresh draw each epoch shows it several times as many at the same share.
#   - on that folder again: gen2400_rare_e4 adds the rare-only recipe (real-only last epoch, 4 epochs), which beat the
#     every-class one on test at 2 epochs though validation chose the latter; gen2400_e6 adds 6 epochs for oversampling
#     and for both recipes. Why: at 4 epochs the better generator first lifted the synthetic recipes above
#     oversampling; does the gap grow with a stronger classifier? The longer oversampling runs join the baselines.
#
#   bash bench/cpu_levers.sh <study folder>      # resumes; a finished CPU study's folder (a copy) saves the real runs
#   bash bench/cpu_levers.sh <another copy> all  # the every-class check
#   bash bench/cpu_levers.sh <that copy> realend # the real-only finish
#   bash bench/cpu_levers.sh <that copy> epochs4 # classifier strength
#   bash bench/cpu_levers.sh <a copy of it> gen2400 # generator quality
#   bash bench/cpu_levers.sh <that copy> gen2400_e4 # generator quality and 4 epochs
#   bash bench/cpu_levers.sh <that copy> gen2400_rare_e4 # and the rare-only recipe at 4 epochs
#   bash bench/cpu_levers.sh <that copy> gen2400_e6 # and 6 epochs
#   bash bench/cpu_levers.sh <a copy of it> gen2400_e6_seeds5 # seeds 3 and 4 for 6-epoch oversampling and all-class
#   bash bench/cpu_levers.sh <a copy of it> gen2400_e6_with generation.guidance=1.0 # a setting changed, 3 seeds
#   bash bench/cpu_levers.sh <a copy of that> gen2400_e6_r0.5_with generation.guidance=3.0 # and ratio 0.5
#
# About 55 min (first form), 20 min (second), 20 min (third), 35 min (fourth) and 35 min (fifth) on 2 cores from a
# finished 3-seed CPU study; then 18 min (gen2400_e4), 15 min (gen2400_rare_e4), 67 min (gen2400_e6), 32 min
# (gen2400_e6_seeds5), 29 min (gen2400_e6_with a new guidance), 22 min (with a new filter) and 12 min (seeds 3
# and 4 added).
set -euo pipefail
FORMS="'' (ratio and class), all, realend, epochs4, gen2400, gen2400_e4, gen2400_rare_e4, gen2400_e6,
  gen2400_e6_seeds5, gen2400_e6_with KEY=VALUE ..., gen2400_e6_r0.5_with KEY=VALUE ..., redraw_with KEY=VALUE ..."
STUDY=${1:?usage: bash bench/cpu_levers.sh <study folder> [form: $FORMS]}
PY=${PYTHON:-python3}
# the real-only conditions of configs/ham10000_cpu.yaml, unchanged: their finished runs are reused
REAL='{name: real_effnet}, {name: oversampling, sampler: oversample}, {name: focal, loss: focal, set: {train.focal_alpha: balanced}}'
study() {
  $PY -m dermsynth study -c configs/ham10000_cpu.yaml --out "$STUDY" --set 'seeds=[0, 1, 2]' "$@"
  $PY bench/study_summary.py "$STUDY"
}
# the recipes of the later forms, each written once
ALL_DRAW='generation.per_class_of={df: 100, vasc: 60, mel: 250, nv: 1400, bkl: 260, bcc: 130, akiec: 90}'
SEVEN='data.synthetic_classes: [akiec, bcc, bkl, df, mel, nv, vasc]'
R25='sampler: oversample, synthetic: filtered, ratio: 0.25'
RARE_R25="{name: hybrid_oversample_r0.25, $R25}"
ALL_R25="{name: hybrid_oversample_all_r0.25, $R25, set: {$SEVEN}}"
RARE_END="{name: hybrid_oversample_r0.25_realend, $R25, set: {train.real_only_last_epochs: 1}}"
ALL_END="{name: hybrid_oversample_all_r0.25_realend, $R25, set: {$SEVEN, train.real_only_last_epochs: 1}}"
ALL_END_E4="{name: hybrid_oversample_all_r0.25_realend_e4, $R25,
  set: {$SEVEN, train.real_only_last_epochs: 1, train.epochs: 4}}"
RARE_END_E4="{name: hybrid_oversample_r0.25_realend_e4, $R25, set: {train.real_only_last_epochs: 1, train.epochs: 4}}"
# HYBRID_SET='KEY: VALUE, ...' adds classifier settings to the every-class 6-epoch hybrid only (given as KEY=VALUE,
# a classifier setting would change the oversampling runs too, and rerun them)
END_E6="set: {$SEVEN, train.real_only_last_epochs: 1, train.epochs: 6${HYBRID_SET:+, $HYBRID_SET}}"
ALL_END_E6="{name: hybrid_oversample_all_r0.25_realend_e6, $R25, $END_E6}"
ALL_END_E6_R05="{name: hybrid_oversample_all_r0.5_realend_e6, sampler: oversample, synthetic: filtered, ratio: 0.5,
  $END_E6}"
# enough for ratio 0.5 after the stricter filter (class_prob_quantile 0.5 kept 37 % of bkl, 45 % of vasc, 61 % of
# akiec and 87-92 % of the others): train has nv 4,705, bkl 767, mel 783, bcc 356, akiec 229, vasc 102, df 80
ALL_DRAW_R05='generation.per_class_of={df: 100, vasc: 140, mel: 480, nv: 2800, bkl: 1100, bcc: 230, akiec: 200}'
ALL_END_E6_REDRAW="{name: hybrid_oversample_all_r0.25_realend_e6_redraw, $R25,
  set: {$SEVEN, train.real_only_last_epochs: 1, train.epochs: 6, data.synthetic_redraw: true}}"
REDRAW_DRAW='generation.per_class_of={df: 210, vasc: 190, mel: 600, nv: 1400, bkl: 520, bcc: 650, akiec: 360}'
RARE_END_E6="{name: hybrid_oversample_r0.25_realend_e6, $R25, set: {train.real_only_last_epochs: 1, train.epochs: 6}}"
OVER_E4='{name: oversampling_e4, sampler: oversample, set: {train.epochs: 4}}'
OVER_E6='{name: oversampling_e6, sampler: oversample, set: {train.epochs: 6}}'
GEN2400_E4="$ALL_END, $OVER_E4, $ALL_END_E4"
GEN2400_FROM='hybrid_oversample_all_r0.25_realend, hybrid_oversample_all_r0.25_realend_e4'
# the longer-trained oversampling runs are baselines too: a recipe is compared with the cheap one of its own budget
# when validation prefers that one
BASE_E4='baselines=[oversampling, focal, oversampling_e4]'
every_class() {  # every_class CONDITIONS PRIMARY PRIMARY_FROM [--set ...]: a study on the every-class samples
  local conds=$1 primary=$2 from=$3
  shift 3
  study --set "$ALL_DRAW" --set "conditions=[$REAL, $conds]" --set "sweep={of: $primary, ratios: [], zero: ''}" \
    --set "primary=$primary" --set "primary_from=[$from]" "$@"
}
e6_pair() {  # e6_pair NAME CONDITION [--set ...]: 6-epoch oversampling and one hybrid, alone in the aggregate
  local name=$1 cond=$2
  shift 2
  study --set "$ALL_DRAW" --set generator.train.steps=2400 --set "conditions=[$OVER_E6, $cond]" \
    --set 'baselines=[oversampling_e6]' --set "sweep={of: $name, ratios: [], zero: ''}" \
    --set "primary=$name" --set "primary_from=[$name]" "$@"
}
E6=hybrid_oversample_all_r0.25_realend_e6  # the hybrid of the 6-epoch pair gen2400_e6's validation chose
sets=()  # the KEY=VALUE settings after a *_with form, as --set options
for kv in "${@:3}"; do sets+=(--set "$kv"); done
case ${2:-} in
  all) every_class "$RARE_R25, $ALL_R25" hybrid_oversample_r0.25 \
    "hybrid_oversample_r0.25, hybrid_oversample_all_r0.25" ;;
  realend) every_class "$RARE_R25, $ALL_R25, $RARE_END, $ALL_END" hybrid_oversample_r0.25 \
    "hybrid_oversample_r0.25, hybrid_oversample_all_r0.25, hybrid_oversample_r0.25_realend,
     hybrid_oversample_all_r0.25_realend" ;;
  epochs4) every_class "$OVER_E4, $RARE_R25, $ALL_R25, $ALL_END_E4" hybrid_oversample_r0.25 \
    "hybrid_oversample_r0.25, hybrid_oversample_all_r0.25, hybrid_oversample_all_r0.25_realend_e4" ;;
  gen2400) every_class "$ALL_END" hybrid_oversample_all_r0.25_realend hybrid_oversample_all_r0.25_realend \
    --set generator.train.steps=2400 ;;
  gen2400_e4) every_class "$GEN2400_E4" hybrid_oversample_all_r0.25_realend "$GEN2400_FROM" \
    --set generator.train.steps=2400 --set "$BASE_E4" ;;
  gen2400_rare_e4) every_class "$GEN2400_E4, $RARE_END_E4" hybrid_oversample_all_r0.25_realend \
    "$GEN2400_FROM, hybrid_oversample_r0.25_realend_e4" --set generator.train.steps=2400 --set "$BASE_E4" ;;
  gen2400_e6) every_class "$GEN2400_E4, $RARE_END_E4, $OVER_E6, $ALL_END_E6, $RARE_END_E6" \
    hybrid_oversample_all_r0.25_realend "$GEN2400_FROM, hybrid_oversample_r0.25_realend_e4,
    hybrid_oversample_all_r0.25_realend_e6, hybrid_oversample_r0.25_realend_e6" --set generator.train.steps=2400 \
    --set 'baselines=[oversampling, focal, oversampling_e4, oversampling_e6]' ;;
  # two more seeds (3 and 4) for the pair that gen2400_e6's validation chose, alone in the folder's aggregate
  gen2400_e6_seeds5) e6_pair $E6 "$ALL_END_E6" --set 'seeds=[0, 1, 2, 3, 4]' ;;
  # that pair with settings changed (e.g. the samples' guidance, the filter's strictness, more seeds)
  gen2400_e6_with|gen2400_e6_r0.5_with) : "${3:?give KEY=VALUE ..., e.g. generation.guidance=1.0}"
    if [[ $2 == gen2400_e6_with ]]; then e6_pair $E6 "$ALL_END_E6" "${sets[@]}"
    else e6_pair hybrid_oversample_all_r0.5_realend_e6 "$ALL_END_E6_R05" --set "$ALL_DRAW_R05" "${sets[@]}"; fi ;;
  # the pair's hybrid with and without a fresh draw of its synthetic images each epoch, on a larger draw
  redraw_with) study --set "$REDRAW_DRAW" --set generator.train.steps=2400 \
      --set "conditions=[$OVER_E6, $ALL_END_E6, $ALL_END_E6_REDRAW]" --set 'baselines=[oversampling_e6]' \
      --set "sweep={of: $E6, ratios: [], zero: ''}" --set "primary=$E6" \
      --set "primary_from=[$E6, hybrid_oversample_all_r0.25_realend_e6_redraw]" "${sets[@]}" ;;
  "") study --set 'generation.per_class_of={df: 400, vasc: 300, mel: 1700}' \
    --set "conditions=[$REAL,
      {name: hybrid, loss: focal, set: {train.focal_alpha: balanced}, synthetic: filtered, ratio: 1.0},
      {name: hybrid_oversample, sampler: oversample, synthetic: filtered, ratio: 1.0},
      {name: hybrid_oversample_mel, sampler: oversample, synthetic: filtered, ratio: 1.0,
       set: {data.synthetic_classes: [mel]}},
      {name: hybrid_oversample_dfvasc, sampler: oversample, synthetic: filtered, ratio: 1.0,
       set: {data.synthetic_classes: [df, vasc]}}]" \
    --set 'sweep={of: hybrid_oversample, ratios: [0.25, 0.5, 1.0, 2.0], zero: oversampling}' \
    --set 'primary_from=[hybrid, hybrid_oversample, hybrid_oversample_r0.25, hybrid_oversample_r0.5,
      hybrid_oversample_r2, hybrid_oversample_mel, hybrid_oversample_dfvasc]' ;;
  *) echo "unknown form '$2'; forms: $FORMS" >&2; exit 2 ;;
esac
