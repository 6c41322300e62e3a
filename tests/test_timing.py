"""The one timing helper: warm-up of every run, strict alternation, set-up outside the clock, median and min-max."""

import os

import pytest

from diffsparse import clock as clock_module
from diffsparse.evaluate import timing
from diffsparse.evaluate.timing import Speedup, Stopwatch, allocator_note, alternate, speedup, timed


def test_runs_alternate_after_one_warm_up_round_and_keep_the_last_outputs():
    calls = []
    runs = {name: timed(lambda name=name: calls.append(name) or len(calls)) for name in ("dense", "a", "b")}
    timings = alternate(runs, rounds=3)
    assert calls == ["dense", "a", "b"] * 4  # one warm-up round, then three timed ones
    assert {name: len(s) for name, s in timings.seconds.items()} == {"dense": 3, "a": 3, "b": 3}
    assert timings.outputs == {"dense": 10, "a": 11, "b": 12}
    s = timings.speedup("a")
    assert s.low <= s.median <= s.high and timings.speedup("dense") == Speedup(1.0, 1.0, 1.0)


def test_speedup_is_the_median_and_spread_of_per_round_ratios(monkeypatch):
    # dense takes 6, 6, 6 s; the method 2, 3, 1 s (after the warm-up): ratios 3, 2, 6
    durations = iter([1.0, 1.0, 6.0, 2.0, 6.0, 3.0, 6.0, 1.0])
    clock = iter(x for d in durations for x in (0.0, d))
    monkeypatch.setattr(clock_module.time, "perf_counter", lambda: next(clock))
    result = speedup(timed(lambda: None), timed(lambda: None), rounds=3)
    assert result == Speedup(3.0, 2.0, 6.0)
    assert result.as_row() == {"speedup": 3.0, "speedup_min": 2.0, "speedup_max": 6.0}


def test_set_up_outside_the_stopwatch_is_not_timed(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(clock_module.time, "perf_counter", lambda: now[0])

    def run(clock: Stopwatch):
        now[0] += 100.0  # set-up (applying a cache, copying a model)
        with clock:
            now[0] += 2.0

    assert alternate({"dense": run}, rounds=2).seconds["dense"] == [2.0, 2.0]


def test_a_run_that_never_starts_its_stopwatch_and_zero_rounds_are_refused():
    with pytest.raises(RuntimeError, match="with clock:"):
        alternate({"dense": lambda clock: None}, rounds=1)
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        alternate({"dense": timed(lambda: None)}, rounds=0)


def test_the_cpu_needs_no_synchronising():
    clock_module.synchronize("cpu")  # a no-op, also where CUDA is absent
    clock_module.synchronize(None)
    with Stopwatch("cpu") as watch:
        pass
    assert watch.seconds >= 0.0


def test_cpu_speed_ups_say_how_host_memory_was_allocated(monkeypatch):
    for key in [k for k in os.environ if k.startswith("MALLOC_")] + ["GLIBC_TUNABLES"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(timing, "_loaded_allocator", lambda: None)
    monkeypatch.setattr(timing.platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert allocator_note() == "glibc malloc as it comes (dense time can vary between processes)"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "17179869184")
    assert allocator_note("cpu") == "glibc malloc with MALLOC_TRIM_THRESHOLD_=17179869184"
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=512:glibc.malloc.mmap_threshold=1073741824")
    assert allocator_note() == "glibc malloc with glibc.malloc.mmap_threshold=1073741824"
    assert allocator_note("cuda") == ""  # host memory is not what a GPU row waits on
    monkeypatch.setattr(timing, "_loaded_allocator", lambda: "jemalloc")
    assert allocator_note() == "host allocator jemalloc"
    monkeypatch.setattr(timing, "_loaded_allocator", lambda: None)
    monkeypatch.setattr(timing.platform, "libc_ver", lambda: ("", ""))  # musl, macOS, Windows: nothing to say
    assert allocator_note() == ""


def test_the_allocator_is_read_from_what_the_process_mapped(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f0000000000-7f0000001000 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert timing._loaded_allocator(str(maps)) is None
    maps.write_text(maps.read_text() + "7f0000002000-7f0000003000 r-xp 00000000 08:01 43 /usr/lib/libtcmalloc.so.4\n")
    assert timing._loaded_allocator(str(maps)) == "tcmalloc"
    assert timing._loaded_allocator(str(tmp_path / "missing")) is None  # no /proc (macOS): nothing known
