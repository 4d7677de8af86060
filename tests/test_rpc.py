"""Offload through llama.cpp's RPC backend: a real non-CPU device on a machine without a GPU.

RPC servers run on 127.0.0.1 only, started and stopped by fixtures. Registering a server is
process-wide in llama.cpp, so every check runs in a child process (``rpc_child.py``): the test
session's own models never see the RPC devices.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from helpers import free_port, start_rpc_server

TESTS = Path(__file__).resolve().parent
ORDER = "0-29,8-22"      # 1.5x self-merge of SmolLM2 (45 positions)
PRUNED = "0-19,25-29"    # 5 weight layers left out


@pytest.fixture(scope="module")
def servers() -> Iterator[list[str]]:
    started = [start_rpc_server() for _ in range(2)]
    yield [f"127.0.0.1:{port}" for _, port in started]
    for proc, _ in started:
        proc.kill()
        proc.wait(timeout=10)


def _child(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
    return subprocess.run([sys.executable, str(TESTS / "rpc_child.py"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _report(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("n_gpu_layers", [16, 99], ids=["partial", "full"])
def test_kv_on_the_weight_device_and_bit_identical(smollm2_path, servers, n_gpu_layers):
    rep = _report(_child("offload", smollm2_path, ORDER, str(n_gpu_layers), servers[0]))
    order, devices, weight_dev = rep["order"], rep["devices"], rep["weight_devices"]
    assert len(devices) == len(order) == 45
    for p, il in enumerate(order):
        assert devices[p] == weight_dev[il], f"position {p} (weight {il}) on {devices[p]}, weights on {weight_dev[il]}"
    assert "RPC0" in devices
    if n_gpu_layers == 16:
        assert "CPU" in devices and weight_dev[14] == "CPU" and weight_dev[15] == "RPC0"
    # the K/V buffers really are split that way: bytes per device = positions on it x bytes per position
    kv = rep["kv_buffer_mib"]
    per_position = sum(kv.values()) / len(order)
    for dev, mib in kv.items():
        assert abs(mib - per_position * devices.count(dev)) < 0.02, (dev, mib, devices.count(dev))
    assert rep["identical_batch"] and rep["identical_incremental"]


def test_two_servers_split_the_layers(smollm2_path, servers):
    rep = _report(_child("offload", smollm2_path, ORDER, "99", *servers))
    devices, weight_dev = rep["devices"], rep["weight_devices"]
    assert {"RPC0", "RPC1"} <= set(devices) or len(set(devices) - {"CPU"}) == 2
    for p, il in enumerate(rep["order"]):
        assert devices[p] == weight_dev[il]
    assert rep["identical_batch"] and rep["identical_incremental"]


def test_pruned_layers_are_not_uploaded(smollm2_path, servers):
    rep = _report(_child("upload", smollm2_path, PRUNED, servers[0]))
    dropped = rep["dropped_layer_mib"]
    assert dropped > 5
    assert abs((rep["full_rpc_mib"] - rep["pruned_rpc_mib"]) - dropped) < 0.05, rep


def test_unreachable_server_is_a_python_error(smollm2_path):
    rep = _report(_child("unreachable", smollm2_path, f"127.0.0.1:{free_port()}"))
    assert rep["error"] == "ConnectionError"
    assert "does not answer" in rep["message"]
    assert rep["alive"]


def test_a_dying_server_never_takes_the_process_down(smollm2_path):
    """SIGKILL of the server during prompt processing, token generation, model upload and while
    idle: each time the Python process survives, the call raises (ConnectionError, or the load's
    ValueError when the server is gone before any buffer exists), later calls on that model fail the
    same way, a CPU model in the same process still answers exactly, and a restarted server on the
    same port is used again by the next load."""
    rep = _report(_child("server-dies", smollm2_path, timeout=600))
    for case in ("prompt", "generation", "output_only"):
        assert rep[case].startswith("ConnectionError: RPC server 127.0.0.1:"), rep
        assert "failed" in rep[case]
    assert rep["prompt_again"].startswith(("ConnectionError", "RuntimeError")), rep
    assert rep["upload"] == "ok" or rep["upload"].startswith(("ConnectionError", "ValueError")), rep
    # while idle: a load naming the dead server raises; one using every registered server leaves it out
    assert rep["idle_named"].startswith("ConnectionError") and "does not answer" in rep["idle_named"], rep
    assert rep["idle_unnamed_devices"] == ["CPU"] and rep["idle_unnamed_right"], rep
    assert any("does not answer" in w for w in rep["idle_unnamed_warnings"]), rep
    assert rep["restarted_same"], rep
    assert all(rep[k] for k in ("prompt_cpu", "generation_cpu", "upload_cpu", "idle_cpu")), rep


def test_registrations_that_used_to_hang_return(smollm2_path):
    rep = _report(_child("hangs", smollm2_path, timeout=120))
    assert rep["two_names"].startswith("ValueError: RPC server localhost:"), rep
    assert "registered already" in rep["two_names"] and rep["two_names_s"] < 30
    assert rep["busy"].startswith("ConnectionError"), rep
    assert rep["busy_s"] < 30, rep  # rpc_timeout=2: a handshake that gets no answer times out


def test_bad_endpoints_and_no_socket_leak(smollm2_path):
    rep = _report(_child("registrations", smollm2_path, f"127.0.0.1:{free_port()}"))
    errors = rep["errors"]
    assert errors["127.0.0.1:99999"].startswith("ValueError") and "1-65535" in errors["127.0.0.1:99999"]
    assert errors["127.0.0.1:0"].startswith("ValueError")
    assert errors["nohost"].startswith("ValueError") and errors["a b:1"].startswith("ValueError")
    assert errors["[::1]:5"].startswith("ValueError") and errors["127.0.0.1:5\n"].startswith("ValueError")
    assert errors["timeout=-1"].startswith("ValueError") and errors["timeout=nan"].startswith("ValueError")
    assert errors["timeout=0 sets"] == "0"  # 0: wait forever, as GGML_RPC_TIMEOUT=0
    assert rep["all_connection_errors"]
    assert rep["fds_after"] == rep["fds_before"], rep  # 100 failed registrations, no socket left open


def test_cli_rpc_unreachable_is_one_line_error(tiny, capsys):
    from frankenllama.cli import main

    rc = main(["run", "-m", str(tiny.path), "-p", "hi", "-n", "1", "-ngl", "99", "--rpc", f"127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith("frankenllama: error: RPC server")


def test_exit_with_a_model_on_a_dead_server_does_not_hang(smollm2_path):
    """A program that ends with a model still open on a server that died exits (it used to hang
    in the interpreter's shutdown)."""
    rep = _report(_child("exit-with-dead-server", smollm2_path, timeout=60))
    assert rep["exiting"]


def test_dead_and_stopped_servers_do_not_hold_up_other_loads(smollm2_path):
    rep = _report(_child("dead-and-stopped", smollm2_path, timeout=300))
    assert rep["dead_requested"].startswith("ConnectionError") and "does not answer" in rep["dead_requested"], rep
    # a stopped server would hold every load for the 300 s timeout
    assert rep["cpu_only_s"] < 30 and rep["cpu_only_identical"], rep
    assert rep["healthy_s"] < 30 and rep["healthy_identical"], rep
    assert rep["healthy_devices"] == sorted(rep["healthy_names"]), rep
    assert rep["all_devices"] == rep["healthy_devices"] and rep["all_identical"], rep


def test_malformed_replies_are_errors_not_aborts(smollm2_path):
    rep = _report(_child("malformed", smollm2_path, timeout=120))
    assert rep["device_count"].startswith("ConnectionError"), rep
    assert rep["short_buffer"].startswith(("ValueError", "ConnectionError")), rep
    assert rep["sixteen_devices"].startswith(("ValueError", "ConnectionError")), rep  # the scheduler's limit
    for case in ("alignment_3", "unaligned_base", "huge_alloc_size"):
        assert rep[case].startswith("ConnectionError") and "malformed reply" in rep[case], (case, rep)
    assert rep["alive"]


def test_two_threads_two_models_one_server(smollm2_path):
    rep = _report(_child("threads", smollm2_path, timeout=300))
    assert rep["errors"] == [] and rep["mismatches"] == 0 and rep["server_alive"], rep


def test_server_down_at_first_use_then_back(smollm2_path):
    rep = _report(_child("down-at-first-use", smollm2_path, timeout=120))
    assert rep["down"].startswith(("ConnectionError", "ValueError")), rep
    assert "RPC0" in rep["devices"] and rep["identical"], rep


def test_models_sharing_a_server(smollm2_path):
    rep = _report(_child("shared-server", smollm2_path, timeout=200))
    assert rep["a_after_b_closed"] == "ok" and rep["a_text_right"], rep  # the server forgets graphs on free
    assert rep["fork_child_status"] == 0, rep
    assert rep["save_state_after_death"].startswith("ConnectionError"), rep
