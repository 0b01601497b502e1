"""Bounded, reproducible fuzzing of the two inputs a user hands `cct` most: `--set KEY=VALUE` overrides of
`cct train` and image files given to `cct predict`. Whatever the input, `cct` ends with exit 0, or with exit
1 or 2 and one line on stderr: never a traceback. `derandomize=True`: CI runs the same examples every time."""

from __future__ import annotations

import contextlib
import io
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import cct
from cct.cli import main
from cct.models.checkpoint import model_metadata
from cct.train.config import FIELDS
from cct.train.state import save_weights

FUZZ = settings(max_examples=500, deadline=timedelta(seconds=5), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _cct(argv: list[str]) -> tuple[int, str]:
    """`cct ARGV` in this process: its exit code and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def _assert_clean(code: int, err: str) -> None:
    assert code in (0, 1, 2), (code, err)
    if code:
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


# values as a user might type them: numbers (also huge, negative, nan/inf), booleans, null, words, lists, and
# fragments of YAML syntax
_SCALARS = st.one_of(st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                     st.none(), st.sampled_from(["cifar10", "imagenet", "bf16", "skip", "cosine", "rand-m9-n2"]))
_VALUES = st.one_of(_SCALARS.map(lambda v: "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)),
                    st.lists(_SCALARS, max_size=3).map(lambda v: str(v).replace("None", "null")),
                    st.text(alphabet="ab01.-+e:[]{},'\" #&*!|>%@`\n", max_size=12))


@pytest.fixture(scope="module")
def no_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty data folder and a run folder: an accepted configuration stops at loading data (exit 1)."""
    return tmp_path_factory.mktemp("fuzz-train")


@FUZZ
@given(key=st.one_of(st.sampled_from(sorted(FIELDS)), st.text(max_size=10)), value=_VALUES)
def test_fuzz_set_overrides(no_data, key, value):
    argv = ["train", "keras-example", "--set", f"{key}={value}", "--set", "dataset=cifar10",
            "--data-dir", str(no_data / "data"), "--out", str(no_data / "run")]
    _assert_clean(*_cct(argv))


SEEDS = ("png", "jpeg", "gif", "webp", "bmp")


@pytest.fixture(scope="module")
def predict_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cct_2_3x2_32 checkpoint (random weights, saved as training saves them) and one good image file of
    each format that torchvision or Pillow decodes, to mutate."""
    folder = tmp_path_factory.mktemp("fuzz-predict")
    model = cct.create_model("cct_2_3x2_32")
    meta = model_metadata(model, "cct_2_3x2_32", [str(i) for i in range(10)], (0.5,) * 3, (0.5,) * 3, "cifar10")
    save_weights(folder / "model.safetensors", model, meta)
    pixels = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    for fmt in SEEDS:
        Image.fromarray(pixels).save(folder / f"seed.{fmt}", format=fmt)
    return folder


@st.composite
def _mutated(draw, seed: bytes) -> bytes:
    """A real image file with a few bytes replaced, inserted or cut off (headers and chunk lengths included)."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["replace", "insert", "truncate"]))
        if action == "replace":
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:]
            data = data or bytearray(b"\0")
    return bytes(data)


@FUZZ
@given(data=st.data())
def test_fuzz_predict_image_bytes(predict_files, data):
    kind = data.draw(st.sampled_from(["random", *SEEDS]))
    if kind == "random":
        content = data.draw(st.binary(max_size=256))
    else:
        content = data.draw(_mutated((predict_files / f"seed.{kind}").read_bytes()))
    image = predict_files / "fuzzed"
    image.write_bytes(content)
    _assert_clean(*_cct(["predict", str(predict_files / "model.safetensors"), str(image)]))
