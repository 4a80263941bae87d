"""The commit protocol: a write that fails halfway leaves no committed folder; keep_last prunes."""

import pytest

from surgsigma_train.training import checkpoint as ckpt


def write_file(tmp):
    (tmp / "weights.bin").write_bytes(b"x")


def test_commit_rename_and_keep_last(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, write_file, keep_last=2)
    assert [p.name for p in ckpt.committed_checkpoints(tmp_path)] == ["step-2", "step-3"]
    assert (tmp_path / "step-3" / ckpt.COMMIT_MARKER).is_file()


def test_failed_write_never_commits_and_is_cleaned(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, write_file)

    def fail_halfway(tmp):
        write_file(tmp)
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, fail_halfway)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-1"
    assert ckpt.clean_uncommitted(tmp_path) == [tmp_path / "step-2.tmp"]
