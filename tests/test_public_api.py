"""The public API: one name per idea, a small top level, backends as lazily imported namespaces."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import nara_diffusion as nd


def test_the_top_level_exports_what_a_user_calls_and_nothing_twice():
    assert set(nd.__all__) == {
        "NaRAConfig",
        "NaRALoadError",
        "NoiseConditionedAdapter",
        "NoiseLevelError",
        "__version__",
        "convert_reference_checkpoint",
        "core",
        "get_adapter",
        "get_nara_model",
        "image",
        "inject_nara",
        "is_nara_model",
        "load_nara_model",
        "noise_level",
        "remove_nara",
        "selection",
        "text",
        "training",
    }
    for name in nd.__all__:
        assert getattr(nd, name) is not None
    # the attach verbs: a PeftModel wrapper (get/load) and in place (inject/remove); the former names are gone
    assert not hasattr(nd.image, "add_nara") and not hasattr(nd.image, "remove_nara")
    assert not hasattr(nd, "NaRALinear") and nd.core.NaRALinear.__name__ == "NaRALinear"


def test_the_backends_are_symmetric_namespaces():
    assert {"run_finetune", "FinetuneConfig", "lift_loss", "generate"} <= set(nd.text.__all__)
    assert {"run_dreambooth", "DreamBoothConfig", "inject_nara", "enable_nara_loading"} <= set(nd.image.__all__)
    from nara_diffusion.image.dreambooth import DreamBoothConfig, run_dreambooth
    from nara_diffusion.text.objectives import lift_loss

    assert nd.image.run_dreambooth is run_dreambooth and nd.image.DreamBoothConfig is DreamBoothConfig
    assert nd.text.lift_loss is lift_loss
    for namespace in (nd.text, nd.image, nd.training, nd.selection):
        assert all(hasattr(namespace, name) for name in namespace.__all__)


@pytest.mark.slow
def test_importing_the_package_loads_neither_diffusers_nor_a_backend():
    code = (
        "import json, sys; import nara_diffusion as nd; "
        "print(json.dumps(sorted(m for m in sys.modules if m == 'diffusers' or m.startswith('nara_diffusion.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    for heavy in ("diffusers", "nara_diffusion.text", "nara_diffusion.image", "nara_diffusion.training"):
        assert heavy not in loaded, f"import nara_diffusion imported {heavy}"
    assert "nara_diffusion.core" in loaded


def test_the_shared_adapter_has_one_python_name_and_keeps_its_on_disk_key():
    from builders import TinyNet

    model = nd.get_nara_model(TinyNet(), nd.NaRAConfig(r=2, target_modules=["layers.0", "layers.1"]))
    adapter = nd.get_adapter(model)
    assert isinstance(adapter, nd.NoiseConditionedAdapter)
    layers = [m for m in model.modules() if isinstance(m, nd.core.NaRALinear)]
    assert layers and all(layer.noise_adapters["default"] is adapter for layer in layers)
    # the on-disk key of the shared adapter is the saved format's, unchanged (files written before load as they are)
    from peft.utils import get_peft_model_state_dict

    saved = get_peft_model_state_dict(model)
    assert "base_model.nara_hypernet.generator.layers.0.weight" in saved
