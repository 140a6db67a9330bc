"""Multi-process start-up: launcher detection (SLURM, Open MPI), the unreachable-coordinator error,
and 4 CPU processes over gloo, started from environment variables, reproducing one process."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from training import distributed
from test_train import ROOT, corpus, env, losses, small, train  # noqa: F401  (corpus is a fixture)

LAUNCHER_VARS = ("SLURM_", "OMPI_", "TESSERA_", "TPU_", "KUBERNETES_", "JAX_COORDINATOR", "PMI_")


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(LAUNCHER_VARS):
            monkeypatch.delenv(k)
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    return calls


def listening_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_single_process_initializes_nothing(clean_env, monkeypatch):
    assert distributed.detect_cluster() is None and distributed.initialize() is False
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    for k, v in {"SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(k, v)
    assert distributed.detect_cluster().__name__ == "SlurmCluster"
    assert distributed.initialize() is False and clean_env == []


@pytest.mark.parametrize("launcher", ["slurm", "openmpi"])
def test_a_detected_multi_process_job_initializes(clean_env, monkeypatch, launcher):
    server = listening_port()  # stands in for process 0's coordinator service
    port = server.getsockname()[1]
    monkeypatch.setenv("JAX_COORDINATOR_PORT", str(port))
    if launcher == "slurm":
        values = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "4",
                  "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}
    else:
        values = {"OMPI_MCA_orte_hnp_uri": f"1234.0;tcp://127.0.0.1:{port}", "OMPI_COMM_WORLD_SIZE": "4",
                  "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    env_cls = distributed.detect_cluster()
    assert env_cls.__name__ == {"slurm": "SlurmCluster", "openmpi": "OmpiCluster"}[launcher]
    assert env_cls.get_process_count() == 4 and env_cls.get_process_id() == 3
    assert distributed.initialize(timeout=5) is True
    # jax's own detection fills in coordinator, count and id; the timeout is ours.
    assert clean_env == [((None, None, None), {"initialization_timeout": 5})]
    server.close()


def test_unreachable_coordinator_is_a_one_line_error(corpus, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = {**env(1), "TESSERA_COORDINATOR": f"127.0.0.1:{port}", "TESSERA_NUM_PROCESSES": "2",
         "TESSERA_PROCESS_ID": "1", "TESSERA_INIT_TIMEOUT": "2"}
    out = subprocess.run([sys.executable, "train.py", *small(corpus, tmp_path / "run")], cwd=ROOT, env=e,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"error: process 1 could not reach the coordinator 127.0.0.1:{port} within 2s")
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_four_processes_from_environment_variables_reproduce_one(corpus, tmp_path):
    common = ["train.steps=3", "train.eval_every=0", "checkpoint.every=1000", "train.final_eval=false"]
    single = train(small(corpus, tmp_path / "single", *common), devices=4, timeout=600)
    assert single.returncode == 0, single.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "train.py", *small(corpus, tmp_path / "multi", *common)], cwd=ROOT,
                              env={**env(1), "TESSERA_COORDINATOR": f"127.0.0.1:{port}",
                                   "TESSERA_NUM_PROCESSES": "4", "TESSERA_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    a, b = losses(tmp_path / "single"), losses(tmp_path / "multi")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-6)
