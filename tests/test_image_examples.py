"""examples/sdxl_dreambooth as a user runs it: tiny pipeline → train.py on the 5 images → infer.py; and under DDP."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import example_module, failure_of, free_port
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sdxl_dreambooth"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SMALL = ["--resolution", "64", "--max_steps", "3", "--grad_accum", "1", "--num_inference_steps", "2"]


def _run(args: list, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env or ENV, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    """What ``python examples/sdxl_dreambooth/make_tiny_pipeline.py <folder>`` writes, built in this process."""
    out = tmp_path_factory.mktemp("tiny-sdxl")
    make = example_module(EXAMPLE / "make_tiny_pipeline.py", "sdxl_example_make_tiny_pipeline")
    make.build_pipeline(0).save_pretrained(out)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    return out


@pytest.mark.slow
def test_train_then_infer_on_the_five_images(tiny_pipeline, tmp_path):
    run = tmp_path / "run"
    done = _run(
        [sys.executable, EXAMPLE / "train.py", "--model", tiny_pipeline, "--instance_data_dir", EXAMPLE / "images",
         "--instance_prompt", "a photo of sks toy", "--output_dir", run, *SMALL, "--center_crop",
         "--validation_prompt", "a photo of sks toy on the beach", "--num_validation_images", "2"]
    )  # fmt: skip
    assert "done: 3 updates" in done.stdout
    assert (run / "final" / "nara_weights.safetensors").is_file()
    assert [p.name for p in sorted((run / "validation").iterdir())] == ["step-000003.png"]
    if importlib.util.find_spec("tensorboard") is not None:
        assert any((run / "nara_diffusion").glob("events.out.tfevents.*"))  # TensorBoard by default
    out = tmp_path / "pictures"
    done = _run(
        [sys.executable, EXAMPLE / "infer.py", "--adapter_path", run / "final",
         "--prompt", "a photo of sks toy in the snow", "--num_images", "3", "--num_inference_steps", "2",
         "--resolution", "64", "--output_dir", out]
    )  # fmt: skip
    assert Image.open(out / "images.png").size == (3 * 64, 64)


@pytest.mark.slow
def test_data_parallel_on_two_cpu_processes_with_prior_preservation(tiny_pipeline, tmp_path):
    run = tmp_path / "run"
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    launch = [BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    _run(
        [*launch, EXAMPLE / "train.py", "--model", tiny_pipeline, "--instance_data_dir", EXAMPLE / "images",
         "--instance_prompt", "a photo of sks toy", "--output_dir", run, *SMALL, "--with_prior_preservation",
         "--class_prompt", "a photo of a toy", "--num_class_images", "3", "--report_to", "none"],
        env,
    )  # fmt: skip
    classes = sorted((run / "class_images").iterdir())
    assert [p.name[:11] for p in classes] == ["class-00000", "class-00001", "class-00002"]
    assert len({p.read_bytes() for p in classes}) == 3  # each image has its own seed, whichever process made it
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    fingerprints = next(r["replica_fingerprints"] for r in rows if "replica_fingerprints" in r)
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    assert (run / "final" / "nara_weights.safetensors").is_file()


@pytest.mark.slow
def test_diffora_selection_through_train_py_reloads_into_a_stock_pipeline(tiny_pipeline, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    import nara_diffusion as nd

    run = tmp_path / "run"
    _run(
        [sys.executable, EXAMPLE / "train.py", "--model", tiny_pipeline, "--instance_data_dir", EXAMPLE / "images",
         "--instance_prompt", "a photo of sks toy", "--output_dir", run, *SMALL, "--select", "diffora",
         "--sample_rate", "0.25", "--search_steps", "2", "--report_to", "none"]
    )  # fmt: skip
    dam = json.loads((run / "diffora.json").read_text())
    assert len(dam["kept"]) == -(-len(dam["alphas"]) // 4)  # ⌈0.25·N⌉
    pipe = nd.image.enable_nara_loading(StableDiffusionXLPipeline.from_pretrained(tiny_pipeline))
    pipe.load_nara_weights(run / "final")
    adapted = sorted(n for n, m in pipe.unet.named_modules() if isinstance(m, nd.core.NaRALinear))
    assert adapted == sorted(dam["kept"])


def test_text_objectives_are_rejected_for_images(tiny_pipeline):
    train = example_module(EXAMPLE / "train.py", "sdxl_example_train")
    message = failure_of(
        train.main,
        ["--model", str(tiny_pipeline), "--instance_data_dir", str(EXAMPLE / "images"), "--instance_prompt", "x",
         "--objective", "lift"],
    )  # fmt: skip
    assert "--objective" in message and "valid fields" in message
