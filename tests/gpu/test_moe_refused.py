"""GPU tier: the CUDA backend refuses mixture-of-experts files (no router or expert kernels yet) with
one UnsupportedModelError, through the Engine and through CudaModel directly, and "auto" does not fall
back silently. The CPU tier checks the same refusal without a device (tests/test_moe.py)."""
from __future__ import annotations

import pytest

from aircupy.errors import UnsupportedModelError

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["tiny-qwen3moe", "tiny-qwen2moe", "tiny-mixtral"])
def moe_path(request, tmp_path_factory):
    from aircupy.synth import synth_model
    return synth_model(tmp_path_factory.mktemp("moe") / f"{request.param}.gguf", request.param, "Q8_0").path


@pytest.mark.parametrize("backend", ["cuda", "auto"])
def test_engine_refuses_moe_on_cuda(moe_path, backend):
    from aircupy import Engine
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts .* not supported by the CUDA backend"):
        Engine(str(moe_path), backend=backend)


def test_cuda_model_refuses_moe(moe_path):
    from aircupy.config import ModelConfig
    from aircupy.cuda.model import CudaModel
    from aircupy.gguf.reader import GGUFFile
    with GGUFFile(moe_path) as g, pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        CudaModel(g, ModelConfig.from_gguf(g), 64)
