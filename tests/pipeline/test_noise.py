"""Seed modes: each mode's noise as the app defines it, and every mode accepted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dts_util.errors import InvalidRequest
from dts_util.pipeline.noise import (APP_SEED_MODE_NAMES, SEED_MODES, block_spiral, find_seed_mode, initial_noise,
                                     philox_normal)


def _noise(mode: str, seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    return initial_noise(mode, seed, shape, torch.Generator("cpu").manual_seed(seed))[0].numpy()


def test_torch_cpu_is_torch_randn() -> None:
    expected = torch.randn((1, 4, 16, 24), generator=torch.Generator("cpu").manual_seed(9))[0].numpy()
    assert np.array_equal(_noise("torch_cpu", 9, (4, 16, 24)), expected)


def test_nvidia_gpu_is_philox_as_cuda_draws_it() -> None:
    # CUDA's torch.manual_seed(0); torch.randn(4) (Philox4x32-10, Box-Muller), as A1111 and the app reproduce it
    assert np.allclose(philox_normal(0, 4), [-0.92466259, -0.42534414, -2.6438457, 0.14518388], atol=1e-6)
    noise = _noise("nvidia_gpu", 0, (4, 8, 8))
    assert np.array_equal(noise.reshape(-1)[:4], philox_normal(0, 4))
    assert abs(float(_noise("nvidia_gpu", 3, (4, 64, 64)).std()) - 1) < 0.02


def test_scale_alike_keeps_the_centre_across_sizes() -> None:
    small, large = _noise("scale_alike", 42, (4, 64, 64)), _noise("scale_alike", 42, (4, 128, 128))
    assert np.array_equal(small[:, 24:40, 24:40], large[:, 56:72, 56:72])
    assert not np.array_equal(small, _noise("torch_cpu", 42, (4, 64, 64)))
    # the values are the CPU stream's, rearranged
    stream = torch.randn(64 * 64 * 4, generator=torch.Generator("cpu").manual_seed(42)).numpy()
    assert np.array_equal(np.sort(small.reshape(-1)), np.sort(stream))


@pytest.mark.parametrize("rows,columns", [(2, 2), (8, 8), (16, 12), (5, 9), (3, 2)])
def test_block_spiral_places_every_block_once(rows: int, columns: int) -> None:
    order = block_spiral(rows, columns)
    assert sorted(order) == [(r, c) for r in range(rows) for c in range(columns)]
    centre = ((rows + 1) // 2 - 1, (columns + 1) // 2 - 1)
    assert order[0] == centre


def test_every_mode_and_spelling_is_accepted() -> None:
    for mode, app_name in zip(SEED_MODES, APP_SEED_MODE_NAMES):
        assert find_seed_mode(mode) == mode and find_seed_mode(app_name) == mode
    assert find_seed_mode("") == "torch_cpu" and find_seed_mode("Scale Alike") == "scale_alike"
    # legacy has no public definition: drawn as torch_cpu
    assert np.array_equal(_noise("legacy", 5, (4, 8, 8)), _noise("torch_cpu", 5, (4, 8, 8)))
    with pytest.raises(InvalidRequest, match="seed_mode"):
        find_seed_mode("mersenne")
