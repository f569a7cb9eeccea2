"""distributed.initialize=auto: multi-process launches are detected from their environment
(and a plain Cloud TPU VM slice from its metadata), single-host runs are left alone.
No real jax.distributed.initialize() runs here: it is replaced by a recorder."""

import os

import jax
import pytest

from derta_jax.train import cluster
from derta_jax.train.cluster import initialize_distributed
from derta_jax.train.config import ConfigError, default_config, validate

SLURM = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
         "SLURM_STEP_NODELIST": "node[1-2]"}


def _no_tpu():
    return 0


def _no_metadata(key):
    raise AssertionError(f"metadata queried for {key} without TPU chips")


def _reason(environ, tpu_chips=_no_tpu, metadata=_no_metadata):
    return cluster.multi_process_reason(environ, tpu_chips, metadata)


@pytest.mark.parametrize("environ", [
    {},
    {"TPU_WORKER_HOSTNAMES": "localhost"},  # GKE single-host pod
    {**SLURM, "SLURM_NTASKS": "1"},  # one task owning all of its node's GPUs
    {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "4"},  # sbatch script body, outside srun
    {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "1"},
    {"TPU_SKIP_MDS_QUERY": "1"},
])
def test_single_process_launches_are_not_initialized(environ):
    assert _reason(environ) is None


@pytest.mark.parametrize("environ, expected", [
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS is set"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "h0"}, "multislice job (MEGASCALE_COORDINATOR_ADDRESS is set)"),
    ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}, "TPU pod with 4 workers (TPU_WORKER_HOSTNAMES)"),
    ({"TPU_PROCESS_ADDRESSES": "h0:8476,h1:8476"}, "TPU pod with 2 workers (TPU_PROCESS_ADDRESSES)"),
    ({**SLURM, "SLURM_NTASKS": "2"}, "SLURM step with 2 tasks"),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "8"}, "Open MPI job with 8 ranks"),
])
def test_multi_process_launches_are_detected_from_the_environment(environ, expected):
    assert _reason(environ) == expected


def _metadata(values):
    asked = []

    def get(key):
        asked.append(key)
        return values.get(key)
    return get, asked


def test_plain_tpu_vm_slice_is_detected_from_metadata():
    get, asked = _metadata({"worker-network-endpoints": "t1k-0:w-0:10.0.0.2,t1k-1:w-1:10.0.0.3"})
    assert _reason({}, lambda: 4, get) == ("Cloud TPU VM slice with 2 workers "
                                           "(metadata worker-network-endpoints)")
    assert asked == ["worker-network-endpoints"]


def test_single_host_tpu_vm_and_multislice_from_tpu_env():
    one_host = {"worker-network-endpoints": "10.0.0.2", "tpu-env": "ACCELERATOR_TYPE: 'v5p-8'\n"}
    assert _reason({}, lambda: 4, _metadata(one_host)[0]) is None
    two_slices = dict(one_host, **{"tpu-env": "MEGASCALE_NUM_SLICES: '2'\nZONE: 'us-east5-a'"})
    assert _reason({}, lambda: 4, _metadata(two_slices)[0]) == (
        "Cloud TPU multislice with 2 slices (metadata tpu-env)")
    assert _reason({}, lambda: 4, _metadata({})[0]) is None  # attributes missing: one host


def test_unreachable_metadata_on_a_tpu_host_says_what_to_set():
    def down(key):
        raise OSError("timed out")
    with pytest.raises(RuntimeError, match="distributed.initialize=always on a multi-host"):
        _reason({}, lambda: 4, down)


def test_tpu_chips_are_counted_from_pci_ids(tmp_path):
    for name, vendor, device in [("a", "0x1ae0", "0x0062"), ("b", "0x1ae0", "0x0062"),
                                 ("c", "0x1ae0", "0x0042"),  # gVNIC: Google, not a TPU
                                 ("d", "0x10de", "0x2330")]:  # an NVIDIA H100
        (tmp_path / name).mkdir()
        (tmp_path / name / "vendor").write_text(vendor + "\n")
        (tmp_path / name / "device").write_text(device + "\n")
    (tmp_path / "e").mkdir()  # unreadable entries are skipped
    assert cluster.tpu_chips_attached(str(tmp_path)) == 2


@pytest.fixture
def recorded_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    monkeypatch.setattr(cluster, "tpu_chips_attached", _no_tpu)
    for key in list(os.environ):
        if key.startswith(("SLURM_", "TPU_", "MEGASCALE_", "OMPI_", "JAX_COORDINATOR")):
            monkeypatch.delenv(key)
    return calls


def test_trainer_initializes_only_multi_process_launches(recorded_initialize, monkeypatch):
    config = default_config()
    initialize_distributed(**config.distributed.to_dict())
    assert recorded_initialize == []
    for key, value in dict(SLURM, SLURM_NTASKS="2").items():
        monkeypatch.setenv(key, value)
    initialize_distributed(**config.distributed.to_dict())
    assert recorded_initialize == [{}]
    config.distributed.initialize = "never"
    initialize_distributed(**config.distributed.to_dict())
    assert recorded_initialize == [{}]


def test_always_and_explicit_coordinator(recorded_initialize):
    config = default_config()
    config.distributed.initialize = "always"
    initialize_distributed(**config.distributed.to_dict())
    config.distributed.update(initialize="auto", coordinator_address="h0:1234", num_processes=2,
                              process_id=1)
    initialize_distributed(**config.distributed.to_dict())
    assert recorded_initialize == [{}, dict(coordinator_address="h0:1234", num_processes=2,
                                            process_id=1)]


def test_unknown_initialize_value_names_the_field(recorded_initialize):
    config = default_config()
    config.data.synthetic = True
    config.distributed.initialize = "yes"
    with pytest.raises(ConfigError, match=r"^distributed\.initialize='yes': use auto, always or never$"):
        validate(config)
    with pytest.raises(ValueError, match=r"^initialize='yes': use auto, always or never$"):
        initialize_distributed(**config.distributed.to_dict())
    assert recorded_initialize == []
