"""Config validation, recipes, mesh shapes and logical-axis sharding rules."""

import importlib
import os
import subprocess
import sys

import jax
import pytest

from derta_jax.models.config import ModelConfig
from derta_jax.train import config as train_config
from derta_jax.train.config import (ConfigError, build_model_config, resolve_mesh_shape, validate,
                                    validate_against_model)
from derta_jax.train.data import load_or_train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from derta_jax.train.mesh import make_mesh
from derta_jax.models.sharding import DEFAULT_RULES, logical_to_spec

RECIPES = ["tiny", "mistral7b", "llama3_8b", "llama3_70b_lora", "mixtral8x7b_lora",
           "llama3_8b_instruct_chat"]


def _recipe(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    if not config.data.synthetic:
        config.data.train_files = "train.jsonl"
    return config


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_validates_on_8_devices(name):
    config = _recipe(name)
    validate(config, num_devices=8)
    build_model_config(config)


def test_paper_hyperparameters_in_recipes():
    full = _recipe("mistral7b")
    assert (full.train.batch_size, full.train.num_epochs, full.optim.lr) == (128, 2, 2e-5)
    assert (full.optim.warmup_ratio, full.optim.weight_decay, full.data.max_length) == (0.03, 2e-5, 1024)
    assert full.loss.rto_keep_rate == 0.05 and full.model.dtype == "bfloat16"
    lora = _recipe("llama3_70b_lora")
    assert lora.lora.enabled and (lora.lora.rank, lora.lora.alpha, lora.lora.dropout) == (96, 16.0, 0.05)
    assert (lora.optim.lr, lora.optim.warmup_ratio, lora.data.max_length) == (1e-4, 0.0, 512)
    assert lora.loss.rto_keep_rate == 1.0
    assert build_model_config(lora).num_layers == 80
    assert _recipe("llama3_8b_instruct_chat").data.template == "chat"


@pytest.mark.parametrize("field, value, message", [
    ("optim.lr", -1.0, "optim.lr=-1.0: must be > 0"),
    ("loss.rto_keep_rate", 0.0, "loss.rto_keep_rate=0.0: must be in (0, 1]"),
    ("data.recipe", "dpo", "data.recipe='dpo': must be one of"),
    ("data.template", "alpaca", "data.template='alpaca': must be one of"),
    ("train.micro_batches", 3, "train.micro_batches=3: must divide train.batch_size=16"),
    ("optim.warmup_ratio", 1.5, "optim.warmup_ratio=1.5: must be in [0, 1)"),
    ("loss.normalization", "mean", "loss.normalization='mean': must be one of"),
])
def test_bad_values_name_the_field(field, value, message):
    config = _recipe("tiny")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert str(err.value).startswith(message)


def test_no_data_is_an_error():
    config = train_config.default_config()
    with pytest.raises(ConfigError, match="^data='': no data"):
        validate(config)


def test_bad_model_field_names_the_field():
    config = _recipe("tiny")
    config.model.num_kv_heads = 3
    with pytest.raises(ConfigError, match=r"^model.num_kv_heads=3: must divide num_heads=4"):
        build_model_config(config)


def test_mesh_fill_and_mismatch():
    assert resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 1, "expert": 1}, 8)["fsdp"] == 4
    with pytest.raises(ConfigError, match=r"^mesh=.*multiply to 4, but there are 8 devices"):
        resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 1, "expert": 1}, 8)
    with pytest.raises(ConfigError, match=r"^mesh=.*: at most one axis may be -1"):
        resolve_mesh_shape({"data": -1, "fsdp": -1, "tensor": 1, "expert": 1}, 8)
    with pytest.raises(ConfigError, match=r"^mesh.fsdp=-1: the other axes \(3 devices\)"):
        resolve_mesh_shape({"data": 3, "fsdp": -1, "tensor": 1, "expert": 1}, 8)


def test_batch_must_split_over_data_parallel_devices():
    config = _recipe("tiny")
    config.train.batch_size, config.train.micro_batches = 12, 3  # micro-batch of 4 over 8 devices
    with pytest.raises(ConfigError, match=r"^train.batch_size=12: the micro-batch of 4 sequences"):
        validate(config, num_devices=8)


def test_logical_rules_shard_fsdp_and_tensor_and_replicate_uneven_dims():
    assert jax.device_count() == 8
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2, "expert": 1})
    # [embed, heads, head_dim]: embed over fsdp, heads over tensor.
    assert tuple(logical_to_spec((64, 8, 16), ("embed", "heads", "head_dim"), mesh)) == ("fsdp", "tensor", None)
    # A dimension the axis does not divide is replicated rather than failing.
    assert tuple(logical_to_spec((6, 8), ("embed", "mlp"), mesh)) == (None, "tensor")
    # One mesh axis is never used twice in one array.
    assert tuple(logical_to_spec((8, 8), ("heads", "mlp"), mesh)) == ("tensor", None)
    with pytest.raises(KeyError, match="logical axis 'bogus' has no sharding rule"):
        logical_to_spec((8,), ("bogus",), mesh)
    assert set(DEFAULT_RULES) >= {"embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "experts", "layers"}


# ----------------------------------------------------------------------------- the model's limits


def test_max_length_above_the_models_positions_names_both_fields():
    config = _recipe("tiny")
    config.data.max_length = config.model.max_position_embeddings + 1
    with pytest.raises(ConfigError, match=r"^data.max_length=513: above "
                                          r"model.max_position_embeddings=512$"):
        validate(config)
    config.data.max_length = config.model.max_position_embeddings
    validate(config)


def test_max_length_against_the_config_json_of_model_hf_dir():
    """With model.hf_dir the architecture is its config.json, which validate() does not read:
    validate_against_model checks the built ModelConfig (the trainer calls it)."""
    config = _recipe("tiny")
    config.model.hf_dir = "/models/small"
    config.data.max_length = 1024  # above the fields' 512, but they are not the model
    validate(config)
    with pytest.raises(ConfigError, match=r"^data.max_length=1024: above "
                                          r"model.max_position_embeddings=256 \(model.hf_dir="
                                          r"'/models/small'\)$"):
        validate_against_model(config, ModelConfig(max_position_embeddings=256))
    validate_against_model(config, ModelConfig(max_position_embeddings=1024))


@pytest.mark.parametrize("name, preset, billions", [("mistral7b", "mistral7b", "7.24"),
                                                    ("llama3_70b_lora", "llama3_70b", "70.55")])
def test_a_large_preset_without_weights_is_refused_unless_from_scratch(name, preset, billions):
    config = _recipe(name)
    validate(config, num_devices=8)  # the planner plans it: validate() alone does not refuse
    model_cfg = build_model_config(config)
    with pytest.raises(ConfigError) as err:
        validate_against_model(config, model_cfg)
    assert str(err.value) == (
        f"model.hf_dir='': the config's preset {preset} has {billions}B parameters; starting it "
        f"from random weights is almost never wanted: set model.hf_dir=DIR (or "
        f"model.init_from=WORKDIR), or model.from_scratch=True")
    config.model.from_scratch = True
    validate_against_model(config, model_cfg)
    config.model.from_scratch, config.model.hf_dir = False, "/models/base"
    validate_against_model(config, model_cfg)  # weights given: nothing counted


def test_a_small_model_from_scratch_needs_no_flag():
    config = _recipe("tiny")
    validate_against_model(config, build_model_config(config))
    config.model.update(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=16,
                        num_kv_heads=8, head_dim=128, vocab_size=32000)  # ~1.1B, no preset
    with pytest.raises(ConfigError, match=r"^model.hf_dir='': the model of the config has "
                                          r"1\.\d\dB parameters"):
        validate_against_model(config, build_model_config(config))


def test_no_tokenizer_is_a_config_error_naming_the_field(tmp_path):
    config = _recipe("mistral7b")  # no model.hf_dir, no data.tokenizer
    with pytest.raises(ConfigError, match=r"^data.tokenizer='': no tokenizer; set "
                                          r"data.tokenizer=DIR or model.hf_dir=DIR"):
        load_or_train_tokenizer(config, tmp_path)
    config.data.tokenizer = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=rf"^data.tokenizer='{tmp_path}/missing': no tokenizer "
                                          rf"there \(tokenizer directory .* does not exist\)$"):
        load_or_train_tokenizer(config, tmp_path)
    config.data.tokenizer, config.model.hf_dir = "", str(tmp_path)  # a directory, no tokenizer
    with pytest.raises(ConfigError, match=rf"^model.hf_dir='{tmp_path}': no tokenizer there"):
        load_or_train_tokenizer(config, tmp_path)


def test_cli_refuses_a_7b_model_from_random_weights_before_writing(tmp_path):
    """The issue's command: a 7B recipe with data but no weights and no tokenizer."""
    done = _train_cli("--config=configs/mistral7b.py", "--config.data.train_files=F",
                      f"--config.workdir={tmp_path / 'run'}")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("error: model.hf_dir='': the config's preset mistral7b has "
                                  "7.24B parameters; starting it from random weights")
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


def _train_cli(*args):
    return subprocess.run([sys.executable, "-m", "derta_jax.train", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_flag_errors_are_one_line_with_exit_status_2():
    typo = _train_cli("--config=configs/tiny.py", "--config.loss.rto_keeprate=0.5")
    assert (typo.returncode, typo.stdout) == (2, "")
    assert typo.stderr == ("error: --config.loss.rto_keeprate: no field 'rto_keeprate' in the "
                           "config; did you mean \"rto_keep_rate\" instead of \"rto_keeprate\"?\n")
    missing = _train_cli("--config=configs/missing.py", "--config.train.batch_size=8")
    assert missing.returncode == 2
    assert missing.stderr == ("error: --config: [Errno 2] No such file or directory: "
                              "'configs/missing.py'\n")
