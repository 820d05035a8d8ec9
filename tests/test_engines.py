"""Multi-GPU engines: the accelerate configs of examples/accelerate/, how FSDP2 groups a NaRA model (each transformer
block its own group, the shared hypernetwork in the root), and one FSDP2 step on two CPU processes (gloo) against the
same step in one process.

accelerate (1.15) runs FSDP only on accelerators: with ``ACCELERATE_USE_CPU`` an FSDP config silently becomes plain
CPU data parallelism. torch's ``fully_shard`` itself runs on CPU with gloo, so the two-process test applies accelerate's
own wrapping policy (`fsdp2_prepare_auto_wrap_policy`) and state-dict gathering (`get_model_state_dict` with a full,
CPU-offloaded state, as ``Accelerator.get_state_dict`` calls it) under torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import free_port, tiny_dream, tiny_llada

import nara_diffusion as nd

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate"


def test_the_accelerate_configs_name_their_engines():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    loaded = {name: load_config_from_file(str(CONFIGS / f"{name}.yaml")) for name in ("ddp", "fsdp2", "zero2", "zero3")}
    assert loaded["ddp"].distributed_type == DistributedType.MULTI_GPU
    fsdp = loaded["fsdp2"]
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp.fsdp_config  # the model's _no_split_modules decide
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    for name, stage in (("zero2", 2), ("zero3", 3)):
        assert loaded[name].distributed_type == DistributedType.DEEPSPEED
        assert loaded[name].deepspeed_config["zero_stage"] == stage
    assert loaded["zero3"].deepspeed_config["zero3_save_16bit_model"] is True  # saving gathers the weights


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_fsdp2_groups_each_block_and_keeps_the_hypernetwork_in_the_root(family):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    base = tiny_dream() if family == "dream" else tiny_llada()
    model = nd.get_nara_model(base, nd.NaRAConfig(r=2, target_modules="all-linear", hidden_dims=[8]))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    grouped = {name for name, module in model.named_modules() if policy(module)}
    blocks = "base_model.model.model.layers" if family == "dream" else "base_model.model.model.transformer.blocks"
    assert grouped == {f"{blocks}.{i}" for i in range(2)}  # the peft wrapper forwards _no_split_modules
    hypernet = [name for name, _ in model.named_modules() if "nara_hypernet" in name]
    assert hypernet and not any(name.startswith(blocks) for name in hypernet)  # on the tuner: the root group


WORKER = r"""
import json, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from builders import perturb_, tiny_dream
import nara_diffusion as nd
from nara_diffusion.text.objectives import sft_loss


def nara_model():
    model = nd.get_nara_model(tiny_dream(scale=0.1).train(), nd.NaRAConfig(r=2, target_modules="all-linear",
                              hidden_dims=[8], lora_dropout=0.0))
    perturb_(model, scale=0.3)
    return model


def half_loss(model, ids, rank):  # each process: 2 of the 4 sequences, fixed noise levels and masks
    rows = slice(2 * rank, 2 * rank + 2)
    gen = torch.Generator().manual_seed(rank)
    return sft_loss(model, ids[rows], torch.tensor([3, 4]), mask_token_id=19, t=torch.tensor([0.4, 0.8]),
                    generator=gen).loss


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    ids = torch.randint(0, 18, (4, 10), generator=torch.Generator().manual_seed(7))
    model = nara_model()
    policy = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(fsdp_version=2,
                                            auto_wrap_policy="transformer_based_wrap"), model)
    groups = [m for m in model.modules() if policy(m)]
    for module in groups:
        fully_shard(module)
    fully_shard(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    half_loss(model, ids, rank).backward()  # FSDP2 averages the gradients of the two halves
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    local = {n: tuple(p.to_local().shape) for n, p in model.named_parameters() if "nara_hypernet" in n}
    if rank == 0:
        reference = nara_model()
        sum(half_loss(reference, ids, r) for r in range(2)).div(2).backward()
        ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
        ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}
        ref_opt.step()
        reference.save_pretrained(sys.argv[2] + "/reference")
        nara_model().save_pretrained(sys.argv[2] + "/fsdp", state_dict=state)  # as Trainer._save_weights does
        json.dump({
            "groups": len(groups), "trainable": len(trainable),
            "grad_diff": max((grads[n] - ref_grads[n]).abs().max().item() for n in trainable),
            "grad_size": max(ref_grads[n].abs().max().item() for n in trainable),
            "hypernet_grads": sum("nara_hypernet" in n for n in trainable),
            "hypernet_local_shapes": local,
        }, open(sys.argv[2] + "/result.json", "w"))
    dist.barrier()
    dist.destroy_process_group()


main()
"""


@pytest.mark.slow
def test_one_fsdp2_step_on_two_cpu_processes_equals_the_step_in_one_process(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "fsdp_worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    done = subprocess.run(
        [*torchrun, str(free_port()), str(script), str(ROOT / "tests"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["groups"] == 2 and result["hypernet_grads"] == 4  # two linear layers, weight and bias each
    # the hypernetwork is sharded like any root parameter: dim 0 split across the two processes (8 rows -> 4 each)
    assert result["hypernet_local_shapes"]["base_model.nara_hypernet.default.generator.layers.0.weight"] == [4, 64]
    # each gradient is the reference's up to float32 rounding: the same sums, the two halves' gradients averaged by a
    # reduce-scatter instead of the autograd sum (≈ 300 roundings along the backward path, at the gradients' size)
    assert result["grad_diff"] <= 4 * (300**0.5) * 1.2e-7 * max(1.0, result["grad_size"])
    saved = load_file(str(tmp_path / "fsdp" / "adapter_model.safetensors"))
    expected = load_file(str(tmp_path / "reference" / "adapter_model.safetensors"))
    assert saved.keys() == expected.keys() and any("nara_hypernet" in k for k in saved)  # saved once, whole
    for key in saved:  # one SGD step of lr 0.5 from the same weights: the parameters differ as the gradients do
        assert saved[key].shape == expected[key].shape
        assert (saved[key] - expected[key]).abs().max() <= 0.5 * 4 * (300**0.5) * 1.2e-7 * max(1.0, result["grad_size"])


def test_a_sharded_engine_saves_the_gathered_state_once_and_refuses_what_it_cannot_do(tmp_path, monkeypatch):
    """Under FSDP / ZeRO-3 the Trainer hands save_fn the state gathered by ``accelerator.get_state_dict`` (on every
    process), not the model's own (sharded) tensors; a save_fn that cannot take it, and --resume, are refused."""
    import torch
    from accelerate import Accelerator
    from builders import TinyNet, regression_data, regression_loss, stack_collate
    from safetensors.torch import load_file

    from nara_diffusion.training import TrainConfig, Trainer, attach_adapter, loop

    monkeypatch.setattr(loop, "parameters_sharded", lambda accelerator: True)
    gathered = []

    def get_state_dict(self, model, unwrap=True):  # what FSDP's full-state gathering returns: marked with +1
        gathered.append(1)
        return {k: v + 1 for k, v in self.unwrap_model(model).state_dict().items()}

    monkeypatch.setattr(Accelerator, "get_state_dict", get_state_dict)
    model = attach_adapter(TinyNet(), "nara", r=2, target_modules=["layers.0"], lora_dropout=0.0, hidden_dims=[8])
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=4, eval_every=0, report_to="none")
    trainer = Trainer(model, config, regression_data(), None, stack_collate, regression_loss)
    result = trainer.train()
    saved = load_file(str(result.final_dir / "adapter_model.safetensors"))
    own = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "nara_" in k}
    assert gathered == [1] and saved.keys() == own.keys()
    assert all(torch.equal(saved[k], own[k] + 1) for k in saved)  # the gathered state was written, once
    assert not (tmp_path / "state").exists()  # no resumable state under sharded engines
    with pytest.raises(ValueError, match="state_dict="):
        Trainer(model, config, regression_data(), None, stack_collate, regression_loss, save_fn=lambda m, f: None)
    config.resume = True
    with pytest.raises(ValueError, match="--resume is not supported"):
        Trainer(model, config, regression_data(), None, stack_collate, regression_loss)
