"""runtime/user_cache.py: the one folder every compile cache (TensorRT timings, TensorRT for RTX kernels, OpenVINO)
lives in, and the GPU name as a file-name part."""

from pathlib import Path

from sdrt.runtime.openvino import cache_root
from sdrt.runtime.user_cache import cache_dir, slug


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.delenv("SDRT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "sdrt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "sdrt"
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    assert cache_root() == tmp_path / "mine" / "openvino"


def test_slug():
    assert slug("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"
    assert slug("  NVIDIA H100 80GB HBM3 ") == "nvidia-h100-80gb-hbm3"
    assert slug("Tesla T4/PCIe (x16)") == "tesla-t4-pcie-x16"
    assert isinstance(cache_dir(), Path)
