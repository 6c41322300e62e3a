"""Text-conditional models: caption embeddings on disk, our sampling loop against the stock pipeline, learning."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffsparse.backbones import tiny_pipeline
from diffsparse.backbones.tiny_parts import TINY_VOCABULARY
from diffsparse.models.captions import encode_captions, load_captions, main, null_conditions, save_captions
from diffsparse.models.sampling import initial_noise, sample

ROOT = Path(__file__).resolve().parents[1]
DIGITS = TINY_VOCABULARY[TINY_VOCABULARY.index("zero") :][:10]
CAPTIONS = [f"a {colour} drawing of the digit {d}" for colour in ("red", "blue") for d in DIGITS[:8]]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("pixart")


@pytest.fixture(scope="module")
def captions_file(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("captions") / "captions.safetensors"
    return save_captions(path, encode_captions(pipe, CAPTIONS, max_sequence_length=10), CAPTIONS)


def test_embeddings_round_trip_with_their_captions(pipe, captions_file):
    tensors, captions = load_captions(captions_file)
    assert captions == CAPTIONS
    assert tensors["prompt_embeds"].shape == (len(CAPTIONS), 10, pipe.transformer.config.caption_channels)
    assert tensors["negative_prompt_embeds"].shape[0] == 1
    again = encode_captions(pipe, CAPTIONS[:3], max_sequence_length=10)
    assert torch.allclose(again["prompt_embeds"], tensors["prompt_embeds"][:3])  # batching does not matter


def test_bad_inputs_say_what_to_do_and_write_nothing(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m diffsparse.captions"):
        load_captions(tmp_path / "none.safetensors")
    tensors = encode_captions(pipe, CAPTIONS[:2], max_sequence_length=10)
    with pytest.raises(ValueError, match="3 captions for 2"):
        save_captions(tmp_path / "out.safetensors", tensors, CAPTIONS[:3])
    assert list(tmp_path.iterdir()) == []


def test_a_pipeline_of_no_registered_backbone_is_refused(pipe):
    """No fallback to another backbone's encoder: the error names the pipelines that have one."""

    class OtherPipeline:
        tokenizer, text_encoder, transformer = pipe.tokenizer, pipe.text_encoder, torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"OtherPipeline: its transformer \(Linear\) is not a registered backbone"):
        encode_captions(OtherPipeline(), CAPTIONS[:1])
    dit = tiny_pipeline("dit")
    dit.tokenizer, dit.text_encoder = pipe.tokenizer, pipe.text_encoder
    with pytest.raises(ValueError, match="dit model, which is class-conditional.*PixArtAlphaPipeline"):
        encode_captions(dit, CAPTIONS[:1])


def test_command_line_encodes_a_saved_pipeline(pipe, tmp_path, capsys):
    pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS[:4]) + "\n\n")
    main(
        [
            str(tmp_path / "pipe"),
            str(tmp_path / "captions.txt"),
            str(tmp_path / "out.safetensors"),
            "--max-length",
            "10",
        ]
    )
    tensors, captions = load_captions(tmp_path / "out.safetensors")
    assert captions == CAPTIONS[:4]
    assert torch.allclose(tensors["prompt_embeds"], encode_captions(pipe, CAPTIONS[:4], 10)["prompt_embeds"])


def test_our_loop_samples_like_the_stock_pixart_pipeline(pipe, captions_file):
    tensors, _ = load_captions(captions_file)
    conditions = {
        "encoder_hidden_states": tensors["prompt_embeds"][:2],
        "encoder_attention_mask": tensors["prompt_attention_mask"][:2],
    }
    noise = initial_noise(2, (4, 8, 8), seed=3)
    ours = sample(
        pipe.transformer, pipe.scheduler, conditions, noise, 5, 4.5, null_conditions=null_conditions(tensors)
    )
    stock = pipe(
        prompt=None,
        negative_prompt=None,
        prompt_embeds=conditions["encoder_hidden_states"],
        prompt_attention_mask=conditions["encoder_attention_mask"],
        negative_prompt_embeds=tensors["negative_prompt_embeds"].expand(2, -1, -1),
        negative_prompt_attention_mask=tensors["negative_prompt_attention_mask"].expand(2, -1),
        latents=noise.clone(),
        num_inference_steps=5,
        guidance_scale=4.5,
        output_type="latent",
        use_resolution_binning=False,
    ).images
    assert torch.allclose(ours, stock, atol=1e-5), (ours - stock).abs().max()


def test_a_learning_step_on_a_latent_text_model_reaches_only_the_costs(captions_file):
    from diffsparse.learn.data import ConditionDataModule
    from diffsparse.learn.module import ScheduleLearner

    learner = ScheduleLearner(
        model="tiny-pixart", sampler="dpm", num_steps=6, captions=str(captions_file), guidance=4.5
    )
    data = ConditionDataModule(train_size=4, val_size=2, batch_size=2, captions=str(captions_file))
    frozen = [*learner._ref.transformer.parameters(), *learner._ref.vae.parameters()]
    before = [p.clone() for p in frozen]
    learner.setup("fit")
    try:
        loss = learner.training_step(next(iter(data.train_dataloader())), 0)
        loss.backward()
    finally:
        learner.teardown("fit")
    assert learner.layer_costs.logits.grad.abs().sum() > 0 and learner.step_logits.grad is not None
    assert not any(p.requires_grad for p in frozen)
    assert all(torch.equal(a, b) for a, b in zip(before, frozen, strict=True))
    assert [n for n, _ in learner.named_parameters()] == ["step_logits", "layer_costs.logits"]


def test_text_models_need_their_caption_embeddings():
    from diffsparse.learn.module import ScheduleLearner

    with pytest.raises(ValueError, match="learn.captions"):
        ScheduleLearner(model="tiny-pixart")


def test_train_py_learns_a_pixart_schedule_with_dpm_solver(captions_file, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=tiny_pixart_stage1", f"learn.captions={captions_file}",
           "logger=csv", f"output_dir={out}", f"hydra.run.dir={out}"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    from diffsparse import Schedule

    schedule = Schedule.load(out / "schedule.json")
    assert schedule.num_steps == 8 and schedule.meta["saved_macs"] >= 0.5
    assert (out / "schedule.png").is_file() and (out / "stage1.ckpt").is_file()


def test_a_saved_stock_pipeline_is_a_model_to_learn_on(pipe, captions_file, tmp_path):
    """`learn.model=PIPELINE_DIR`: the transformer, VAE and noise schedule of a saved pipeline, from_pretrained."""
    from diffsparse.learn.module import ScheduleLearner
    from diffsparse.models.loading import load_model

    pipe.save_pretrained(tmp_path / "pixart")
    ref = load_model(str(tmp_path / "pixart"))
    assert ref.text_conditioned and ref.vae is not None
    assert ref.noise_schedule["num_train_timesteps"] == pipe.scheduler.config.num_train_timesteps
    learner = ScheduleLearner(model=str(tmp_path / "pixart"), num_steps=4, captions=str(captions_file))
    assert learner.table.dense_step > 0 and len(learner.units) == 6  # 2 blocks x (attn1, attn2, ff)
    tiny_pipeline("dit").save_pretrained(tmp_path / "dit")
    dit = load_model(str(tmp_path / "dit"))
    assert not dit.text_conditioned and dit.num_classes == 1000 and dit.mac_table().dense_step > 0


def test_captions_with_classes_keep_their_ids_and_bad_lines_are_refused(pipe, tmp_path, capsys):
    pipe.save_pretrained(tmp_path / "pixart")
    lines = [f"{i}\tthe digit {d}" for i, d in enumerate(DIGITS[:3])]
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    main([str(tmp_path / "pixart"), str(tmp_path / "captions.txt"), str(tmp_path / "c.safetensors"), "--classes",
          "--max-length", "8"])  # fmt: skip
    tensors, captions = load_captions(tmp_path / "c.safetensors")
    assert captions == [f"the digit {d}" for d in DIGITS[:3]] and tensors["labels"].tolist() == [0, 1, 2]
    (tmp_path / "bad.txt").write_text("the digit one\n")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "pixart"), str(tmp_path / "bad.txt"), str(tmp_path / "b.safetensors"), "--classes"])
    assert "CLASS<tab>caption" in capsys.readouterr().err and not (tmp_path / "b.safetensors").exists()
    with pytest.raises(ValueError, match="class ids"):
        save_captions(tmp_path / "x.safetensors", {**tensors, "labels": torch.tensor([0.5, 1, 2])}, captions)
