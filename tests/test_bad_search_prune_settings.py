"""Bad search and prune settings are refused up front, naming the setting, before any model is loaded or anything
is written."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_tiny(experiment: str, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        args = [f"experiment={experiment}", "logger=csv", f"output_dir={out}"]
        return compose(config_name="train", overrides=[*args, *overrides])


def refuses_without_loading(monkeypatch, module, loader: str):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(module, loader, no_load)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.generations=0", "search.generations"),
        ("search.samples=0", "search.samples"),
        ("search.population=0", "search.population"),
        ("search.survivors=0", "search.survivors"),
        ("search.offspring=-1", "search.offspring"),
        ("search.minutes=0", "search.minutes"),
        ("search.minutes=-2", "search.minutes"),
        ("search.budget=-0.3", "search.budget"),
        ("search.budget=0", "search.budget"),
        ("search.budget=1", "search.budget"),
    ],
)
def test_search_refuses_bad_settings_before_any_work(override, message, tmp_path, monkeypatch):
    from diffsparse.tasks import search

    refuses_without_loading(monkeypatch, search, "load_configured_model")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        search.search_schedule(compose_tiny("tiny_search", out, override))
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["prune.levels=0"], "prune.levels"),
        (["prune.samples=0"], "prune.samples"),
        (["prune.num_steps=0"], "prune.num_steps"),
        (["prune.damp=0"], "prune.damp"),
        (["prune.damp=-0.01"], "prune.damp"),
        (["prune.schedule=mosaic", "prune.boundaries=[500]"], "prune.boundaries"),
        (["prune.schedule=mosaic", "prune.boundaries=[700,400,100]"], "prune.boundaries"),
    ],
)
def test_prune_refuses_bad_settings_before_any_work(overrides, message, tmp_path, monkeypatch):
    from diffsparse.tasks import prune

    refuses_without_loading(monkeypatch, prune, "load_model")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        prune.prune(compose_tiny("tiny_prune", out, *overrides))
    assert not out.exists() or not any(out.iterdir())
