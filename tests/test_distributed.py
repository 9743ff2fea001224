"""qgnn_jax.distributed: when to join the distributed runtime (pure), single-process fallbacks.

The multi-process runs themselves are in tests/test_multiprocess.py.
"""
import numpy as np
import pytest

from qgnn_jax import distributed

SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    (SLURM, "slurm"),
    ({**SLURM, "SLURM_NTASKS": "1"}, None),            # a one-task job: nothing to join
    ({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, None),  # sbatch, not srun
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),     # a single-host TPU VM
])
def test_detect_cluster(env, expected):
  assert distributed.detect_cluster(env) == expected


def test_should_initialize():
  ok = ("127.0.0.1:1234", 2, 1)
  assert distributed.should_initialize("auto", *ok, environ={})
  assert not distributed.should_initialize("auto", environ={})
  assert distributed.should_initialize("auto", environ=SLURM)
  assert not distributed.should_initialize("off", environ=SLURM)
  assert distributed.should_initialize("on", environ={})
  with pytest.raises(ValueError, match="valid: auto, on, off"):
    distributed.should_initialize("maybe")
  with pytest.raises(ValueError, match="needs all of"):
    distributed.should_initialize("auto", "127.0.0.1:1234", None, 0)
  with pytest.raises(ValueError, match="HOST:PORT"):
    distributed.should_initialize("auto", "127.0.0.1", 2, 0)
  with pytest.raises(ValueError, match=r"port in \[1, 65535\]"):
    distributed.should_initialize("auto", "host:70000", 2, 0)
  with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, 2\)"):
    distributed.should_initialize("auto", "host:1234", 2, 2)
  with pytest.raises(ValueError, match="num_processes=0 must be >= 1"):
    distributed.should_initialize("auto", "host:1234", 0, 0)
  with pytest.raises(ValueError, match="'off' with"):
    distributed.should_initialize("off", *ok)


def test_single_process_fallbacks():
  topo = distributed.initialize("off")
  assert topo.process_count == 1 and topo.is_main and topo.local_devices == topo.global_devices
  assert distributed.is_main_process()
  x = np.arange(6).reshape(3, 2)
  np.testing.assert_array_equal(distributed.allgather(x), x)
  distributed.exit_on_error(RuntimeError("single process: returns, the caller re-raises"))
  with pytest.raises(ValueError, match="heartbeat_timeout_s=0"):
    distributed.initialize("off", heartbeat_timeout_s=0)
