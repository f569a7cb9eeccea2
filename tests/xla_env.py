"""XLA_FLAGS for the test session and the processes tests start (see tests/conftest.py).

Every process of a comparison gets the same compile options, so that in-process and
subprocess results stay comparable."""

# LLVM optimisation level 0: compiling is most of a small test's cost (tests/conftest.py)
TEST_XLA_OPTIONS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a CPU process with `devices` fake devices."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_OPTIONS}"
