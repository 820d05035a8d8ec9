"""`nd.inject_nara`: NaRA attached in place (the diffusers ``unet.add_adapter`` shape), with λ read from the call."""

from __future__ import annotations

import copy

import pytest
import torch
from builders import TinyNet, perturb_

import nara_diffusion as nd


class TimestepNet(TinyNet):
    """Takes a diffusion timestep beside its input, as a UNet does."""

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def test_inject_in_place_owns_the_hypernetwork_and_reads_the_keyword():
    torch.manual_seed(0)
    net = TinyNet().eval()
    reference = copy.deepcopy(net)
    x = torch.randn(2, 12)
    out = nd.inject_nara(net, nd.NaRAConfig(r=3, target_modules=["layers.0"], lora_dropout=0.0))
    assert out is net and isinstance(net.layers[0], nd.core.NaRALinear)
    hypernet_params = {id(p) for p in nd.get_adapter(net).parameters()}
    assert hypernet_params <= {id(p) for p in net.parameters()}
    assert any(k.startswith("nara_hypernet.default.generator") for k in net.state_dict())
    torch.testing.assert_close(net(x, noise_level=0.5), reference(x))  # identity at initialisation
    perturb_(net)
    with pytest.raises(nd.NoiseLevelError):
        net(x)
    with nd.noise_level(net, 0.5):
        torch.testing.assert_close(net(x), net(x, noise_level=0.5))
    nd.remove_nara(net)
    assert not hasattr(net, "nara_hypernet") and not hasattr(net, "peft_config")
    assert not any(isinstance(m, nd.core.NaRALinear) for m in net.modules())
    torch.testing.assert_close(net(x), reference(x))


def test_noise_level_fn_reads_the_timestep_of_every_call():
    net = TimestepNet().eval()
    cfg = nd.NaRAConfig(r=3, target_modules=["layers.1"], noise_input="timestep", num_train_timesteps=1000)
    seen = []

    def read_timestep(args, kwargs):
        return kwargs["timestep"] if "timestep" in kwargs else args[1]

    nd.inject_nara(net, cfg, noise_level_fn=read_timestep)
    nd.get_adapter(net).embedding.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    perturb_(net)
    x = torch.randn(3, 12)
    net(x, torch.tensor([10, 500, 990]))
    net(x, timestep=torch.tensor(250))
    torch.testing.assert_close(seen[0], torch.tensor([0.01, 0.5, 0.99]))
    torch.testing.assert_close(seen[1], torch.tensor([0.25]))
    expected = net(x, torch.tensor(250))
    torch.testing.assert_close(net(x, torch.tensor(0), noise_level=250), expected)  # the keyword wins


def test_a_second_in_place_adapter_and_errors():
    net = TinyNet()
    nd.inject_nara(net, nd.NaRAConfig(r=2, target_modules=["layers.0"]))
    nd.inject_nara(net, nd.NaRAConfig(r=2, target_modules=["layers.2"], core="constant"), adapter_name="two")
    assert set(net.nara_hypernet) == {"default", "two"}
    with pytest.raises(ValueError, match="already has a NaRA adapter named 'two'"):
        nd.inject_nara(net, nd.NaRAConfig(r=2, target_modules=["layers.2"]), adapter_name="two")
    with pytest.raises(ValueError, match="not found"):
        nd.inject_nara(net, nd.NaRAConfig(r=2, target_modules=["nope"]), adapter_name="three")
    assert set(net.nara_hypernet) == {"default", "two"} and set(net.peft_config) == {"default", "two"}
    with pytest.raises(ValueError, match="no NaRA adapter"):
        nd.remove_nara(TinyNet())
