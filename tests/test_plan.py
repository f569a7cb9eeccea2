"""The planner: analytic bytes against real sharded arrays (full fine-tuning and the
trainer's LoRA adapters over a frozen base), the compiled step against the analytic state, config errors naming the field, and the CLI.

mistral7b's step compiles for 8 fake devices at its real size in ~15-30 s on 2 cores
(scanned layers: one layer body), so the test plans the recipe as shipped."""

import importlib.metadata
import json
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from configs import mistral7b, mixtral8x7b_lora, tiny
from derta_jax import plan as planner
from derta_jax import weights
from derta_jax.models import lora
from derta_jax.models import sharding as sharding_lib
from derta_jax.train import flops, mesh as mesh_lib, plan_memory
from derta_jax.train.config import ConfigError, build_model_config
from derta_jax.train.state import opt_state_shardings
from derta_jax.train.optimizer import make_optimizer
from derta_jax.train import topology as topology_lib
from derta_jax.train.topology import parse_topology

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**mesh):
    c = tiny.get_config()
    c.model.scan_layers = True  # one compiled layer body: faster compiles
    for axis, size in mesh.items():
        c.mesh[axis] = size
    return c


def _device0_bytes(tree) -> int:
    """Bytes of the shards that really sit on device 0 (the slow, obvious reference)."""
    device = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree)
               for s in leaf.addressable_shards if s.device == device)


@pytest.mark.parametrize("use_lora", [False, True])
def test_state_bytes_match_real_sharded_arrays(use_lora):
    config = _tiny(data=2, fsdp=2, tensor=2)
    config.lora.update(enabled=use_lora, rank=4)
    model_cfg = build_model_config(config)
    sizes = {a: config.mesh[a] for a in ("data", "fsdp", "tensor", "expert")}
    analytic = plan_memory.state_memory(config, model_cfg, plan_memory.abstract_mesh(sizes))

    real_mesh = mesh_lib.make_mesh(config.mesh)
    _, trained, frozen, _ = plan_memory.abstract_parts(config, model_cfg)
    shardings = nnx.to_pure_dict(sharding_lib.state_shardings(trained, real_mesh))
    if use_lora:
        settings = lora.LoraSettings.from_config(config.lora)
        params = weights.init_adapters(model_cfg, settings, 0, shardings)
        base = weights.init_params(model_cfg, 0, nnx.to_pure_dict(
            sharding_lib.state_shardings(frozen, real_mesh)))
    else:
        params, base = weights.init_params(model_cfg, 0, shardings), {}
    optimizer = make_optimizer(config.optim, 100)
    opt_shardings = opt_state_shardings(optimizer, nnx.to_pure_dict(trained), shardings, real_mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)

    assert analytic.params_bytes == _device0_bytes(params) + _device0_bytes(base)
    assert analytic.opt_bytes == _device0_bytes(opt_state)
    assert analytic.grads_bytes == 2 * _device0_bytes(params)
    assert analytic.trained_count == sum(x.size for x in jax.tree.leaves(params))
    assert analytic.param_count == analytic.trained_count + sum(x.size for x in jax.tree.leaves(base))


def test_mistral7b_state_is_the_published_size_split_eight_ways():
    config = mistral7b.get_config()
    model_cfg = build_model_config(config)
    state = plan_memory.state_memory(config, model_cfg, plan_memory.abstract_mesh(
        dict(data=1, fsdp=8, tensor=1, expert=1)))
    d, f, v, layers = 4096, 14336, 32000, 32
    per_layer = d * (32 * 128) * 2 + d * (8 * 128) * 2 + 3 * d * f + 2 * d
    expected = layers * per_layer + 2 * v * d + d
    assert state.param_count == expected
    assert state.params_bytes == expected * 4 // 8  # every weight's embed dim divides by 8
    assert 0 <= state.opt_bytes - 2 * state.params_bytes < 64  # mu + nu (+ int32 counts)


def test_lora_plan_for_mixtral_counts_frozen_base_and_f32_adapters():
    config = mixtral8x7b_lora.get_config()
    plan = planner.make_plan(config, 8, parse_topology("v5p-16"), compile_step=False)
    cfg = build_model_config(config)
    r, d, f, e = config.lora.rank, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    attn = r * ((d + 32 * 128) * 2 + (d + 8 * 128) * 2)
    adapters = cfg.num_layers * (attn + 3 * e * r * (d + f))
    assert plan["trained_params"] == adapters
    assert plan["params"] - adapters == 46_702_792_704  # Mixtral-8x7B's published size
    d = plan["per_device"]
    assert 0 <= d["optimizer"] - d["grads"] < 64  # f32 mu + nu (+ int32 counts) = 2 gradients
    assert all(isinstance(v, int) and v > 0 for v in plan["per_device"].values())


@pytest.mark.parametrize("use_lora", [False, True])
def test_compiled_arguments_equal_the_analytic_state_tiny(use_lora):
    config = _tiny(fsdp=8)
    config.data.max_length = 64
    config.lora.update(enabled=use_lora, rank=4, dropout=0.05)  # dropout keys under scan
    plan = planner.make_plan(config, 8, parse_topology("v5e-8"))
    d, k = plan["per_device"], plan["compiled"]
    # arguments = step + params + optimizer + rng + batch; the scalars are a few bytes
    assert 0 <= k["argument_bytes"] - (d["params"] + d["optimizer"] + d["batch"]) < 64
    assert k["alias_bytes"] > 0  # the state is donated
    assert plan["fits"] and plan["headroom_bytes"] == 16 * 2**30 - k["peak_bytes"]
    b = plan["batch"]
    assert (b["micro_batches"], b["seqs_per_device"], b["batch_devices"]) == (1, 2, 8)


def test_mistral7b_recipe_step_compiles_on_eight_devices():
    """The recipe as shipped (scanned layers, seq 1024, 4 micro-batches of 32 sequences)."""
    config = mistral7b.get_config()
    plan = planner.make_plan(config, 8, parse_topology("v5p-16"))
    d, k = plan["per_device"], plan["compiled"]
    assert 0 <= k["argument_bytes"] - (d["params"] + d["optimizer"] + d["batch"]) < 64
    assert k["temp_bytes"] >= d["params"]  # at least one f32 gradient accumulator
    assert plan["fits"] == (k["peak_bytes"] <= 95 * 2**30)
    assert plan["batch"]["seqs_per_device"] == 128 // 4 // 8
    tokens = 128 * 1024
    expected = flops.training_flops_per_token(build_model_config(config), 1024) * tokens
    assert plan["speed"]["step_seconds"] == pytest.approx(expected / (8 * 459e12 * 0.4))


def test_comm_volume_formula():
    state = plan_memory.StateMemory(10, 10, params_bytes=1000, grads_bytes=600, opt_bytes=0,
                                    trained_bytes_total=0, params_bytes_total=0)
    v = plan_memory.comm_volume(state, dict(data=2, fsdp=4, tensor=1, expert=1), micro_batches=3)
    assert v.fsdp_all_gather == 3 * 2 * 4000 * 3 // 4
    assert v.fsdp_reduce_scatter == 3 * 1200 * 3 // 4
    assert v.data_all_reduce == 2 * 300 // 2


@pytest.mark.parametrize("mesh, devices, message", [
    (dict(fsdp=3), 8, "mesh={'data': 1, 'fsdp': 3, 'tensor': 1, 'expert': 1}: axis sizes "
                      "multiply to 3, but there are 8 devices"),
    (dict(fsdp=-1, tensor=3), 8, "mesh.fsdp=-1: the other axes (3 devices) do not divide the 8 devices"),
])
def test_sharding_mistakes_fail_with_the_config_error(mesh, devices, message):
    with pytest.raises(ConfigError) as err:
        planner.make_plan(_tiny(**mesh), devices, compile_step=False)
    assert str(err.value) == message


def test_indivisible_batch_names_the_field():
    config = _tiny(fsdp=8)
    config.train.batch_size = 12
    with pytest.raises(ConfigError, match=r"^train\.batch_size=12: the micro-batch of 12 sequences"):
        planner.make_plan(config, 8, compile_step=False)


def test_topologies_and_memory_per_device():
    v5p = parse_topology("v5p-64")
    assert (v5p.num_devices, v5p.hbm_bytes, v5p.tpu_topology) == (32, 95 * 2**30, "v5p:2x4x4")
    assert parse_topology("v5litepod-16").num_devices == 16
    assert parse_topology("a100-40gbx8").hbm_bytes == 40e9
    assert flops.hbm_bytes_for("NVIDIA A100-SXM4-40GB") == 40e9
    assert flops.hbm_bytes_for("NVIDIA A100-SXM4-80GB") == 80e9
    assert flops.hbm_bytes_for("TPU v5 lite") == 16 * 2**30
    assert flops.hbm_bytes_for("cpu") == 0
    with pytest.raises(ValueError, match=r"^--topology=v5p-12: v5p slices come in powers of two"):
        parse_topology("v5p-12")
    with pytest.raises(ValueError, match=r"^--topology=tpu9: unknown"):
        parse_topology("tpu9")


def test_parse_mesh_rejects_unknown_axes():
    assert mesh_lib.parse_mesh("data:2, fsdp:-1") == {"data": 2, "fsdp": -1}
    with pytest.raises(ValueError) as err:
        mesh_lib.parse_mesh("data:2,fsdq:4")
    assert str(err.value) == ("--mesh=data:2,fsdq:4: 'fsdq:4' is not AXIS:SIZE with AXIS in "
                              "('data', 'fsdp', 'tensor', 'expert')")


def test_compile_target_falls_back_to_cpu_without_libtpu(monkeypatch):
    monkeypatch.setattr(topology_lib, "libtpu_version", lambda: None)
    v5p, h100 = parse_topology("v5p-64"), parse_topology("h100x8")
    target, notes = planner.compile_target("auto", v5p)
    assert target == "cpu" and len(notes) == 1
    assert f"pip install '{topology_lib.libtpu_requirement()}'" in notes[0] and "v5p:2x4x4" in notes[0]
    assert planner.compile_target("auto", h100) == ("cpu", [])
    assert planner.compile_target("cpu", v5p) == ("cpu", [])
    for bad in (h100, None):
        with pytest.raises(planner.PlanError, match=r"^--compile_on=tpu needs a TPU --topology"):
            planner.compile_target("tpu", bad)
    with pytest.raises(ImportError, match=r"--topology=v5p-64 needs libtpu.*pip install 'libtpu"):
        topology_lib.compile_only_devices(v5p)
    monkeypatch.setattr(topology_lib, "libtpu_version", lambda: "0.0.42.1")
    assert planner.compile_target("auto", v5p) == ("tpu", [])


def test_libtpu_requirement_is_what_jax_tpu_pins():
    pins = [r for r in importlib.metadata.requires("jax") if r.startswith("libtpu")]
    assert pins and pins[0].startswith(topology_lib.libtpu_requirement())


_NO_LIBTPU = "libtpu is not installed (pip install 'libtpu==0.0.42.*' to run the TPU-topology compile)"


@pytest.mark.skipif(topology_lib.libtpu_version() is None, reason=_NO_LIBTPU)
def test_compile_for_a_real_tpu_topology():
    """The step compiled by TPU XLA for a v5p slice's compile-only devices (no TPU here)."""
    devices = topology_lib.compile_only_devices(parse_topology("v5p-64"))
    assert len(devices) == 32 and {d.platform for d in devices} == {"tpu"}
    assert len({d.process_index for d in devices}) == 8  # a multi-host slice, described
    for name, chips in [("v4-32", 16), ("v5litepod-16", 16), ("v6e-8", 8)]:  # one device per chip
        assert len(topology_lib.compile_only_devices(parse_topology(name))) == chips
    config = _tiny(fsdp=4)
    config.data.max_length = 64
    # widths whose shards fill TPU's 128-lane tiles (tiny's 128/4 = 32 would be padded 4x)
    config.model.update(hidden_size=512, intermediate_size=1024, head_dim=128, num_layers=2)
    plan = planner.make_plan(config, 4, parse_topology("v5p-8"), compile_on="tpu")
    d, k = plan["per_device"], plan["compiled"]
    assert k["backend"].startswith("tpu v5p:2x2x1 compile-only devices, libtpu ")
    state = d["params"] + d["optimizer"] + d["batch"]
    assert 0 <= k["argument_bytes"] - state < 0.01 * state  # only the norm vectors' tile padding
    assert k["alias_bytes"] > 0 and k["temp_bytes"] > 0
    assert plan["headroom_bytes"] == 95 * 2**30 - k["peak_bytes"]
    assert not any("XLA:CPU" in n for n in plan["notes"])
    assert k["attention"] == "xla"  # 64 tokens: the splash kernel takes multiples of 128
    config.data.max_length = 128
    plan = planner.make_plan(config, 4, parse_topology("v5p-8"), compile_on="tpu")
    assert plan["compiled"]["attention"] == "pallas"  # auto on TPU: the splash kernel


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "derta_jax.plan", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_sets_its_own_device_count_and_prints_json():
    done = _cli("--config=configs/tiny.py", "--mesh=data:2,fsdp:2", "--topology=h100x4",
                "--format=json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["devices"] == 4 and plan["mesh"]["fsdp"] == 2
    assert plan["compiled"]["backend"] == "cpu (fake devices)" and plan["fits"]


def test_cli_error_names_the_field():
    done = _cli("--config=configs/tiny.py", "--mesh=fsdp:3", "--devices=4", "--nocompile")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: mesh={'data': 1, 'fsdp': 3, 'tensor': 1, 'expert': 1}: axis sizes multiply "
        "to 3, but there are 4 devices")


@pytest.mark.parametrize("args, message", [
        (("--config=configs/tiny.py", "--bogus=1"), "error: --bogus: unknown flag"),
        (("--config=configs/tiny.py", "--config.loss.rto_keeprate=0.5"),
         "error: --config.loss.rto_keeprate: no field 'rto_keeprate' in the config"),
        ((), "error: --config: required, not given"),
])
def test_cli_bad_flags_are_one_line_with_status_2(args, message):
    done = _cli(*args, "--nocompile")
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith(message)
    assert done.stdout == ""


def test_cli_tpu_topology_compiles_for_the_slice_when_libtpu_is_installed():
    """--compile_on=auto (the default): the slice's own compiler with libtpu, else fake CPUs
    and a note saying what to install."""
    done = _cli("--config=configs/tiny.py", "--config.data.max_length=64", "--topology=v5p-8",
                "--format=json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    backend, notes = plan["compiled"]["backend"], " ".join(plan["notes"])
    if topology_lib.libtpu_version() is None:
        assert backend == "cpu (fake devices)" and "pip install 'libtpu==" in notes
    else:
        assert backend.startswith("tpu v5p:2x2x1 compile-only devices") and "libtpu" not in notes


def test_device_count_defaults_to_the_smallest_machine_the_mesh_allows():
    config = _tiny()  # mesh.fsdp = -1
    assert planner.plan_device_count(config, 0, 0) == 1
    config.mesh.data = 2
    assert planner.plan_device_count(config, 0, 0) == 2
    assert planner.plan_device_count(config, 32, 0) == 32
    assert planner.plan_device_count(config, 0, 8) == 8
    with pytest.raises(planner.PlanError, match=r"^--devices=8 but the topology has 32 devices$"):
        planner.plan_device_count(config, 32, 8)


def test_planner_traces_moe_per_shard_like_the_trainer(monkeypatch):
    """The planner compiles the step under the mesh (as the trainer runs it), so a MoE
    block dispatches per shard; compiled without the mesh it would sort the whole batch
    on every device and the planner's temporaries would not be the trainer's."""
    from derta_jax.models import moe

    calls = []
    real = jax.shard_map
    monkeypatch.setattr(moe.jax, "shard_map", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = _tiny(fsdp=8)
    config.model.update(family="mixtral", num_experts=4, num_experts_per_tok=2, num_layers=1)
    config.data.max_length = 64
    plan = planner.make_plan(config, 8, parse_topology("v5e-8"))
    assert calls, "the MoE block was traced without the ambient mesh"
    assert plan["compiled"]["peak_bytes"] > 0


def test_planner_and_trainer_lower_the_same_step(tmp_path):
    """The planner's abstract inputs and the trainer's real ones (initialised state, frozen
    base, a batch of the real data pipeline, placed as train/loop.py places them) compile to
    the same memory figures: the planner prices the step the trainer runs."""
    import numpy as np

    from derta_jax.train.data import build_training_data
    from derta_jax.train.loop import _global_batch
    from derta_jax.train.state import assemble

    config = _tiny(fsdp=8)
    config.workdir = str(tmp_path)
    config.model.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                        num_kv_heads=1, head_dim=16)
    config.data.update(synthetic_triples=20, synthetic_helpful=40, num_safety=20, max_length=96)
    config.train.update(batch_size=8, max_steps=2)
    config.lora.update(enabled=True, rank=4)  # the trained/frozen split: the harder case
    a = assemble(config, mesh_lib.make_mesh(config.mesh), total_steps=2)
    data = build_training_data(config, tmp_path, process_index=0, process_count=1)
    batch = _global_batch(next(data.pipeline.iterator()), a.batch_sharding)
    def memory(lowered) -> tuple:
        stats = lowered.compile().memory_analysis()
        return (stats.argument_size_in_bytes, stats.output_size_in_bytes,
                stats.alias_size_in_bytes, stats.temp_size_in_bytes)

    planned = memory(a.lower(*a.abstract_inputs()))
    trained = memory(a.lower(a.init_state(), a.load_frozen(), batch))
    assert planned == trained and planned[0] > 0
    assert np.asarray(batch["input_ids"]).shape == (8, 96)


# --- evaluation plans (--eval) ---------------------------------------------------------------

def test_eval_plan_counts_weights_and_kv_cache_like_real_arrays():
    import functools

    from derta_jax.models.attention import init_kv_cache

    config = _tiny(data=2, fsdp=2, tensor=2)
    plan = planner.make_eval_plan(config, 8, parse_topology("v5e-8"), batch_size=6,
                                  max_new_tokens=16, prompt_len=32)
    assert (plan["decode"]["rows"], plan["decode"]["cache_len"]) == (8, 48)  # 6 rows -> 2 x 4
    model_cfg = build_model_config(config)
    real_mesh = mesh_lib.make_mesh(config.mesh)
    params = weights.init_params(model_cfg, 0, nnx.to_pure_dict(
        sharding_lib.state_shardings(weights.abstract_params(model_cfg), real_mesh)))
    cache = jax.jit(functools.partial(init_kv_cache, model_cfg, 8, 48),
                    out_shardings=sharding_lib.kv_cache_shardings(model_cfg, real_mesh, 8, 48))()
    d = plan["per_device"]
    assert d["weights"] == _device0_bytes(params)
    assert d["kv_cache"] == _device0_bytes((cache.k, cache.v))
    # the compiled loop's arguments: weights + cache + per-row segments and logits (2 rows
    # per batch shard) + a few scalars
    k = plan["compiled"]["decode"]
    rows_here = 8 // 4
    extra = _device0_bytes(cache.segment_ids) + rows_here * model_cfg.vocab_size * 4
    assert 0 <= k["argument_bytes"] - (d["weights"] + d["kv_cache"] + extra) < 256
    assert k["alias_bytes"] > 0  # the carry is donated
    assert plan["fits"] and d["peak"] == max(c["peak_bytes"] for name, c in
                                             plan["compiled"].items() if name != "backend")


@pytest.mark.parametrize("topology", ["h100x8", "v5p-16"])
def test_cli_eval_plan_llama3_70b_fits_its_evaluation(topology):
    done = _cli("--config=configs/llama3_70b_lora.py", f"--topology={topology}", "--eval",
                "--batch_size=64", "--max_new_tokens=512", "--nocompile", "--format=json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["mode"] == "eval" and plan["fits"]
    assert 70e9 < plan["params"] < 71e9
    # bf16 weights split 8 ways; 80 layers x 8 kv heads x 128 x (prompt + 512) slots x 64 rows
    cache_len = plan["decode"]["prompt_len"] + 512
    assert plan["total"]["kv_cache"] == 2 * 80 * 64 * cache_len * 8 * 128 * 2
    # split 8 ways over fsdp (the few arrays fsdp does not divide, like norms, stay whole)
    assert plan["total"]["weights"] / 8 <= plan["per_device"]["weights"] <= (
        plan["total"]["weights"] / 8 * 1.001)


def test_cli_eval_plan_refuses_a_cache_longer_than_the_model():
    done = _cli("--config=configs/tiny.py", "--eval", "--max_new_tokens=100000", "--nocompile")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: --prompt_len + --max_new_tokens = ")
