"""Files are written whole or not at all, with the usual mode of a new file, whoever writes them."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from diffsparse.files import atomic_path, write_json


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_writer_that_replaces_its_file_still_gets_the_usual_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "costs.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))  # safetensors writes a new file with mode 0600
        write_json(tmp_path / "metrics.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("costs.safetensors", "metrics.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_a_failed_write_leaves_the_old_file(tmp_path):
    write_json(tmp_path / "metrics.json", {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "metrics.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert (tmp_path / "metrics.json").read_text() == '{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
