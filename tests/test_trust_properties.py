"""Issue #13, property-based: every `NaRAConfig` is either refused with an error naming the field or builds a sound
model, and every damaged adapter folder is either refused with `NaRALoadError` or loads exactly the saved model."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections.abc import Iterator

import pytest
import torch
from builders import TinyNet, perturb_, tiny_llama, torch_threads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft.utils import get_peft_model_state_dict
from reference import state_of

import nara_diffusion as nd

INF, NAN = float("inf"), float("nan")
SMALL = {"r": 2, "target_modules": ["layers.0", "head"], "hidden_dims": (8,), "embedding_dim": 8, "lora_dropout": 0.0}


# -- configs: explicit cases ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"core_scale": INF}, "core_scale"),
        ({"core_scale": NAN}, "core_scale"),
        ({"core_scale": -0.1}, "core_scale"),
        ({"core_scale": None}, "core_scale"),
        ({"core_scale": "0.1"}, "core_scale"),
        ({"scaling": NAN}, "scaling"),
        ({"scaling": -INF}, "scaling"),
        ({"scaling": "1"}, "scaling"),
        ({"lora_alpha": NAN}, "lora_alpha"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_alpha": 1e4, "scaling": 1e4, "r": 1}, "lora_alpha"),  # s = scaling · alpha / r = 1e8
        ({"r": 0}, "r must"),
        ({"r": -3}, "r must"),
        ({"r": 2.0}, "r must"),
        ({"r": True}, "r must"),
        ({"r": "4"}, "r must"),
        ({"fourier_scale": INF}, "fourier_scale"),
        ({"fourier_scale": NAN}, "fourier_scale"),
        ({"fourier_scale": 0.0}, "fourier_scale"),
        ({"fourier_scale": 1e30}, "fourier_scale"),  # float32 frequencies overflow to inf: NaN features
        ({"core_scale": 3.4028235677973366e38}, "core_scale"),  # inf in float32: inf · 0 = NaN at the start
        ({"embedding": "sinusoid"}, "embedding"),
        ({"embedding": None}, "embedding"),
        ({"core": "hyper"}, "core"),
        ({"noise_input": "sigma"}, "noise_input"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": NAN}, "lora_dropout"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"num_train_timesteps": -1000}, "num_train_timesteps"),
        ({"num_train_timesteps": 999.5}, "num_train_timesteps"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"embedding_dim": 63}, "embedding_dim"),
        ({"embedding_dim": 8.0}, "embedding_dim"),
        ({"hidden_dims": 16}, "hidden_dims"),
        ({"hidden_dims": None}, "hidden_dims"),
        ({"hidden_dims": "16"}, "hidden_dims"),  # used to become (1, 6)
        ({"hidden_dims": (16.5,)}, "hidden_dims"),
        ({"hidden_dims": (0, 4)}, "hidden_dims"),
        ({"target_modules": 5}, "target_modules"),
        ({"target_modules": "("}, "target_modules"),  # a string is a regex for peft: re.error at attach time
        ({"exclude_modules": "[a"}, "exclude_modules"),
        ({"layers_pattern": "(layers"}, "layers_pattern"),
        ({"target_modules": ["q_proj", 3]}, "target_modules"),
        ({"exclude_modules": [None]}, "exclude_modules"),
        ({"modules_to_save": "lm_head"}, "modules_to_save"),
        ({"layers_to_transform": "0"}, "layers_to_transform"),
        ({"init_weights": "yes"}, "init_weights"),
    ],
)
def test_invalid_config_values_raise_value_errors_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        nd.NaRAConfig(**kwargs)


def test_an_empty_hidden_stack_is_one_linear_layer_that_works_and_round_trips(tmp_path):
    """hidden_dims=() is a deliberate choice: F is a single (zero-initialised) linear map from e(λ) to the core."""
    cfg = nd.NaRAConfig(**{**SMALL, "hidden_dims": ()})
    torch.manual_seed(0)
    base = TinyNet().eval()
    x = torch.randn(3, 12)
    expected = base(x)
    model = nd.get_nara_model(base, cfg)
    generator = nd.get_adapter(model).generator.layers
    assert [type(m) for m in generator] == [torch.nn.Linear] and generator[0].weight.shape == (4, 8)
    assert torch.equal(model(x, noise_level=0.5), expected)  # C = I and B = 0 at the start
    perturb_(model)
    outs = [model(x, noise_level=lam) for lam in (0.1, 0.9)]
    assert all(torch.isfinite(o).all() for o in outs) and not torch.equal(*outs)  # still a function of λ
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["hidden_dims"] == []
    torch.manual_seed(0)
    loaded = nd.load_nara_model(TinyNet().eval(), tmp_path)
    assert loaded.peft_config["default"].hidden_dims == ()
    assert torch.equal(loaded(x, noise_level=0.9), outs[1])


# -- configs: the property ---------------------------------------------------------------------------------------
ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10, 40),
    st.integers(),
    st.text(max_size=6),
    st.lists(st.integers(-2, 20), max_size=3),
    st.sampled_from(["fourier", "mlp", "raw", "noise", "constant", "identity", "mask_ratio", "timestep"]),
)
FIELDS = [
    "r",
    "core_scale",
    "lora_dropout",
    "scaling",
    "lora_alpha",
    "embedding",
    "embedding_dim",
    "fourier_scale",
    "hidden_dims",
    "core",
    "noise_input",
    "num_train_timesteps",
]
# Widths that allocate memory are kept small when they are valid (a valid 10**9 would build a 4 GB tensor).
SIZED = {"r", "embedding_dim", "hidden_dims"}


def _affordable(field: str, value) -> bool:
    if field not in SIZED:
        return True
    values = value if isinstance(value, list) else [value]
    return all(not isinstance(v, int) or v <= 40 for v in values)


_BASE_NET = None


def _base_net() -> tuple[TinyNet, torch.Tensor, torch.Tensor]:
    global _BASE_NET
    if _BASE_NET is None:
        torch.manual_seed(0)
        net = TinyNet().eval()
        x = torch.randn(2, 12)
        _BASE_NET = (net, x, net(x))
    return _BASE_NET


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=ANY)
def test_a_config_is_refused_naming_the_field_or_round_trips_and_builds_a_sound_model(field, value):
    if not _affordable(field, value):
        return
    kwargs = {**SMALL, field: value}
    if field == "num_train_timesteps":
        kwargs["noise_input"] = "timestep"
    try:
        cfg = nd.NaRAConfig(**kwargs)
    except (ValueError, TypeError) as err:
        assert field in str(err) or (field in ("embedding", "core", "noise_input") and "unknown" in str(err))
        return
    again = nd.NaRAConfig(**json.loads(json.dumps(cfg.to_dict(), default=list)))
    assert again == cfg
    base, x, expected = _base_net()
    model = nd.get_nara_model(copy.deepcopy(base), cfg)
    lam = cfg.num_train_timesteps / 2 if cfg.noise_input == "timestep" else 0.5
    out = model(x, noise_level=lam)
    assert torch.equal(out, expected)  # B = 0 and C = I at the start, whatever the (accepted) numbers
    perturb_(model, scale=0.1)
    if all(abs(v) <= 100 for v in (cfg.core_scale, cfg.effective_scaling, cfg.fourier_scale)):
        assert torch.isfinite(model(x, noise_level=lam)).all()


# -- adapter folders: damaged bytes and edited fields -------------------------------------------------------------
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# Fields whose value changes what the loaded adapter computes without changing any tensor shape: nothing in the
# folder can be cross-checked against them, so an edit to one of these loads, legitimately, a *different* model.
# They are excluded from "identical or refused" below (and only from that). Every other field either fixes a tensor
# shape or key (r, target_modules, hidden_dims, embedding, embedding_dim, core, exclude_modules, layers_*; checked
# against the weights) or does not affect a loaded adapter's outputs (lora_dropout at eval, fourier_scale, whose
# frequencies are in the file, init_weights, inference_mode, task_type, names and versions).
SEMANTIC = {"core_scale", "scaling", "lora_alpha", "noise_input", "num_train_timesteps"}


class Saved:
    """One saved adapter folder, the base it was trained on, and what loading it gives."""

    def __init__(self, root) -> None:
        self.state_of = state_of
        self.folder = root / "saved"
        self.base = tiny_llama(layers=2)
        cfg = nd.NaRAConfig(r=2, target_modules=["q_proj", "v_proj"], hidden_dims=(8,), embedding_dim=8)
        model = nd.get_nara_model(copy.deepcopy(self.base), cfg)
        perturb_(model)
        model.save_pretrained(self.folder)
        self.ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
        self.lam = torch.tensor([0.2, 0.7])
        loaded = nd.load_nara_model(copy.deepcopy(self.base), self.folder)
        self.outputs = loaded(self.ids, noise_level=self.lam).logits
        self.tensors = get_peft_model_state_dict(loaded)
        self.base_outputs = self.base(self.ids).logits
        self.config = json.loads((self.folder / CONFIG).read_text())
        self.bytes = {name: (self.folder / name).read_bytes() for name in (CONFIG, WEIGHTS)}
        self.tmp = root

    def copy_with(self, **files: bytes):
        """A copy of the saved folder with some files replaced (keys: 'config', 'weights')."""
        folder = self.tmp / f"case{len(list(self.tmp.iterdir()))}"
        shutil.copytree(self.folder, folder)
        for key, data in files.items():
            (folder / {"config": CONFIG, "weights": WEIGHTS}[key]).write_bytes(data)
        return folder

    def load_and_judge(self, folder, identical_required: bool = True) -> str:
        """Load ``folder`` onto a copy of the base: a refusal must be the library's, name the file or a field, and
        leave the base as it was; a success must be the saved model (unless ``identical_required`` is False)."""
        base = copy.deepcopy(self.base)
        before = self.state_of(base)
        try:
            loaded = nd.load_nara_model(base, folder)
        except (nd.NaRALoadError, FileNotFoundError) as err:
            message = str(err)
            named = [CONFIG, WEIGHTS, str(folder), *self.config]
            assert any(n in message for n in named), message
            after = self.state_of(base)
            for key in ("types", "hooks", "requires_grad", "training", "attributes"):
                assert after[key] == before[key], key
            assert torch.equal(base(self.ids).logits, self.base_outputs)
            return "refused"
        if identical_required:
            assert torch.equal(loaded(self.ids, noise_level=self.lam).logits, self.outputs)
            tensors = get_peft_model_state_dict(loaded)
            assert tensors.keys() == self.tensors.keys()
            assert all(torch.equal(tensors[k], v) for k, v in self.tensors.items())
        return "loaded"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Iterator[Saved]:
    with torch_threads(1):  # hundreds of tiny forwards: threads only contend (15x slower on a busy machine)
        yield Saved(tmp_path_factory.mktemp("folders"))


def _mutations(region: int):
    """1–3 random byte edits within the first ``region`` bytes: flip bits, insert, delete, truncate."""
    pos = st.integers(0, region - 1)
    return st.lists(
        st.one_of(
            st.tuples(st.just("flip"), pos, st.integers(1, 255)),
            st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=8)),
            st.tuples(st.just("delete"), pos, st.integers(1, 16)),
            st.tuples(st.just("truncate"), pos, st.just(0)),
        ),
        min_size=1,
        max_size=3,
    )


def _apply(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, pos, arg in mutations:
        pos = min(pos, len(out))
        if kind == "flip" and pos < len(out):
            out[pos] ^= arg
        elif kind == "insert":
            out[pos:pos] = arg
        elif kind == "delete":
            del out[pos : pos + arg]
        elif kind == "truncate":
            del out[pos:]
    return bytes(out)


FAST = settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@FAST
@given(mutations=_mutations(4096))
def test_damaged_weights_are_always_refused(saved, mutations):
    """With the checksum the config records, any change to the weights file is refused; never a different model."""
    data = _apply(saved.bytes[WEIGHTS], mutations)
    result = saved.load_and_judge(saved.copy_with(weights=data))
    assert result == "refused" or data == saved.bytes[WEIGHTS]


@FAST
@given(mutations=_mutations(400), data=st.data())
def test_damaged_weights_headers_without_a_checksum_are_refused_or_harmless(saved, mutations, data):
    """Older folders have no checksum: damage to the safetensors header (dtype, shape, offsets, names) or a truncated
    file is still refused, or changes nothing (e.g. a flip inside the metadata value)."""
    header_end = 8 + int.from_bytes(saved.bytes[WEIGHTS][:8], "little")
    mutations = [(k, p % header_end, a) if k != "truncate" else (k, p, a) for k, p, a in mutations]
    config = {**saved.config}
    del config["weights_sha256"]
    folder = saved.copy_with(weights=_apply(saved.bytes[WEIGHTS], mutations), config=json.dumps(config).encode())
    saved.load_and_judge(folder)


@FAST
@given(mutations=_mutations(2048))
def test_damaged_config_bytes_are_refused_or_load_the_described_model(saved, mutations):
    data = _apply(saved.bytes[CONFIG], mutations)
    try:
        described = json.loads(data)
    except (ValueError, RecursionError):
        described = None
    changed = set()
    if isinstance(described, dict):
        defaults = {f.name: f.default for f in dataclasses.fields(nd.NaRAConfig)}
        changed = {k for k in SEMANTIC if described.get(k, defaults[k]) != saved.config.get(k, defaults[k])}
    saved.load_and_judge(saved.copy_with(config=data), identical_required=not changed)


FIELD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["q_proj", "v_proj", "lm_head", "fourier", "mlp", "raw", "constant", "timestep", "CAUSAL_LM"]),
    st.lists(st.sampled_from(["q_proj", "v_proj", "o_proj", "lm_head", "x"]), max_size=3),
    st.lists(st.integers(0, 16), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@FAST
@given(data=st.data())
def test_edited_config_fields_are_refused_or_load_the_same_model(saved, data):
    key = data.draw(st.sampled_from(sorted(saved.config)), label="field")
    action = data.draw(st.sampled_from(["delete", "value"]), label="action")
    config = {**saved.config}
    if action == "delete":
        del config[key]
    else:
        config[key] = data.draw(FIELD_VALUES, label="value")
    folder = saved.copy_with(config=json.dumps(config).encode())
    saved.load_and_judge(folder, identical_required=key not in SEMANTIC)


@pytest.mark.parametrize("field,value", [("r", 3), ("hidden_dims", [16]), ("embedding_dim", 16), ("core", "constant")])
def test_configs_that_disagree_with_the_tensor_shapes_are_always_refused(saved, field, value):
    config = {**saved.config, field: value}
    assert saved.load_and_judge(saved.copy_with(config=json.dumps(config).encode())) == "refused"
