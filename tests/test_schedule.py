import json

import numpy as np
import pytest

from diffsparse import SPARSITY_LEVELS, Schedule, ScheduleError
from diffsparse.levels import fresh_tokens

UNITS = ["transformer_blocks.0.attn1", "transformer_blocks.0.ff", "transformer_blocks.1.attn1"]


def test_uniform_forces_first_step_full():
    s = Schedule.uniform(UNITS, num_steps=5, sparsity=0.75)
    assert s.grid.shape == (5, 3)
    assert (s.grid[0] == 0).all() and (s.grid[1:] == 0.75).all()
    assert s.full_steps == [0]
    assert s.mean_sparsity() == pytest.approx(0.75 * 4 / 5)


@pytest.mark.parametrize(
    "grid, message",
    [
        ([[0, 0, 0], [0.3, 0, 0]], "not in S"),
        ([[0, 0, 0], [1.5, 0, 0]], "not in S"),
        ([[0, 0, 0], [float("nan"), 0, 0]], "not in S"),
        ([[0.25, 0, 0], [0, 0, 0]], "Row 0"),
        ([[0, 0], [0, 0]], "columns"),
        ([0, 0, 0], "2-D"),
    ],
)
def test_bad_grids_are_rejected_with_a_reason(grid, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule(grid, UNITS)


def test_from_array_can_force_the_first_step():
    s = Schedule.from_array([[0.5, 0.5, 0.5], [0.25, 1.0, 0.0]], UNITS, force_first_step=True)
    assert s.grid[0].tolist() == [0, 0, 0] and s.grid[1].tolist() == [0.25, 1.0, 0.0]


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    grid = rng.choice(SPARSITY_LEVELS, size=(7, 3))
    grid[0] = 0
    s = Schedule(grid, UNITS, meta={"method": "test", "budget": 0.5})
    path = s.save(tmp_path / "sub" / "s.json")
    loaded = Schedule.load(path)
    assert loaded == s and loaded.meta == s.meta
    assert [p.name for p in path.parent.iterdir()] == ["s.json"]  # no temp file left behind


def test_failed_save_leaves_old_file_intact(tmp_path, monkeypatch):
    s = Schedule.uniform(UNITS, 3, 0.5)
    path = s.save(tmp_path / "s.json")
    before = path.read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("diffsparse.schedule.os.replace", boom)
    with pytest.raises(OSError):
        Schedule.uniform(UNITS, 3, 0.25).save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "something-else"}', "not a diffsparse schedule"),
        ('{"format": "diffsparse.schedule", "version": 1, "units": ["a"]}', "no 'sparsity'"),
    ],
)
def test_corrupt_files_raise_clear_errors(tmp_path, text, message):
    path = tmp_path / "s.json"
    path.write_text(text)
    with pytest.raises(ScheduleError, match=message):
        Schedule.load(path)


def test_truncated_file_raises(tmp_path):
    path = Schedule.uniform(UNITS, 4, 0.5).save(tmp_path / "s.json")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ScheduleError, match="corrupt or truncated"):
        Schedule.load(path)
    data = json.loads(Schedule.uniform(UNITS, 4, 0.5).save(tmp_path / "t.json").read_text())
    data["sparsity"][2] = data["sparsity"][2][:1]
    path.write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="one value per unit"):
        Schedule.load(path)


def test_missing_file():
    with pytest.raises(ScheduleError, match="No schedule file"):
        Schedule.load("/nonexistent/s.json")


def test_resample_keeps_shape_and_first_step():
    grid = np.zeros((4, 3))
    grid[1:] = [[0.25, 0.5, 0.75], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]
    s = Schedule(grid, UNITS)
    up = s.resample(10)
    assert up.num_steps == 10 and (up.grid[0] == 0).all()
    assert (up.grid[-1] == s.grid[-1]).all()
    assert set(map(tuple, up.grid.tolist())) == set(map(tuple, s.grid.tolist()))
    assert s.resample(4) == s
    assert s.resample(1).grid.tolist() == [[0, 0, 0]]


def test_check_units_names_the_difference():
    s = Schedule.uniform(UNITS, 3, 0.5)
    s.check_units(UNITS)
    with pytest.raises(ScheduleError, match="made for 3 units but the model has 2"):
        s.check_units(UNITS[:2])


def test_plot_writes_png(tmp_path):
    path = Schedule.uniform(UNITS, 6, 0.5).plot(tmp_path / "heat.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "s, n, k", [(0.0, 16, 16), (1.0, 16, 0), (0.5, 16, 8), (0.75, 16, 4), (0.25, 3, 2), (0.75, 2, 1), (0.25, 2, 1)]
)
def test_fresh_tokens(s, n, k):
    assert fresh_tokens(s, n) == k


def test_atomic_writes_leave_the_old_file_on_an_error_and_no_temporaries(tmp_path):
    from diffsparse.files import atomic_path

    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".json" and tmp.parent == tmp_path
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_check_units_says_when_only_the_order_differs():
    s = Schedule.uniform(UNITS, 3, 0.5)
    swapped = [UNITS[0], UNITS[2], UNITS[1]]
    with pytest.raises(ScheduleError, match="in another order") as info:
        s.check_units(swapped)
    message = str(info.value)
    assert "column 1" in message and f"schedule has {UNITS[1]!r}" in message and f"model has {UNITS[2]!r}" in message
    assert "missing" not in message


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_written_files_get_the_usual_mode(tmp_path, umask):
    import os
    import stat

    from diffsparse.files import atomic_path

    old = os.umask(umask)
    try:
        s = Schedule.uniform(UNITS, 3, 0.5)
        written = [s.save(tmp_path / "schedule.json"), s.plot(tmp_path / "schedule.png")]
        with atomic_path(tmp_path / "other.txt") as tmp:
            tmp.write_text("x")
        written.append(tmp_path / "other.txt")
        s.save(tmp_path / "schedule.json")  # replacing a file: same mode again
    finally:
        os.umask(old)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt", "schedule.json", "schedule.png"]
