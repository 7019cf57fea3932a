"""Images/s of the Flax FID Inception (`pool_features`) and of pytorch-fid on the same images.

    python bench/fid.py                      # CPU: a few images; accelerator: 10,000
    python bench/fid.py --n 50000 --size 32  # the CIFAR-10 FID workload

Random weights (speed does not depend on them). pytorch-fid runs in the same process when
torch and pytorch-fid are installed (on CUDA if torch sees it), on the same uint8 images,
and the ratio is printed; `--parity` also prints the features' relative difference.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from evaluation import inception  # noqa: E402


def _row(name: str, device: str, n: int, seconds: float) -> float:
    rate = n / seconds
    print(f"{name:<28} {device:<28} {n:>7} {rate:>11.1f} {50_000 / rate:>10.1f}")
    return rate


def bench_flax(
    variables, images: np.ndarray, batch: int, precision: str
) -> tuple[float, np.ndarray]:
    """Seconds for `pool_features` on all images, after a compiling warm-up."""
    inception.pool_features(variables, images[:batch], batch_size=batch, precision=precision)
    start = time.perf_counter()
    feats = inception.pool_features(variables, images, batch_size=batch, precision=precision)
    return time.perf_counter() - start, feats


def bench_torch(model, images: np.ndarray, batch: int, device: str) -> tuple[float, np.ndarray]:
    """Seconds for pytorch-fid's wrapper (resize, scale, pool) on all images, after a warm-up."""
    import torch

    from evaluation import reference

    wrapper = reference.fid_wrapper(model).to(device)

    @torch.no_grad()
    def run(x_all: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(x_all), batch):
            x = torch.from_numpy(x_all[start : start + batch]).to(device)
            x = x.permute(0, 3, 1, 2).float().div(255)  # as ToTensor
            out.append(wrapper(x)[0][:, :, 0, 0].cpu())
        return torch.cat(out).numpy()

    run(images[:batch])
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    feats = run(images)
    return time.perf_counter() - start, feats


def main() -> None:
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16 if on_cpu else 10_000, help="images")
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--batch-size", type=int, default=8 if on_cpu else 500)
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["highest"] if on_cpu else ["highest", "default"],
        help="Flax convolution precisions to time ('default' allows TF32 on GPUs)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip pytorch-fid")
    parser.add_argument("--parity", action="store_true", help="print feature differences")
    parser.add_argument(
        "--torch-no-tf32", action="store_true", help="full f32 convolutions in pytorch-fid"
    )
    args = parser.parse_args()

    images = np.random.default_rng(0).integers(
        0, 256, (args.n, args.size, args.size, 3), dtype=np.uint8
    )
    model = None
    try:
        if args.no_torch:
            raise ImportError
        import torch

        from evaluation import reference

        model = reference.random_fid_inception(seed=0, calibration_images=4 if args.parity else 0)
        variables = inception.params_from_torch(reference.state_dict_numpy(model))
        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.torch_no_tf32:  # cuDNN allows TF32 convolutions by default
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
    except ImportError:
        variables = inception.init_params(jax.random.key(0))

    device = str(jax.devices()[0].device_kind)
    print(
        f"{args.n} images {args.size}x{args.size}, batch {args.batch_size}; last column: "
        "seconds per 50,000 images"
    )
    print(f"{'implementation':<28} {'device':<28} {'images':>7} {'images/s':>11} {'50k s':>10}")
    flax_rates = {}
    for precision in args.precision:
        seconds, feats = bench_flax(variables, images, args.batch_size, precision)
        name = f"flax pool_features ({precision})"
        flax_rates[precision] = _row(name, f"{jax.default_backend()}: {device}", args.n, seconds)
    if model is None:
        print("pytorch-fid: not installed, skipped")
        return
    torch_name = torch.cuda.get_device_name() if torch_device == "cuda" else "cpu"
    if torch_device == "cpu":
        torch_name += f" ({torch.get_num_threads()} threads)"
    seconds, torch_feats = bench_torch(model, images, args.batch_size, torch_device)
    tf32 = torch.backends.cudnn.allow_tf32 if torch_device == "cuda" else False
    torch_rate = _row(
        f"pytorch-fid (tf32 conv {tf32})", f"torch {torch_device}: {torch_name}", args.n, seconds
    )
    for precision, rate in flax_rates.items():
        print(f"ratio flax ({precision}) / pytorch-fid: {rate / torch_rate:.2f}")
    if args.parity:
        for precision in args.precision:
            _, feats = bench_flax(variables, images[: args.batch_size], args.batch_size, precision)
            ref = torch_feats[: args.batch_size]
            rel = np.abs(feats - ref).max() / np.abs(ref).max()
            print(f"max |flax ({precision}) - pytorch-fid| / max |pytorch-fid| = {rel:.2e}")


if __name__ == "__main__":
    main()
