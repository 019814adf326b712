"""The ``dermsynth`` command: a thin layer of verbs, each parsing its arguments and calling one library function.

This is the only module that sets up logging. Library errors that come from bad input (DataError, ConfigError) are
printed as one clear line and exit with status 2; anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Callable

from dermsynth import __version__


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """Import on use, so ``dermsynth --help`` and data verbs do not pay for torch/diffusers imports."""
    return getattr(importlib.import_module(module), name)


def _cfg(cls_path: str, args: argparse.Namespace) -> Any:
    from dermsynth.config import load_config

    module, name = cls_path.rsplit(".", 1)
    return load_config(_lazy(module, name), getattr(args, "config", None), getattr(args, "set", None) or [])


def _add_cfg_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, help="YAML config file (defaults are used for missing keys)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable; type-checked)")


# ----------------------------------------------------------------------------------------------------------------------
# Verbs
# ----------------------------------------------------------------------------------------------------------------------

def cmd_data_prepare(a: argparse.Namespace) -> Any:
    return _lazy("dermsynth.data.prepare", "prepare")(
        a.source, a.root, a.out, csv=a.csv, ham_root=a.ham_root, masks=a.masks, check_images=a.check_images,
        extra_classes=a.extra_classes)


def cmd_data_split(a: argparse.Namespace) -> Any:
    return _lazy("dermsynth.data.split", "make_split")(a.manifest, a.out, _cfg("dermsynth.data.split.SplitConfig", a))


def cmd_data_toy(a: argparse.Namespace) -> Any:
    return _lazy("dermsynth.data.toy", "make_toy")(a.out, _cfg("dermsynth.data.toy.ToyConfig", a))


def cmd_data_show(a: argparse.Namespace) -> Any:
    return _lazy("dermsynth.data.show", "show")(manifest=a.manifest, split=a.split, out=a.out)


def cmd_train_clf(a: argparse.Namespace) -> Any:
    cfg = _cfg("dermsynth.classify.config.ClfConfig", a)
    _lazy("dermsynth.classify.train", "train_classifier")(cfg, a.out, resume=a.resume)
    return a.out / "metrics.json"


def cmd_train_gen(a: argparse.Namespace) -> Any:
    cfg = _cfg("dermsynth.generate.config.GenConfig", a)
    return _lazy("dermsynth.generate.train", "train_generator")(cfg, a.out, resume=a.resume)


def cmd_generate(a: argparse.Namespace) -> Any:
    return _lazy("dermsynth.generate.sample", "generate")(
        a.gen, classes=a.classes, per_class=a.per_class, out=a.out, sampler=a.sampler, steps=a.steps,
        guidance=a.guidance, seed=a.seed, batch_size=a.batch_size, checkpoint=a.checkpoint, strength=a.strength,
        like=a.like, init_from=a.init_from)


def cmd_quality(a: argparse.Namespace) -> Any:
    cfg = _cfg("dermsynth.metrics.quality.QualityConfig", a)
    return _lazy("dermsynth.metrics.quality", "run_quality")(a.samples, a.split, cfg, a.out)


def cmd_filter(a: argparse.Namespace) -> Any:
    cfg = _cfg("dermsynth.metrics.filter.FilterConfig", a)
    return _lazy("dermsynth.metrics.filter", "run_filter")(a.samples, a.split, cfg, a.out, classifier=a.classifier)


def cmd_visual_check(a: argparse.Namespace) -> Any:
    if a.action == "make":
        if a.samples is None or a.split is None:  # optional for "score", so argparse cannot require them
            from dermsynth.config import ConfigError

            raise ConfigError("visual-check make needs --samples and --split")
        return _lazy("dermsynth.metrics.visual_check", "make_sheet")(a.samples, a.split, a.out, per_class=a.per_class,
                                                                     seed=a.seed)
    return _lazy("dermsynth.metrics.visual_check", "score_sheet")(a.out, a.ratings)


def cmd_study(a: argparse.Namespace) -> Any:
    cfg = _cfg("dermsynth.experiments.config.StudyConfig", a)
    return _lazy("dermsynth.experiments.study", "preview_study" if a.dry_run else "run_study")(cfg, a.out)


def cmd_report(a: argparse.Namespace) -> Any:
    return _lazy("dermsynth.experiments.report", "build_report")(a.study)


def cmd_demo(a: argparse.Namespace) -> Any:
    return _lazy("dermsynth.experiments.demo", "run_demo")(a.out)


def cmd_export(a: argparse.Namespace) -> Any:
    return _lazy("dermsynth.experiments.export", "export_imagefolder")(a.samples, a.out)


# ----------------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dermsynth",
        description="Diffusion-generated images against class imbalance in skin-lesion classification: "
                    "data -> split -> generator -> samples -> filter -> quality -> classifiers -> report. "
                    "Research use only, not for diagnosis.")
    p.add_argument("--version", action="version", version=f"dermsynth {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    d = sub.add_parser("data", help="prepare manifests, split, make the toy set, show counts")
    dsub = d.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    q = dsub.add_parser("prepare", help="read HAM10000 / ISIC 2018 / ISIC 2019 / a CSV / a folder tree into manifest.csv")
    q.add_argument("--source", required=True, choices=["ham10000", "isic2018", "isic2019", "csv", "folder"])
    q.add_argument("--root", required=True, type=Path, help="dataset folder")
    q.add_argument("--out", required=True, type=Path, help="output folder (gets manifest.csv)")
    q.add_argument("--csv", type=Path, help="csv: the CSV file (path,label[,group][,image_id]; default "
                                            "ROOT/labels.csv); isic2018/isic2019: the ground-truth CSV (default: "
                                            "found under ROOT)")
    q.add_argument("--ham-root", type=Path, help="isic2019: HAM10000 manifest or folder to deduplicate against")
    q.add_argument("--masks", action="store_true", help="ham10000: record lesion mask paths when present")
    q.add_argument("--check-images", action="store_true", help="fully decode every image (slower; default: header "
                                                                   "and end-of-file checks, full decode of suspects)")
    q.add_argument("--extra-classes", choices=["drop", "error"], default="drop",
                   help="isic2019: SCC/UNK are not among the 7 classes: drop them (logged) or refuse")
    q.set_defaults(func=cmd_data_prepare)
    q = dsub.add_parser("split", help="lesion-grouped, class-stratified train/val/test or k-fold split")
    q.add_argument("--manifest", required=True, type=Path)
    q.add_argument("--out", required=True, type=Path, help="output folder (gets split.json)")
    _add_cfg_args(q)
    q.set_defaults(func=cmd_data_split)
    q = dsub.add_parser("toy", help="make the built-in procedural dermoscopy-like toy set")
    q.add_argument("--out", required=True, type=Path)
    _add_cfg_args(q)
    q.set_defaults(func=cmd_data_toy)
    q = dsub.add_parser("show", help="class/lesion counts per part and a contact sheet per class")
    q.add_argument("--manifest", type=Path)
    q.add_argument("--split", type=Path, help="split.json (its manifest is used)")
    q.add_argument("--out", required=True, type=Path)
    q.set_defaults(func=cmd_data_show)

    q = sub.add_parser("train-clf", help="train one classifier on a split (timm)")
    _add_cfg_args(q)
    q.add_argument("--out", required=True, type=Path, help="run folder")
    q.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    q.set_defaults(func=cmd_train_clf)

    q = sub.add_parser("train-gen", help="train a generator (from-scratch diffusion or SD-1.5 LoRA) on a split's train part")
    _add_cfg_args(q)
    q.add_argument("--out", required=True, type=Path, help="run folder")
    q.add_argument("--resume", nargs="?", const="latest", default=None, help="resume from 'latest' or a checkpoint path")
    q.set_defaults(func=cmd_train_gen)

    q = sub.add_parser("generate", help="sample synthetic images from a generator run")
    q.add_argument("--gen", type=Path, help="generator run folder (default with --like: the one that made it)")
    q.add_argument("--like", type=Path, metavar="SAMPLES",
                   help="a samples folder whose generator, checkpoint, sampler, steps, guidance, batch size and "
                        "strength are the defaults (held-out draws, more seeds); needs --seed")
    q.add_argument("--classes", default="df,vasc,mel")
    q.add_argument("--per-class", type=int, default=800)
    q.add_argument("--out", type=Path, help="samples folder (default: named by what made it, under the run)")
    q.add_argument("--sampler", default=None, help="ddim | dpmpp (default: the generator's)")
    q.add_argument("--steps", type=int, default=None)
    q.add_argument("--guidance", type=float, default=None)
    q.add_argument("--seed", type=int, default=None, help="default 0")
    q.add_argument("--batch-size", type=int, default=None)
    q.add_argument("--checkpoint", default=None, help="'latest' (default), 'ema' or a checkpoint folder")
    q.add_argument("--strength", type=float, default=None,
                   help="< 1: image-to-image, each image a variation of a real train image of its class (this share "
                        "of the schedule re-run); 1 = from pure noise (default)")
    q.add_argument("--init-from", default=None, metavar="TARGET:SOURCE,...",
                   help="with --strength < 1: start a class's images from another class's real train images, e.g. "
                        "df:nv,vasc:nv (major-to-minor translation)")
    q.set_defaults(func=cmd_generate)

    q = sub.add_parser("quality", help="FD/KID, precision/recall/density/coverage, diversity, memorisation vs real floors")
    q.add_argument("--samples", required=True, type=Path)
    q.add_argument("--split", required=True, type=Path)
    q.add_argument("--out", type=Path, help="output folder (default SAMPLES/quality)")
    _add_cfg_args(q)
    q.set_defaults(func=cmd_quality)

    q = sub.add_parser("filter", help="keep realistic, correctly-classified, non-copied synthetic images")
    q.add_argument("--samples", required=True, type=Path)
    q.add_argument("--split", required=True, type=Path)
    q.add_argument("--classifier", type=Path, help="real-only classifier run for the class-confidence check")
    q.add_argument("--out", type=Path, help="output folder (default SAMPLES/filtered)")
    _add_cfg_args(q)
    q.set_defaults(func=cmd_filter)

    q = sub.add_parser("visual-check", help="a shuffled real/synthetic sheet for a human rater, and its scoring")
    q.add_argument("action", choices=["make", "score"])
    q.add_argument("--samples", type=Path)
    q.add_argument("--split", type=Path)
    q.add_argument("--out", required=True, type=Path, help="sheet folder")
    q.add_argument("--ratings", type=Path, help="score: the filled ratings CSV")
    q.add_argument("--per-class", type=int, default=50)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_visual_check)

    q = sub.add_parser("study", help="run or resume the whole grid: split, generator, samples, filter, quality, classifiers, report")
    _add_cfg_args(q)
    q.add_argument("--out", required=True, type=Path, help="study folder")
    q.add_argument("--dry-run", action="store_true",
                   help="say what a run would skip, resume, rerun (and delete) or run, and why; change nothing")
    q.set_defaults(func=cmd_study)

    q = sub.add_parser("report", help="build the HTML + Markdown report of a finished study")
    q.add_argument("study", type=Path)
    q.set_defaults(func=cmd_report)

    q = sub.add_parser("demo", help="the whole study on the built-in toy set, on CPU, in minutes")
    q.add_argument("--out", type=Path, default=Path("runs/demo"))
    q.set_defaults(func=cmd_demo)

    q = sub.add_parser("export", help="export a (filtered) samples folder as a Hugging Face imagefolder with a card")
    q.add_argument("samples", type=Path)
    q.add_argument("--out", required=True, type=Path)
    q.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    from dermsynth.config import ConfigError
    from dermsynth.io import DataError
    from dermsynth.runlog import setup_console

    args = build_parser().parse_args(argv)
    setup_console(args.verbose)
    try:
        result = args.func(args)
    except (DataError, ConfigError, FileNotFoundError) as e:
        print(f"dermsynth: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dermsynth: interrupted; finished work is kept, rerun to resume", file=sys.stderr)
        return 130
    if result is not None:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
