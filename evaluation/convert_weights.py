"""One-time conversion of pytorch-fid's `.pth` weights to a checked `.npz` (optional).

The evaluation reads the `.pth` directly, without torch, so this step is not needed. It
exists for two cases: checking the torch-free reader against `torch.load` on the real
file (`--check`, needs torch), and a `.pth` the reader cannot parse (`--reader torch`).

    python -m evaluation.convert_weights --pth pt_inception-2015-12-05-6726825d.pth \
        --out ~/.cache/immiscible_cm/pt_inception-2015-12-05.npz [--check]

then set `--config.eval.inception_path` to the `.npz`. It stores the same tensor names
and a manifest (source sha256, content digest) that the loader verifies.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from evaluation import inception, weights
from pretrained import pth as pth_reader


def _torch_state_dict(path: str) -> dict[str, np.ndarray]:
    import torch  # only this optional path needs torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return {k: v.detach().cpu().numpy() for k, v in obj.items()}


def convert(
    pth: str,
    out: str,
    reader: str = "builtin",
    check: bool = False,
    sha256_prefix: str | None = weights.FID_WEIGHTS_SHA256_PREFIX,
) -> str:
    """Converts `pth` to `out`; returns the sha256 of the written `.npz`.

    Args:
      pth: pytorch-fid's weights file.
      out: the `.npz` to write.
      reader: 'builtin' (no torch) or 'torch' (`torch.load`).
      check: also read with the other reader and require identical tensors.
      sha256_prefix: what the `.pth`'s sha256 must start with; None skips the check.

    Raises:
      weights.WeightsError: wrong hash; ValueError: the two readers disagree.
    """
    source_sha = weights.sha256_file(pth)
    if sha256_prefix and not source_sha.startswith(sha256_prefix):
        raise weights.WeightsError(
            f"{pth}: sha256 {source_sha[:16]}... does not start with {sha256_prefix}"
        )
    readers = {"builtin": pth_reader.read_state_dict, "torch": _torch_state_dict}
    state_dict = readers[reader](pth)
    if check:
        other = readers["torch" if reader == "builtin" else "builtin"](pth)
        if sorted(other) != sorted(state_dict):
            raise ValueError("the two readers found different tensor names")
        for k, v in state_dict.items():
            if v.dtype != other[k].dtype or not np.array_equal(v, other[k]):
                raise ValueError(f"the two readers disagree on {k!r}")
    inception.params_from_torch(state_dict)  # fails loudly if it is not the FID Inception
    return weights.write_npz(out, state_dict, source_sha)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pth", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--reader", choices=("builtin", "torch"), default="builtin")
    parser.add_argument("--check", action="store_true", help="compare with the other reader")
    parser.add_argument("--no-hash-check", action="store_true", help="accept other weights")
    args = parser.parse_args(argv)
    prefix = None if args.no_hash_check else weights.FID_WEIGHTS_SHA256_PREFIX
    digest = convert(args.pth, args.out, args.reader, args.check, prefix)
    print(f"wrote {args.out}\nsha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
