"""RandAugment throughput: torchvision's per-image loop against dermsynth's grouped application, same run.

    python bench/bench_randaugment.py                     # GPU if there is one: batch 64 at 128 px
    python bench/bench_randaugment.py --device cpu --repeats 5

Both paths draw one (op, sign) per image per slot from torchvision's RandAugment space (num_ops 2, magnitude 9); the
reference calls ``v2.RandAugment`` once per image (what dermsynth did before), dermsynth groups the images that drew
the same op into one call of torchvision's op code. Random uint8 images; speed does not depend on their values.
Prints one line per path and the ratio.
"""
from __future__ import annotations

import argparse
import json

import torch

from bench_sampling import _time  # bench/ is on sys.path when a script in it runs
from dermsynth.classify.augment import randaugment, randaugment_per_image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    torch.manual_seed(0)
    x = torch.randint(0, 256, (a.batch, 3, a.size, a.size), dtype=torch.uint8, device=device)
    rows = {"per-image loop (torchvision)": _time(lambda: randaugment_per_image(x, 2, 9), a.repeats, device),
            "grouped (dermsynth)": _time(lambda: randaugment(x, 2, 9), a.repeats, device)}
    base = rows["per-image loop (torchvision)"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, batch {a.batch}, {a.size} px, {a.repeats} repeats")
    for k, s in rows.items():
        print(f"{k:30s} {s * 1000:8.1f} ms/batch {a.batch / s:9.0f} img/s {base / s:6.2f}x")
    print(json.dumps({"device": name, "batch": a.batch, "size": a.size,
                      "img_per_s": {k: a.batch / s for k, s in rows.items()}, "ratio": base / rows["grouped (dermsynth)"]}))


if __name__ == "__main__":
    main()
