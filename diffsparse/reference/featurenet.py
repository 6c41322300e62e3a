"""The feature network for metrics: a small CNN digit classifier, trained on a held-out split of the digits.

Its logits give the class accuracy of generated samples; its penultimate features (`FEATURES` wide) give the
Frechet distance (FD) between generated and real digits, the way Inception features give FID on ImageNet.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from diffsparse.reference.digits import IMAGE_SIZE, NUM_CLASSES, load_digits, split

log = logging.getLogger(__name__)

FEATURE_NET_DIR = Path(__file__).parent / "assets" / "digits_classifier"
FEATURES = 64
WEIGHTS, CONFIG = "model.safetensors", "config.json"


class DigitClassifier(nn.Module):
    """Three 3 x 3 convolutions (16 -> 8 -> 4 px), a `features`-wide penultimate layer, and the class logits."""

    input_shape = (1, IMAGE_SIZE, IMAGE_SIZE)  # the images it takes: one channel, 16 x 16 px

    def __init__(self, features: int = FEATURES, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, features),
            nn.ReLU(),
        )
        self.head = nn.Linear(features, num_classes)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Whether images of `shape` (C, H, W) can be measured: its channels, and sides that are whole multiples of
        its own (larger images are averaged down to 16 x 16 first)."""
        c, h, w = self.input_shape
        return len(shape) == 3 and shape[0] == c and shape[1] % h == 0 and shape[2] % w == 0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [-1, 1], (B, 1, 16 k, 16 k) -> (B, features); images larger than
        16 x 16 are first averaged down over k x k pixels (a 32 x 32 model's samples, measured as 16 x 16 digits)."""
        if tuple(images.shape[-2:]) != self.input_shape[1:]:
            if not self.accepts(tuple(images.shape[1:])):
                raise ValueError(
                    f"The digits feature network takes (B, 1, 16 k, 16 k) images, not {tuple(images.shape)}."
                )
            images = nn.functional.adaptive_avg_pool2d(images, self.input_shape[1:])
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel and a little pixel noise, so the classifier tolerates generated digits."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    return (x + 0.05 * randn_tensor(x.shape, generator=g)).clamp(-1, 1)


def train_feature_net(
    output_dir: str | Path = FEATURE_NET_DIR,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    held_out: float = 0.2,
    seed: int = 0,
) -> dict:
    """Train the classifier on the train split, report held-out accuracy, and save it to `output_dir`."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digits()
    train_idx, test_idx = split(labels, held_out, seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(train_idx) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for _ in tqdm(range(epochs), desc="feature net"):
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        for batch in order.split(batch_size):
            loss = F.cross_entropy(model(_augment(images[batch], g)), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
    config = {
        "features": FEATURES,
        "num_classes": NUM_CLASSES,
        "held_out_accuracy": accuracy,
        "held_out_images": len(test_idx),
        "train_images": len(train_idx),
        "epochs": epochs,
        "seed": seed,
    }
    save_feature_net(model, config, output_dir)
    log.info("feature net: held-out accuracy %.4f on %d images, saved to %s", accuracy, len(test_idx), output_dir)
    return config


def save_feature_net(model: DigitClassifier, config: dict, output_dir: str | Path) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    save_file(model.state_dict(), tmp)
    tmp.replace(out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_feature_net(path: str | Path | None = None) -> DigitClassifier:
    """The shipped feature network (or the one saved at `path`), in eval mode."""
    path = Path(path) if path is not None else FEATURE_NET_DIR
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"No feature network at {path / WEIGHTS}. Train one with `python train.py --config-name feature_net` "
            "(about a minute on a CPU); the shipped one lives in diffsparse/reference/assets/digits_classifier."
        )
    config = json.loads((path / CONFIG).read_text())
    model = DigitClassifier(config["features"], config["num_classes"])
    model.load_state_dict(load_file(path / WEIGHTS))
    return model.eval()


def feature_net_and_data(spec: str) -> tuple[DigitClassifier, torch.Tensor]:
    """The feature network of `spec` and the real images it compares samples with, in [-1, 1]: `digits` (the
    shipped network and the digits) or the folder of a saved one (`train_feature_net`: trained on the digits)."""
    net = load_feature_net(None if spec == "digits" else spec)
    images, _ = load_digits(net.input_shape[-1])
    return net, images
