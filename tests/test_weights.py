"""Reading `.pth` files without torch, and finding / checking / loading the Inception weights.

No network here: the weights are pytorch-fid's network with random values, saved by
`torch.save` in both of its formats; downloads go to a `file://` URL.
"""

import collections
import hashlib
import zipfile

import jax
import numpy as np
import pytest
import torch

from evaluation import convert_weights, inception, reference, weights
from pretrained import pth as pth_reader


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    model = reference.random_fid_inception(seed=1, calibration_images=0)
    return reference.state_dict_numpy(model)


@pytest.fixture(scope="module", params=["zip", "legacy"])
def pth(request, tmp_path_factory, state_dict):
    """The random FID Inception saved as pytorch-fid's file would be, in either format."""
    path = tmp_path_factory.mktemp(request.param) / weights.FID_WEIGHTS_NAME
    tensors = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state_dict.items())
    torch.save(tensors, path, _use_new_zipfile_serialization=request.param == "zip")
    return path


def _prefix(path) -> str:
    return weights.sha256_file(path)[:8]


@pytest.mark.parametrize("zip_format", [True, False])
def test_pth_reader_matches_torch_load(tmp_path, zip_format):
    x = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    saved = {
        "module": torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
        ).state_dict(),
        "permuted": x.permute(2, 0, 1),  # non-contiguous strides
        "slice": x[1, :, 1:3],  # storage offset
        "shared": [x, x[0]],  # one storage, two tensors
        "half": torch.randn(3, dtype=torch.float16),
        "bfloat16": torch.randn(3).bfloat16(),
        "int": torch.tensor([1, -2], dtype=torch.int32),
        "bool": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(7),
        "param": torch.nn.Parameter(torch.randn(2)),
    }
    path = tmp_path / "x.pth"
    torch.save(saved, path, _use_new_zipfile_serialization=zip_format)
    ref = torch.load(path, weights_only=True)
    got = pth_reader.read_pth(str(path))

    def check(g, r):
        if isinstance(r, dict):
            assert list(g) == list(r)
            for k in r:
                check(g[k], r[k])
        elif isinstance(r, list | tuple):
            for a, b in zip(g, r, strict=True):
                check(a, b)
        else:
            r = r.detach()
            want = r.float().numpy() if r.dtype == torch.bfloat16 else r.numpy()
            g = g.astype(np.float32) if r.dtype == torch.bfloat16 else g
            assert g.dtype == want.dtype and g.shape == want.shape
            np.testing.assert_array_equal(g, want)

    check(got, ref)


def test_read_weights_both_formats(pth, state_dict):
    got = weights.read_weights(pth, sha256_prefix=_prefix(pth))
    assert list(got) == list(state_dict)
    for k, v in state_dict.items():
        np.testing.assert_array_equal(got[k], v)


def test_load_inception_variables_from_config_path(pth, state_dict):
    variables = weights.load_inception_variables(str(pth), sha256_prefix=_prefix(pth))
    expected = inception.params_from_torch(state_dict)
    jax.tree.map(np.testing.assert_array_equal, variables, expected)
    # Converted once per process.
    assert weights.load_inception_variables(str(pth), sha256_prefix=_prefix(pth)) is variables


def test_wrong_hash_is_rejected_with_instructions(pth):
    with pytest.raises(weights.WeightsError) as err:
        weights.read_weights(pth)  # random weights: not the real file's sha256 prefix
    assert "6726825d" in str(err.value) and weights.FID_WEIGHTS_URL in str(err.value)


def test_missing_file_says_where_to_get_and_put_it(tmp_path):
    with pytest.raises(weights.WeightsError) as err:
        weights.load_inception_variables("", cache_dir=str(tmp_path), download=False)
    msg = str(err.value)
    assert weights.FID_WEIGHTS_URL in msg and str(tmp_path / weights.FID_WEIGHTS_NAME) in msg
    assert "inception_path" in msg and "convert_weights" in msg
    with pytest.raises(weights.WeightsError, match="not found"):
        weights.read_weights(tmp_path / "nope.pth")


def test_corrupt_files_are_rejected(tmp_path, pth):
    data = pth.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.WeightsError, match="cannot read"):
        weights.read_weights(truncated, sha256_prefix=None)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"<html>not found</html>")
    with pytest.raises(weights.WeightsError, match="cannot read"):
        weights.read_weights(garbage, sha256_prefix=None)
    # The cached file with the real name but other content: the hash check catches it.
    (tmp_path / weights.FID_WEIGHTS_NAME).write_bytes(data[:1000])
    with pytest.raises(weights.WeightsError, match="corrupt"):
        weights.load_inception_variables("", cache_dir=str(tmp_path), download=False)
    # A readable file that is some other network.
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(2, 3).state_dict(), other)
    with pytest.raises(weights.WeightsError, match="not the FID Inception"):
        weights.load_inception_variables(str(other), sha256_prefix=None)


def test_download_checks_the_hash(tmp_path, pth):
    url = pth.as_uri()  # file:// stands in for the release URL
    cache = tmp_path / "cache"
    with pytest.raises(weights.WeightsError, match="does not start"):
        weights.download_weights(str(cache), url=url, sha256_prefix="00000000")
    assert not any(cache.iterdir())  # nothing half-written left behind
    got = weights.download_weights(str(cache), url=url, sha256_prefix=_prefix(pth))
    assert got == cache / weights.FID_WEIGHTS_NAME and got.read_bytes() == pth.read_bytes()
    with pytest.raises(weights.WeightsError, match="could not download"):
        weights.download_weights(str(tmp_path / "c2"), url=(tmp_path / "absent").as_uri())


def test_convert_weights_npz_roundtrip(tmp_path, pth, state_dict):
    out = tmp_path / "inception.npz"
    rc = convert_weights.main(["--pth", str(pth), "--out", str(out), "--check", "--no-hash-check"])
    assert rc == 0
    assert weights.sha256_file(out) == hashlib.sha256(out.read_bytes()).hexdigest()
    got = weights.read_weights(out, sha256_prefix=_prefix(pth))  # the source's hash
    for k, v in state_dict.items():
        np.testing.assert_array_equal(got[k], v)
    variables = weights.load_inception_variables(str(out), sha256_prefix=_prefix(pth))
    assert variables["params"]["fc"]["kernel"].shape == (2048, 1008)
    with pytest.raises(weights.WeightsError, match="does not start"):
        weights.read_weights(out)  # converted from random weights, not pytorch-fid's file


def test_npz_without_manifest_or_tampered_is_rejected(tmp_path, state_dict):
    plain = tmp_path / "plain.npz"
    np.savez(plain, **state_dict)
    with pytest.raises(weights.WeightsError, match="manifest"):
        weights.read_weights(plain, sha256_prefix=None)
    small = {"fc.bias": np.zeros(3, np.float32), "fc.weight": np.ones((3, 2), np.float32)}
    good = tmp_path / "good.npz"
    weights.write_npz(good, small, source_sha256="ab" * 32)
    assert set(weights.read_weights(good, sha256_prefix="abab")) == set(small)
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["fc.bias"] = arrays["fc.bias"] + 1
    tampered = tmp_path / "tampered.npz"
    np.savez(tampered, **arrays)
    with pytest.raises(weights.WeightsError, match="digest"):
        weights.read_weights(tampered, sha256_prefix=None)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(good.read_bytes()[:100])
    with pytest.raises(weights.WeightsError, match="cannot read"):
        weights.read_weights(broken, sha256_prefix=None)
    assert zipfile.is_zipfile(good)
