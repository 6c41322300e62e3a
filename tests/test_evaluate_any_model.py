"""The evaluation harness on models other than the digits DiT: another class count and width, a sample size the
digits feature network cannot take, text-conditional models with their captions, and a flow-matching one."""

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import diffsparse.evaluate.harness as evaluate_module
from diffsparse.evaluate.command import main
from diffsparse.evaluate.harness import UsageError, evaluate, parse_args
from diffsparse.models.captions import load_captions, save_captions
from diffsparse.models.sampling import split_conditions
from diffsparse.reference.model import REFERENCE_DIR

NOISE_SCHEDULE = REFERENCE_DIR / "noise_schedule.json"


def _rows(path):
    with open(path / "results.csv") as f:
        return list(csv.DictReader(f))


def save_dit(folder: Path, num_classes: int = 8, sample_size: int = 16) -> Path:
    """A random DiT of its own class count and width, saved as transformer/ + noise_schedule.json."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_embeds_ada_norm=num_classes, in_channels=1, out_channels=1, sample_size=sample_size, patch_size=2,
        num_layers=2, num_attention_heads=2, attention_head_dim=16, norm_num_groups=1,
    )  # fmt: skip
    model.save_pretrained(folder / "transformer")
    shutil.copy(NOISE_SCHEDULE, folder / "noise_schedule.json")
    return folder


@pytest.fixture
def recorded(monkeypatch):
    """Every call of the sampling loops: the conditions and keywords the runner passes."""
    calls = []
    batched, single = evaluate_module.sample_batched, evaluate_module.sample

    def sample_batched(model, scheduler, conditions, noise, steps, **kwargs):
        calls.append((conditions, kwargs))
        return batched(model, scheduler, conditions, noise, steps, **kwargs)

    def sample(model, scheduler, conditions, noise, steps, guidance, **kwargs):
        calls.append((conditions, kwargs))
        return single(model, scheduler, conditions, noise, steps, guidance, **kwargs)

    monkeypatch.setattr(evaluate_module, "sample_batched", sample_batched)
    monkeypatch.setattr(evaluate_module, "sample", sample)
    return calls


@pytest.fixture
def no_sampling(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("sampled before refusing")

    monkeypatch.setattr(evaluate_module, "sample_batched", fail)
    monkeypatch.setattr(evaluate_module, "sample", fail)


def test_an_8_class_dit_of_another_width_gets_fidelity_columns_and_its_own_classes(tmp_path, recorded):
    model, out = save_dit(tmp_path / "dit8"), tmp_path / "eval"
    evaluate(parse_args(["--model", str(model), "--quick", "--threads", "1", "--out", str(out)]))
    table = (out / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method |"))
    for column in ("PSNR vs dense", "SSIM vs dense", "L2 vs dense", "ΔL2 vs toca"):
        assert column in header
    assert "FD" not in header and "accuracy" not in header  # no feature network for this data: no such columns
    rows = _rows(out)
    peers = 1 if importlib.util.find_spec("cache_dit") else 0  # its row is skipped, with a note, where missing
    assert len(rows) == 12 + peers and not {"fd", "accuracy", "dfd"} & set(rows[0])
    assert all(float(r["psnr"]) > 0 for r in rows[1:])
    labels = torch.cat([conditions for conditions, _ in recorded])
    assert set(labels.tolist()) == set(range(8))  # classes 0..7 only, every one of them
    assert {kwargs["null_class"] for _, kwargs in recorded} == {8}  # guided with the model's own null class
    assert json.loads((out / "results.json").read_text())["config"]["feature_net"] == "none"
    assert "(2 per class)" in table and (out / "overview.png").is_file()


def test_a_feature_net_for_other_images_is_refused_before_sampling(tmp_path, no_sampling, capsys):
    model = save_dit(tmp_path / "dit24", num_classes=10, sample_size=24)
    argv = ["--model", str(model), "--quick", "--feature-net", "digits", "--out", str(tmp_path / "eval")]
    with pytest.raises(UsageError, match=r"takes 1 x 16 x 16 images \(or whole multiples.*decodes to 1 x 24 x 24"):
        evaluate(parse_args(argv))
    with pytest.raises(SystemExit):
        main(argv)
    assert "--feature-net none" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def _captions(path: Path, width: int = 32, count: int = 4, length: int = 6, pooled: int = 0, mask: bool = True,
              labels: list[int] | None = None):  # fmt: skip
    """Random caption embeddings in the format of `python -m diffsparse.captions`."""
    g = torch.Generator().manual_seed(0)
    tensors = {"prompt_embeds": torch.randn(count, length, width, generator=g),
               "negative_prompt_embeds": torch.randn(1, length, width, generator=g)}  # fmt: skip
    if mask:
        tensors |= {"prompt_attention_mask": torch.ones(count, length),
                    "negative_prompt_attention_mask": torch.ones(1, length)}  # fmt: skip
    if pooled:
        tensors |= {"pooled_prompt_embeds": torch.randn(count, pooled, generator=g),
                    "negative_pooled_prompt_embeds": torch.randn(1, pooled, generator=g)}  # fmt: skip
    if labels is not None:
        tensors["labels"] = torch.tensor(labels)
    return save_captions(path, tensors, [f"caption {i}" for i in range(count)])


def test_a_text_conditional_model_without_captions_is_refused_with_how_to_make_them(tmp_path, no_sampling):
    with pytest.raises(UsageError, match="--captions PATH.*python -m diffsparse.captions"):
        evaluate(parse_args(["--model", "tiny-pixart", "--quick", "--out", str(tmp_path)]))


def test_a_text_conditional_model_samples_its_captions_in_turn(tmp_path, recorded, monkeypatch):
    import diffsparse.models.sampling

    batches, inner = [], diffsparse.models.sampling.sample

    def sample(model, scheduler, conditions, *args, **kwargs):  # each batch `sample_batched` samples
        batches.append(conditions)
        return inner(model, scheduler, conditions, *args, **kwargs)

    monkeypatch.setattr(diffsparse.models.sampling, "sample", sample)
    captions, out = _captions(tmp_path / "captions.safetensors"), tmp_path / "eval"
    main(["--model", "tiny-pixart", "--quick", "--threads", "1", "--captions", str(captions), "--methods", "dense",
          "toca", "fbc", "--batch-size", "8", "--out", str(out)])  # fmt: skip
    rows = _rows(out)
    assert [r["method"] for r in rows] == ["dense", "toca", "FirstBlockCache"]
    assert "fd" not in rows[0] and all(float(r["ssim"]) > 0 for r in rows[1:])
    embeds = load_captions(captions)[0]["prompt_embeds"]
    for conditions, kwargs in recorded:  # sample i: caption i mod 4, guided with the empty prompt's embedding
        n = len(conditions["encoder_hidden_states"])
        assert torch.equal(conditions["encoder_hidden_states"], embeds[torch.arange(n) % 4])
        assert set(kwargs["null_conditions"]) == {"encoder_hidden_states", "encoder_attention_mask"}
    assert [len(c["encoder_hidden_states"]) for c in batches[-3:]] == [8, 8, 4]  # the last run, in batches of 8
    assert "the 4 captions of captions.safetensors in turn" in (out / "results.md").read_text()


def test_captions_with_classes_give_each_sample_its_class_for_accuracy(tmp_path):
    from diffsparse.evaluate.harness import make_conditions
    from diffsparse.models.loading import load_model

    captions = _captions(tmp_path / "captions.safetensors", labels=[3, 1, 4, 1])
    cfg = parse_args(["--model", "tiny-pixart", "--quick", "--captions", str(captions), "--out", str(tmp_path)])
    conditions = make_conditions(load_model("tiny-pixart"), cfg)
    assert conditions.labels.tolist() == [[3, 1, 4, 1][i % 4] for i in range(cfg.samples)]
    assert conditions.classes == 5 and conditions.distinct == 4  # classes 0..4 for accuracy; 4 captions
    plain = make_conditions(load_model("tiny-pixart"), parse_args(["--model", "tiny-pixart", "--quick", "--captions",
                            str(_captions(tmp_path / "plain.safetensors")), "--out", str(tmp_path)]))  # fmt: skip
    assert plain.labels is None and plain.classes is None


def test_a_flow_matching_model_gets_the_flow_sampler_and_refuses_ddim(tmp_path, no_sampling):
    captions = _captions(tmp_path / "captions.safetensors", mask=False, pooled=32)
    argv = ["--model", "tiny-flux", "--quick", "--captions", str(captions), "--out", str(tmp_path / "eval")]
    with pytest.raises(UsageError, match="flow-matching model: use flow"):
        evaluate(parse_args([*argv, "--sampler", "ddim"]))
    assert parse_args([*argv, "--sampler", "flow"]).sampler == "flow"


def test_a_flow_matching_model_runs_with_its_default_sampler_and_selector(tmp_path):
    captions = _captions(tmp_path / "captions.safetensors", mask=False, pooled=32)
    out = tmp_path / "eval"
    main(["--model", "tiny-flux", "--quick", "--threads", "1", "--captions", str(captions), "--methods", "dense",
          "uniform", "--samples", "4", "--out", str(out)])  # fmt: skip
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["sampler"] == "flow" and config["selector"] == "norm"
    assert float(_rows(out)[1]["mac_reduction"]) > 1.0


def test_dict_conditions_split_into_batches_with_the_noise():
    conditions = {"encoder_hidden_states": torch.arange(10).view(5, 2), "encoder_attention_mask": torch.ones(5, 3)}
    chunks = split_conditions(conditions, 2)
    assert [len(c["encoder_hidden_states"]) for c in chunks] == [2, 2, 1]
    assert torch.equal(torch.cat([c["encoder_hidden_states"] for c in chunks]), conditions["encoder_hidden_states"])
    with pytest.raises(ValueError, match="one batch size"):
        split_conditions({"a": torch.ones(3), "b": torch.ones(4)}, 2)
