from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small synthetic SurgΣ-DB-format data set (2 train videos, 1 held-out), made once per session."""
    from surgsigma_train.data.demo import write_demo_dataset

    out = tmp_path_factory.mktemp("demo_data")
    write_demo_dataset(out, seed=0, n_train_videos=2, n_heldout_videos=1)
    return out


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
