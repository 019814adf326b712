"""How much does the classifier's data path cost? Training throughput with the real data path divided by throughput on
the same batches already prepared on the device (goal on GPU: >= 0.9).

    real:   uint8 cache (memory-mapped .npy) -> GPU-resident tensor (or host memory on CPU) -> per-step gather,
            batched augmentation (dihedral flips/rotations, colour jitter[, RandAugment]), normalisation, channels_last
    ideal:  a few batches augmented and normalised in advance, already on the device, cycled

Both run the same model, optimiser and bf16 autocast (on CUDA), in alternating blocks so that a shared machine's noise
hits both alike; the ratio printed is the median over blocks.

    python bench/bench_clf_datapath.py                                  # random images, 128 px, Lite0
    python bench/bench_clf_datapath.py --split runs/x/split.json --size 64 --device cpu --model test_efficientnet
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dermsynth.classify.config import ClfConfig, ModelConfig
from dermsynth.classify.models import build_model
from dermsynth.classify.predict import autocast
from dermsynth.classify.sampling import epoch_order, shard_batches
from dermsynth.classify.train import _batch, _image_tensor


def _images(args: argparse.Namespace, tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, S, S, 3) memory-mapped images and labels: a split's train part, or random ones shaped alike."""
    if args.split:
        from dermsynth.classify.data import labels_of, load_clf_data, load_images, open_caches

        cfg = ClfConfig()
        cfg.data.split, cfg.data.image_size = str(args.split), args.size
        data = load_clf_data(cfg)
        arr = load_images(data.train, args.size, None, open_caches(data.manifests, args.size, None))
        labels = labels_of(data.train)
    else:
        rng = np.random.default_rng(0)
        arr = rng.integers(0, 256, (args.n, args.size, args.size, 3), dtype=np.uint8)
        labels = rng.integers(0, 7, args.n)
    np.save(tmp / "images.npy", arr)
    return np.load(tmp / "images.npy", mmap_mode="r"), labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--n", type=int, default=4096, help="random images when no --split is given")
    p.add_argument("--split", type=Path, help="use this split's train part (cached at --size)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=3, help="alternating real/ideal blocks")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--randaugment", action="store_true")
    args = p.parse_args()

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    cfg = ClfConfig()
    cfg.train.augment.randaugment = args.randaugment
    torch.manual_seed(0)
    model, norm = build_model(ModelConfig(name=args.model, pretrained="none"))
    model.to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    with tempfile.TemporaryDirectory() as tmp:
        arr, labels = _images(args, Path(tmp))
        resident = device.type == "cuda"
        images = _image_tensor(np.array(arr), device, resident)  # training copies its rows out of the memmap too
        y = torch.from_numpy(np.array(labels, dtype=np.int64)).to(device)
        batches = shard_batches(epoch_order(labels, 0, 0), args.batch_size)
        ready = [_batch(images, y, batches[i], device, cfg, norm, torch.Generator().manual_seed(i))
                 for i in range(min(8, len(batches)))]

        def step(x: torch.Tensor, t: torch.Tensor) -> None:
            with autocast(device, True):
                loss = loss_fn(model(x).float(), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def block(real: bool, offset: int) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for k in range(args.steps):
                i = (offset + k) % len(batches)
                x, t = (_batch(images, y, batches[i], device, cfg, norm, torch.Generator().manual_seed(i)) if real
                        else ready[k % len(ready)])
                step(x, t)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return args.steps * args.batch_size / (time.perf_counter() - t0)

        block(True, 0), block(False, 0)  # warm-up (cudnn autotuning, allocator, page cache)
        real, ideal = [], []
        for b in range(args.blocks):
            real.append(block(True, b * args.steps))
            ideal.append(block(False, 0))
    ratios = [r / i for r, i in zip(real, ideal)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"date {datetime.date.today()}  device {name}  model {args.model}  {args.size}px  batch {args.batch_size}"
          f"  randaugment {args.randaugment}  images {'GPU-resident' if device.type == 'cuda' else 'host'}")
    print(f"real data path  {statistics.median(real):9.1f} img/s")
    print(f"on-device       {statistics.median(ideal):9.1f} img/s")
    print(f"ratio           {statistics.median(ratios):9.3f}  (blocks: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"goal >= 0.9 on GPU)")


if __name__ == "__main__":
    main()
