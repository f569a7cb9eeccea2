"""convert -> Orbax workdir -> export round trips against transformers, plus the pieces
(LoRA merge math, tokenizer copying, workdir layout) they are built from."""

import json
import os
import re

import numpy as np
import pytest
import torch

from derta_jax import weights
from derta_jax import workdir as wd
from derta_jax.hf import peft
from derta_jax.models import lora
from derta_jax.hf.tokenizer_files import copy_tokenizer_files
from derta_jax.models.config import ModelConfig

# ----------------------------------------------------------------------------- LoRA merge


def test_merge_lora_equals_peft_merge_and_base_plus_adapter():
    rng = np.random.default_rng(0)
    d_in, d_out, r, alpha = 12, 10, 4, 16.0
    kernel = rng.standard_normal((d_in, d_out)).astype(np.float32)
    a = rng.standard_normal((d_in, r)).astype(np.float32)
    b = rng.standard_normal((r, d_out)).astype(np.float32)
    merged = lora.merge_lora(kernel, a, b, alpha, r)

    # PEFT's formula in PyTorch's layout: W [out, in] + (alpha / r) * lora_B @ lora_A.
    lora_a, lora_b = peft.peft_lora_weights(a, b)
    assert lora_a.shape == (r, d_in) and lora_b.shape == (d_out, r)
    w_hf = torch.from_numpy(kernel.T.copy())
    peft_merged = w_hf + (alpha / r) * (torch.from_numpy(lora_b) @ torch.from_numpy(lora_a))
    np.testing.assert_allclose(merged.T, peft_merged.numpy(), rtol=1e-5, atol=1e-5)

    # Behaviour: the merged layer computes base + scaled adapter path.
    x = rng.standard_normal((3, d_in)).astype(np.float32)
    np.testing.assert_allclose(x @ merged, x @ kernel + (alpha / r) * (x @ a) @ b, rtol=1e-5, atol=1e-5)


def test_merge_lora_on_multi_axis_kernels_matches_the_flattened_merge():
    rng = np.random.default_rng(1)
    d, h, hd, r = 8, 2, 3, 2
    kernel = rng.standard_normal((d, h, hd)).astype(np.float32)  # q_proj layout [D, H, Hd]
    a = rng.standard_normal((d, r)).astype(np.float32)
    b = rng.standard_normal((r, h, hd)).astype(np.float32)
    merged = lora.merge_lora(kernel, a, b, alpha=4.0, rank=r)
    flat = lora.merge_lora(kernel.reshape(d, h * hd), a, b.reshape(r, h * hd), alpha=4.0, rank=r)
    np.testing.assert_allclose(merged.reshape(d, h * hd), flat, rtol=1e-6)
    with pytest.raises(ValueError, match=re.escape("kernel shape (8, 2, 3) does not match LoRA A (8, 2)")):
        lora.merge_lora(kernel, a, b.reshape(r, h * hd), alpha=4.0, rank=r)


def test_merge_keeps_kernel_dtype():
    import ml_dtypes

    kernel = np.ones((4, 4), ml_dtypes.bfloat16)
    merged = lora.merge_lora(kernel, np.ones((4, 1), np.float32), np.ones((1, 4), np.float32), 2.0, 1)
    assert merged.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(merged.astype(np.float32), np.full((4, 4), 3.0))


# ----------------------------------------------------------------------------- pieces


def test_tokenizer_files_are_copied_by_name_only(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "tokenization_evil.py").write_text("import os")
    (src / "generation_config.json").write_text("{}")
    assert copy_tokenizer_files(src, dst) == ["tokenizer.json", "chat_template.jinja"]
    assert sorted(os.listdir(dst)) == ["chat_template.jinja", "tokenizer.json"]
    with pytest.raises(FileExistsError, match=re.escape(f"{dst / 'tokenizer.json'} exists")):
        copy_tokenizer_files(src, dst)
    copy_tokenizer_files(src, dst, overwrite=True, include_generation_config=True)
    assert (dst / "generation_config.json").is_file()


def test_workdir_model_config_round_trip_and_errors(tmp_path):
    cfg = ModelConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}, scan_layers=True)
    wd.write_model_config(tmp_path, cfg)
    assert wd.read_model_config(tmp_path) == cfg
    data = json.loads((tmp_path / wd.MODEL_CONFIG_FILE).read_text())
    data["num_layer"] = 3
    (tmp_path / wd.MODEL_CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / wd.MODEL_CONFIG_FILE}: unknown ModelConfig field(s) ['num_layer']")):
        wd.read_model_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="is .* a derta_jax workdir"):
        wd.read_model_config(tmp_path / "nowhere")


def test_params_save_and_restore_by_step(tmp_path):
    import jax
    import jax.numpy as jnp

    params = {"layers": {0: {"w": jnp.arange(6.0).reshape(2, 3)}}, "norm": jnp.ones(3, jnp.bfloat16)}
    wd.save_params(tmp_path, 0, params)
    wd.save_params(tmp_path, 5, jax.tree.map(lambda x: x * 2, params))
    assert sorted(os.listdir(tmp_path / wd.CHECKPOINTS_DIR)) == ["0", "5"]
    assert (tmp_path / wd.CHECKPOINTS_DIR / "5" / wd.PARAMS_ITEM).is_dir()
    abstract = jax.eval_shape(lambda: params)
    latest, step = wd.restore_params(tmp_path, abstract)
    first, _ = wd.restore_params(tmp_path, abstract, step=0)
    assert step == 5
    np.testing.assert_array_equal(latest["layers"][0]["w"], 2 * params["layers"][0]["w"])
    np.testing.assert_array_equal(first["layers"][0]["w"], params["layers"][0]["w"])
    assert first["norm"].dtype == jnp.bfloat16
    with pytest.raises(FileNotFoundError, match=re.escape("no step 3 (--step; available: [0, 5])")):
        wd.restore_params(tmp_path, abstract, step=3)


def test_params_restore_ignores_the_trainers_other_items(tmp_path):
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    params = {"w": jnp.arange(4.0)}
    with wd.checkpoint_manager(tmp_path) as manager:
        manager.save(3, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave({"mu": jnp.ones(4), "count": jnp.array(3)})))
        manager.wait_until_finished()
    restored, step = wd.restore_params(tmp_path, jax.eval_shape(lambda: params))
    assert step == 3
    np.testing.assert_array_equal(restored["w"], params["w"])


# ----------------------------------------------------------------------------- round trips

from derta_jax import convert as convert_cli  # noqa: E402
from derta_jax import export as export_cli  # noqa: E402
from derta_jax.hf.config import HFConfigError  # noqa: E402
from derta_jax.hf.safetensors_io import INDEX_FILE, SafetensorsError, scan_checkpoint  # noqa: E402
from tests.fixtures_hf import tiny_llama_config, tiny_mistral_config, tiny_mixtral_config  # noqa: E402

_TINY = {"llama": (tiny_llama_config, "LlamaForCausalLM"),
         "mistral": (tiny_mistral_config, "MistralForCausalLM"),
         "mixtral": (tiny_mixtral_config, "MixtralForCausalLM")}


def _sharded_hf_model(directory, family, seed=0, dtype=torch.float32):
    """A tiny random transformers model saved in several shards; returns the model."""
    import transformers

    make_config, cls_name = _TINY[family]
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(make_config()).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory, max_shard_size="40KB")
    assert (directory / INDEX_FILE).is_file()
    return model


def _reloaded(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir)


def _assert_bit_identical(expected_model, got_model):
    expected, got = expected_model.state_dict(), got_model.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("family, scan_layers", [
    ("llama", False), ("llama", True), ("mistral", False), ("mixtral", False), ("mixtral", True)])
def test_convert_then_export_reloads_bit_identical(tmp_path, family, scan_layers):
    original = _sharded_hf_model(tmp_path / "hf", family)
    config = convert_cli.convert(tmp_path / "hf", tmp_path / "wd", scan_layers=scan_layers)
    assert config.scan_layers == scan_layers and config.family == family
    assert sorted(os.listdir(tmp_path / "wd" / wd.CHECKPOINTS_DIR)) == ["0"]
    files = export_cli.export(tmp_path / "wd", tmp_path / "out", max_shard_size="40KB")
    assert INDEX_FILE in files and "config.json" in files and "generation_config.json" in files
    # the same tensor names as transformers wrote (tied lm_head left out like HF does)
    assert scan_checkpoint(tmp_path / "out").keys() == scan_checkpoint(tmp_path / "hf").keys()
    _assert_bit_identical(original, _reloaded(tmp_path / "out"))


def test_bfloat16_convert_and_export_match_torch_rounding(tmp_path):
    original = _sharded_hf_model(tmp_path / "hf", "llama", seed=3)
    config = convert_cli.convert(tmp_path / "hf", tmp_path / "wd", dtype="bfloat16")
    assert config.param_dtype == "bfloat16"
    export_cli.export(tmp_path / "wd", tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["dtype"] == saved["torch_dtype"] == "bfloat16"
    _assert_bit_identical(original.to(torch.bfloat16), _reloaded(tmp_path / "out"))

    # a float32 workdir exported with --dtype=bfloat16 rounds like torch too
    convert_cli.convert(tmp_path / "hf", tmp_path / "wd32")
    export_cli.main([f"--workdir={tmp_path / 'wd32'}", f"--out={tmp_path / 'out16'}", "--dtype=bfloat16"])
    _assert_bit_identical(original.to(torch.bfloat16), _reloaded(tmp_path / "out16"))


def test_cli_latest_step_by_default_and_refuses_to_overwrite(tmp_path):
    import jax

    original = _sharded_hf_model(tmp_path / "hf", "mistral", seed=4)
    assert convert_cli.main([f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'wd'}"]) == 0
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path / 'wd'} exists and is not empty")):
        convert_cli.main([f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'wd'}"])
    assert convert_cli.main([f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'wd'}",
                             "--overwrite"]) == 0

    # a "trained" step 7 whose weights are doubled: export picks it unless --step=0
    params, _ = weights.restore_full_params(tmp_path / "wd", step=0)
    wd.save_params(tmp_path / "wd", 7, jax.tree.map(lambda x: x * 2, params))
    assert export_cli.main([f"--workdir={tmp_path / 'wd'}", f"--out={tmp_path / 'latest'}"]) == 0
    assert export_cli.main([f"--workdir={tmp_path / 'wd'}", "--step=0",
                            f"--out={tmp_path / 'first'}"]) == 0
    _assert_bit_identical(original, _reloaded(tmp_path / "first"))
    latest = _reloaded(tmp_path / "latest").state_dict()
    for name, tensor in original.state_dict().items():
        assert torch.equal(latest[name], tensor * 2), name

    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path / 'first'} exists and is not empty")):
        export_cli.main([f"--workdir={tmp_path / 'wd'}", f"--out={tmp_path / 'first'}"])
    with pytest.raises(NotImplementedError, match=re.escape(
            "step 7 holds no LoRA adapters: --lora=adapter export needs the LoRA trainer")):
        export_cli.main([f"--workdir={tmp_path / 'wd'}", "--lora=adapter",
                         f"--out={tmp_path / 'adapter'}"])


def test_bad_checkpoints_fail_before_the_workdir_is_written(tmp_path):
    _sharded_hf_model(tmp_path / "hf", "llama", seed=5)
    index = json.loads((tmp_path / "hf" / INDEX_FILE).read_text())
    shard = tmp_path / "hf" / index["weight_map"]["model.norm.weight"]
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(SafetensorsError, match=re.escape(f"{shard}: tensor ") + ".*truncated file"):
        convert_cli.convert(tmp_path / "hf", tmp_path / "wd")
    assert not (tmp_path / "wd").exists()

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update(model_type="gemma2", architectures=["Gemma2ForCausalLM"])
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFConfigError, match=re.escape(
            f"{tmp_path / 'hf' / 'config.json'}: field 'model_type'='gemma2' is not supported")):
        convert_cli.convert(tmp_path / "hf", tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


def test_real_smollm2_round_trip_keeps_weights_tokenizer_and_chat_template(tmp_path, smollm2_hf_dir):
    from transformers import AutoConfig, AutoTokenizer

    from derta_jax.hf.safetensors_io import iter_checkpoint

    convert_cli.convert(smollm2_hf_dir, tmp_path / "wd")
    export_cli.export(tmp_path / "wd", tmp_path / "out", max_shard_size="200MB")
    assert len([f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")]) >= 3
    # every tensor bit-identical, with the names transformers wrote (tied: no lm_head)
    source = {name: array for name, array, _ in iter_checkpoint(smollm2_hf_dir)}
    exported = 0
    for name, array, _ in iter_checkpoint(tmp_path / "out"):
        assert array.dtype == source[name].dtype and np.array_equal(array, source[name]), name
        exported += 1
    assert exported == len(source)
    def public(config):
        return {k: v for k, v in config.to_dict().items() if not k.startswith("_")}

    assert (public(AutoConfig.from_pretrained(tmp_path / "out"))
            == public(AutoConfig.from_pretrained(smollm2_hf_dir)))

    source_tok = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    exported_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    assert exported_tok.chat_template and exported_tok.chat_template == source_tok.chat_template
    assert (exported_tok.apply_chat_template(messages, tokenize=False)
            == source_tok.apply_chat_template(messages, tokenize=False))
    assert ((tmp_path / "out" / "generation_config.json").read_text()
            == (smollm2_hf_dir / "generation_config.json").read_text())


def test_peft_loads_our_adapter_and_merges_like_merge_lora(tmp_path):
    """The PEFT adapter writer and merge_lora agree with peft itself on a tiny Llama."""
    import peft as hf_peft_library

    from derta_jax.hf.peft import peft_lora_config, write_peft_adapter

    base = _sharded_hf_model(tmp_path / "hf", "llama", seed=6)
    rank, alpha = 4, 16.0
    rng = np.random.default_rng(7)
    adapters, expected = [], {}
    for name, weight in base.state_dict().items():
        module = name.removesuffix(".weight")
        if not module.endswith(("q_proj", "v_proj", "down_proj")):
            continue
        w_hf = weight.numpy()  # [out, in]
        a = (0.1 * rng.standard_normal((w_hf.shape[1], rank))).astype(np.float32)  # ours: [in, r]
        b = (0.1 * rng.standard_normal((rank, w_hf.shape[0]))).astype(np.float32)  # ours: [r, out]
        lora_a, lora_b = peft.peft_lora_weights(a, b)
        adapters += [(f"base_model.model.{module}.lora_A.weight", lora_a),
                     (f"base_model.model.{module}.lora_B.weight", lora_b)]
        expected[name] = lora.merge_lora(w_hf.T.copy(), a, b, alpha, rank).T
    config = peft_lora_config(rank, alpha, ["q_proj", "v_proj", "down_proj"])
    write_peft_adapter(adapters, tmp_path / "adapter", config)

    peft_model = hf_peft_library.PeftModel.from_pretrained(base, tmp_path / "adapter")
    merged = peft_model.merge_and_unload().state_dict()
    assert len(expected) == 3 * len(base.model.layers)
    for name, weight in expected.items():
        np.testing.assert_allclose(merged[name].numpy(), weight, rtol=1e-5, atol=1e-6, err_msg=name)


def test_export_keeps_a_list_of_eos_ids_from_the_source_config(tmp_path):
    from transformers import AutoConfig

    _sharded_hf_model(tmp_path / "hf", "llama", seed=8)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["eos_token_id"] = [2, 5]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert convert_cli.convert(tmp_path / "hf", tmp_path / "wd").eos_token_id == 2
    export_cli.export(tmp_path / "wd", tmp_path / "out")
    assert AutoConfig.from_pretrained(tmp_path / "out").eos_token_id == [2, 5]


def test_load_hf_params_places_each_parameter_on_the_requested_sharding(tmp_path):
    """The trainer's start-from-HF path: tensors land straight on an 8-device mesh."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from derta_jax.hf.config import model_config_from_hf

    _sharded_hf_model(tmp_path / "hf", "llama", seed=9)
    config = model_config_from_hf(tmp_path / "hf", scan_layers=True)
    mesh = jax.make_mesh((8,), ("fsdp",))

    def wanted(leaf):  # shard the leading axis where it divides, replicate otherwise
        return NamedSharding(mesh, P("fsdp") if leaf.shape[0] % 8 == 0 else P())

    abstract = nnx.state(weights.abstract_model(config), nnx.Param)
    shardings = jax.tree.map(wanted, abstract)
    def flat(params):
        state = weights.abstract_params(config)
        nnx.replace_by_pure_dict(state, params)
        return dict(nnx.to_flat_state(state))

    sharded = flat(weights.load_hf_params(tmp_path / "hf", config, nnx.to_pure_dict(shardings)))
    plain = flat(weights.load_hf_params(tmp_path / "hf", config))
    requested = {path: v.get_value() for path, v in nnx.to_flat_state(shardings)}
    assert sharded.keys() == plain.keys() and len(sharded) > 5
    assert any(requested[p].spec == P("fsdp") for p in sharded)
    for path, variable in sharded.items():
        value = variable[...]
        assert value.sharding == requested[path], path
        np.testing.assert_array_equal(np.asarray(value), np.asarray(plain[path][...]))
