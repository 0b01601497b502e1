"""A small real run that the reliability tests copy and then break."""

from pathlib import Path

import pytest

from cct.cli import main
from tests.helpers import TINY_RUN


@pytest.fixture(scope="session")
def one_epoch_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch TINY_RUN (state at step 8): last/best weights, training state, metrics."""
    run_dir = tmp_path_factory.mktemp("reliability") / "one-epoch"
    args = ["train", "keras-example", *TINY_RUN, "--set", "epochs=1", "--data-dir", str(data_root),
            "--out", str(run_dir)]
    assert main(args) == 0
    return run_dir
