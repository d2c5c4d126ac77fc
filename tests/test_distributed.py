"""Scale beyond one process: a two-process gloo run under ``torchrun`` gives the maps of a one-process run (tiny
model; SmolLM2 marked ``slow``), and a model split over two placements by a device map (one layer offloaded to
disk) gives the maps of the model in one piece.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tiny_models as tm
from cli_runner import run_cli

import headscope
from headscope import distributed
from headscope.errors import HeadscopeError
from headscope.models import zoo
from headscope.models.placement import read_device_map
from headscope.results import Results
from headscope.runner import RunOptions, analyze

HERE = Path(__file__).parent
ATOL = 1e-6
# Small settings that still split: 3 ablation passes and 4 pruning passes over 8 heads, 10 repeated samples.
TINY_SETTINGS = {"importance": {"batch_size": 3, "step": 0.5, "random_orders": 1, "ablations": "zero,mean,uniform"},
                 "patterns": {"clusters": 2, "length": 8}, "sinks": {"protocol": "gu"}}
TINY_ANALYSES = ["sinks", "patterns", "importance"]
# The tiny model with its second layer offloaded to disk: accelerate loads it at each forward (a two-placement
# split on a machine without GPUs).
SPLIT_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
             "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tm.one_thread():
        yield


def _settings(params: dict[str, dict]) -> list[str]:
    return [f"--set={name}.{key}={value}" for name, given in params.items() for key, value in given.items()]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(processes: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node PROCESSES tests/distributed_worker.py ARGS``: the worker checks the helpers
    across processes, then runs ``python -m headscope ARGS`` (gloo, this machine)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(HERE / "distributed_worker.py"),
               *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                   "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def assert_same_maps(one: Results, two: Results, tables: dict[str, list[str]] | None = None) -> None:
    """Every map of every analysis equal to ``ATOL`` (NaN where NaN), and the named tables likewise."""
    assert list(one) == list(two)
    for name in one:
        assert one[name].status == two[name].status == "ok", (two[name].error, one[name].error)
        assert one[name].maps.keys() == two[name].maps.keys(), name
        for key, head_map in one[name].maps.items():
            np.testing.assert_allclose(two[name].maps[key].values, head_map.values, atol=ATOL, rtol=0,
                                       err_msg=f"{name} {key}")
        for table in (tables or {}).get(name, []):
            pd.testing.assert_frame_equal(two[name].tables[table], one[name].tables[table], check_exact=False,
                                          atol=ATOL, rtol=0)


def one_process(model: str, out: Path, analyses: list[str], params: dict, max_tokens: int | None = None) -> Results:
    return analyze(RunOptions(model=model, analyses=analyses, out=out, figures=(), params=params,
                              max_tokens=max_tokens))


# --- data-parallel under torchrun --------------------------------------------------------------------------------


def test_two_gloo_processes_give_the_maps_and_tables_of_one_process(tiny_llama_dir, tmp_path):
    one = one_process(str(tiny_llama_dir), tmp_path / "one", TINY_ANALYSES, TINY_SETTINGS)
    done = torchrun(2, "analyze", str(tiny_llama_dir), "--analyses", ",".join(TINY_ANALYSES), "--out",
                    str(tmp_path / "two"), "--figures", "none", *_settings(TINY_SETTINGS))
    two = Results.load(tmp_path / "two" / "results.json")
    assert two.provenance["processes"] == 2 and one.provenance["processes"] == 1
    assert one["sinks"].summary["passes"] > 2  # Gu et al.'s protocol: several inputs to split
    assert_same_maps(one, two, {"sinks": ["sink_tokens", "attention_by_position", "massive_activations", "layers"],
                                "importance": ["pruning"], "patterns": ["representatives"]})
    assert one["sinks"].summary["sink_rate_self"] == two["sinks"].summary["sink_rate_self"]
    assert done.stderr.count("results: ") == 1  # rank 0 alone reports (and writes)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["exports", "report.html", "results.json"]


@pytest.mark.slow
def test_two_gloo_processes_on_smollm2_give_the_patterns_of_one_process(tmp_path):
    if not zoo.packaged("smollm2-135m").installed():
        pytest.skip("the packaged smollm2-135m is not installed")
    params = {"patterns": {"clusters": 2, "length": 24}}
    one = one_process("smollm2-135m", tmp_path / "one", ["patterns"], params, max_tokens=64)
    torchrun(2, "analyze", "smollm2-135m", "--analyses", "patterns", "--out", str(tmp_path / "two"), "--figures",
             "none", "--max-tokens", "64", "-q", *_settings(params), timeout=600)
    assert_same_maps(one, Results.load(tmp_path / "two" / "results.json"))


# --- models larger than one device -------------------------------------------------------------------------------


def test_a_model_split_by_a_device_map_gives_the_maps_of_the_model_in_one_piece(tiny_llama_dir, tmp_path):
    whole = one_process(str(tiny_llama_dir), tmp_path / "whole", TINY_ANALYSES, TINY_SETTINGS)
    split = analyze(RunOptions(model=str(tiny_llama_dir), analyses=TINY_ANALYSES, out=tmp_path / "split", figures=(),
                               params=TINY_SETTINGS, device_map=SPLIT_MAP, offload_folder=str(tmp_path / "offload")))
    assert split.provenance["device_map"] == SPLIT_MAP
    model = headscope.load(str(tiny_llama_dir), device_map=SPLIT_MAP).model
    assert model.model.layers[1].self_attn.o_proj.weight.device.type == "meta"  # loaded from disk at each forward
    assert model.model.layers[0].self_attn.o_proj.weight.device.type == "cpu"
    assert_same_maps(whole, split, {"importance": ["pruning"], "sinks": ["sink_tokens", "massive_activations"]})


def test_the_command_line_takes_a_device_map_as_json(tiny_llama_dir, tmp_path):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(SPLIT_MAP))
    assert run_cli("analyze", str(tiny_llama_dir), "--analyses", "sinks", "--device-map", str(mapping), "--out",
                   str(tmp_path / "out"), "--figures", "none", "-q") == 0
    results = Results.load(tmp_path / "out" / "results.json")
    assert results.provenance["device_map"] == SPLIT_MAP
    assert results["sinks"].status == "ok"


@pytest.mark.parametrize("given", ["everywhere", '{"model.layers.0": ', '{"model.layers.0": "gpu7"}', "{}",
                                   '{"model.layers.0": "cuda:0"}'])
def test_a_bad_device_map_is_one_clear_error(given):
    with pytest.raises(HeadscopeError):
        read_device_map(given)


def test_device_map_and_several_processes_are_refused(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_cli("analyze", str(tiny_llama_dir), "--device-map", "auto", "--out", str(tmp_path / "out")) == 2
    assert "torchrun" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_outside_torchrun_the_helpers_are_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.setup("cpu") == "cpu" and not distributed.active() and distributed.is_main()
    items = [3, 1, 2]
    assert distributed.split(items) is items and distributed.gathered(items) == items
    assert distributed.on_main(lambda: 7) == 7 and distributed.gather_objects("x") == ["x"]
