"""Is this process one of several that must call `jax.distributed.initialize()`?

Why: `distributed.initialize=auto` has to start the distributed runtime on every multi-host
launch (srun with several tasks, a GKE/xpk TPU pod, a multislice job, a plain Cloud TPU VM
slice started with `gcloud ... ssh --worker=all`) and never on a single-host CPU, GPU or TPU
run, where initialize() adds nothing but a coordinator (and under SLURM would pin the task
to one GPU). JAX's own cluster detection is private and answers "on a cluster", not "more
than one process", so this module answers that from the environment and, only when TPU
chips are attached to this machine, from the GCE metadata server (a plain TPU VM slice sets
no environment variables; its worker list lives in the metadata).
"""

from __future__ import annotations

import glob
import logging
import os
import urllib.error
import urllib.request
from typing import Callable, Mapping, Optional

import jax

log = logging.getLogger(__name__)

_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v3, v4, v5p, v5e, v6e, TPU7x); Google's other PCI devices
# (gVNIC, NVMe) share the vendor id, so the device id is what says "TPU".
_TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f",
                              "0x0076"})
_METADATA = "http://{host}/computeMetadata/v1/instance/attributes/{key}"
INITIALIZE_MODES = ("auto", "always", "never")


def tpu_chips_attached(sysfs: str = "/sys/bus/pci/devices") -> int:
    """TPU chips on this machine's PCI bus (0 on laptops, GPU hosts, CI)."""
    chips = 0
    for device_dir in glob.glob(os.path.join(sysfs, "*")):
        try:
            with open(os.path.join(device_dir, "vendor"), encoding="ascii") as f:
                vendor = f.read().strip()
            with open(os.path.join(device_dir, "device"), encoding="ascii") as f:
                device = f.read().strip()
        except OSError:
            continue
        chips += vendor == _GOOGLE_PCI_VENDOR and device in _TPU_PCI_DEVICES
    return chips


def gce_metadata(key: str, timeout: float = 5.0) -> Optional[str]:
    """A TPU VM's instance attribute (None when the server has no such key)."""
    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    request = urllib.request.Request(_METADATA.format(host=host, key=key),
                                     headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode()
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise


def _entries(value: Optional[str]) -> int:
    return len([v for v in (value or "").split(",") if v.strip()])


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ.get(key, "") or 0)
    except ValueError:
        return 0


def _tpu_env_value(tpu_env: str, key: str) -> str:
    """`MEGASCALE_NUM_SLICES: '2'` lines of the `tpu-env` attribute -> '2'."""
    for line in tpu_env.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip().strip("'\"")
    return ""


def multi_process_reason(environ: Mapping[str, str] = os.environ,
                         tpu_chips: Callable[[], int] = tpu_chips_attached,
                         metadata: Callable[[str], Optional[str]] = gce_metadata,
                         flag: str = "--config.distributed.initialize") -> Optional[str]:
    """Why this launch has several processes (a sentence for the log), or None for one.

    Checked in order: an explicit JAX coordinator; a multislice job; a GKE TPU pod's worker
    list; an srun step with several tasks; an Open MPI job with several ranks; the worker
    list of a Cloud TPU VM slice in the metadata server (queried only when TPU chips are
    attached and TPU_SKIP_MDS_QUERY is unset)."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "multislice job (MEGASCALE_COORDINATOR_ADDRESS is set)"
    for key in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        if _entries(environ.get(key)) > 1:
            return f"TPU pod with {_entries(environ.get(key))} workers ({key})"
    slurm_keys = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                  "SLURM_STEP_NODELIST")
    if all(k in environ for k in slurm_keys) and _int(environ, "SLURM_NTASKS") > 1:
        return f"SLURM step with {_int(environ, 'SLURM_NTASKS')} tasks"
    if "OMPI_MCA_orte_hnp_uri" in environ and _int(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return f"Open MPI job with {_int(environ, 'OMPI_COMM_WORLD_SIZE')} ranks"
    if environ.get("TPU_SKIP_MDS_QUERY") is not None or not tpu_chips():
        return None
    try:
        workers = _entries(metadata("worker-network-endpoints"))
        if workers > 1:
            return f"Cloud TPU VM slice with {workers} workers (metadata worker-network-endpoints)"
        slices = _tpu_env_value(metadata("tpu-env") or "", "MEGASCALE_NUM_SLICES")
    except (OSError, ValueError) as err:  # URLError is an OSError
        raise RuntimeError(
            f"TPU chips are attached but the GCE metadata server did not answer ({err}); "
            f"set {flag}=always on a multi-host slice or =never on a single host") from err
    if slices.isdigit() and int(slices) > 1:
        return f"Cloud TPU multislice with {slices} slices (metadata tpu-env)"
    return None


def initialize_distributed(initialize: str, *, coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1, cpu_collectives: str = "gloo",
                           flag: str = "--config.distributed.initialize") -> None:
    """jax.distributed.initialize, the one place every command (train, evaluate) starts the
    multi-process runtime. initialize: always; never; auto = only when a coordinator is given or
    `multi_process_reason` sees a multi-process launch (single-host runs skip it). Without a
    coordinator address JAX finds the cluster itself (SLURM, TPU pods, Open MPI). `flag`
    names the setting in messages (the trainer's config field, evaluate's --distributed)."""
    if initialize not in INITIALIZE_MODES:
        raise ValueError(f"initialize={initialize!r}: use auto, always or never")
    if initialize == "never":
        return
    if initialize == "auto" and not coordinator_address:
        reason = multi_process_reason(flag=flag)
        if reason is None:
            return
        log.info("distributed initialize=auto: %s; calling jax.distributed.initialize()", reason)
    # CPU-only multi-process runs (tests, laptops) need a collectives backend; GPU and TPU
    # clients ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = {}
    if coordinator_address:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
    jax.distributed.initialize(**kwargs)
