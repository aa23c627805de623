"""Outputs in a shared results folder: what the atomic writers (`sfsd.io.atomic_path`, `atomic_dir`) rename
gets the permissions the umask gives ordinary files and folders, not the private 0600 / 0700 of mkstemp,
mkdtemp and transformers' save_pretrained. (A whole compressed folder: tests/test_dtype.py.)"""

from __future__ import annotations

import os

import pytest
import torch

from sfsd.io import atomic_dir, atomic_path, save_tensors, umask, write_json


@pytest.fixture
def set_umask():
    """Set the process's umask inside a test (restored after)."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_umask_is_read_without_changing_it(mask, set_umask):
    set_umask(mask)
    assert umask() == mask
    assert os.umask(mask) == mask  # unchanged by the read


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                     (0o002, 0o664, 0o775)])
def test_outputs_get_the_permissions_of_the_umask(mask, file_mode, dir_mode, set_umask, tmp_path):
    """Under umask 022 files 0644 and folders 0755 (027: 0640 / 0750; 002: 0664 / 0775): a file written by
    save_tensors and by write_json, a folder of atomic_dir with a file and a subfolder left private inside it
    (as save_pretrained leaves model.safetensors), and an executable file (0777 less the umask)."""
    set_umask(mask)
    save_tensors(tmp_path / "stats.safetensors", {"x": torch.ones(2)}, {"a": 1})
    write_json(tmp_path / "plan.json", {})
    with atomic_path(tmp_path / "rows.parquet") as tmp:
        tmp.write_bytes(b"x")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
        os.chmod(tmp / "model.safetensors", 0o600)
        (tmp / "sub").mkdir()
        os.chmod(tmp / "sub", 0o700)
        (tmp / "sub" / "inner.json").write_text("{}")
        os.chmod(tmp / "sub" / "inner.json", 0o600)
        (tmp / "tool.sh").write_text("#!/bin/sh\n")
        os.chmod(tmp / "tool.sh", 0o700)
    mode = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert mode == {"stats.safetensors": file_mode, "plan.json": file_mode, "rows.parquet": file_mode,
                    "folder": dir_mode, "folder/model.safetensors": file_mode, "folder/sub": dir_mode,
                    "folder/sub/inner.json": file_mode, "folder/tool.sh": dir_mode}


def test_a_failed_write_leaves_nothing(set_umask, tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
