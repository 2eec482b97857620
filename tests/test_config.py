"""Config validation: one ConfigError naming the field, the value and what is allowed."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from c2r_comm.config import Config, ConfigError, config_from_dict, load_config, parse_topology, with_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.num_experts % cfg.parallel.world_size == 0


@pytest.mark.parametrize("data, field, allowed_part", [
    ({"model": {"hiden_size": 8}}, "model.hiden_size", "known fields"),
    ({"modle": {}}, "modle", "known fields"),
    ({"model": {"hidden_size": "big"}}, "model.hidden_size", "integer"),
    ({"model": {"hidden_size": True}}, "model.hidden_size", "integer"),
    ({"run": {"timeout_s": "soon"}}, "run.timeout_s", "number"),
    ({"model": {"num_experts": 10}, "parallel": {"gpus_per_node": 4}}, "model.num_experts", "multiple"),
    ({"model": {"num_experts": 4, "top_k": 5}}, "model.top_k", "top_k <= num_experts"),
    ({"dispatcher": "nccl_magic"}, "dispatcher", "alltoall"),
    ({"run": {"dtype": "fp8"}}, "run.dtype", "float32"),
    ({"routing": {"kind": "c2r"}}, "routing.top_t", "required for kind=c2r"),
    ({"routing": {"kind": "c2r", "top_t": 1, "collaborators": "x.npz"}, "model": {"top_k": 4}}, "routing.top_t", "top_k-1"),
    ({"routing": {"kind": "device_constrained"}}, "routing.max_groups", "required"),
    ({"model": []}, "model", "mapping"),
    ({"schedule": {"backward_exchanges": "threads"}}, "schedule.backward_exchanges", "split"),
    ({"schedule": {"backward_exchanges": "thread"}, "run": {"device": "cuda"}}, "schedule.backward_exchanges",
     "with run.device cuda"),
])
def test_bad_fields_name_field_value_and_allowed(data, field, allowed_part):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    err = info.value
    assert err.field_name == field
    assert allowed_part in err.allowed
    assert field in str(err)


def test_topology_must_match_world_size():
    cfg = config_from_dict({"parallel": {"nodes": 2, "gpus_per_node": 2}, "model": {"num_experts": 8}})
    cfg.check_world_size(4)
    with pytest.raises(ConfigError, match="world size"):
        cfg.check_world_size(3)


def test_overrides_are_validated_and_frozen(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"num_experts": 8, "top_k": 2}}))
    cfg = load_config(p)
    new = with_overrides(cfg, {"run.iters": 3, "parallel.gpus_per_node": 4, "run.seed": None})
    assert new.run.iters == 3 and new.parallel.world_size == 4 and new.run.seed == cfg.run.seed
    with pytest.raises(ConfigError, match="model.num_experts"):
        with_overrides(cfg, {"parallel.gpus_per_node": 3})
    with pytest.raises(Exception):
        new.run.iters = 5  # frozen


def test_a_value_a_flag_replaces_is_not_checked(tmp_path, capsys, no_launch):
    """YAML `run.iters: 0` with `--iters 2`: the flag's value is put in before the one validation."""
    from c2r_comm.cli import main

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"run": {"iters": 0, "tokens_per_rank": -5}, "model": {"num_experts": 8}}))
    with pytest.raises(ConfigError, match="run.tokens_per_rank"):
        load_config(p)
    with pytest.raises(ConfigError, match="run.iters"):
        load_config(p, {"run.tokens_per_rank": 32})
    cfg = load_config(p, {"run.iters": 2, "run.tokens_per_rank": 32, "run.seed": None, "schedule.overlap_degree": 2})
    assert cfg.run.iters == 2 and cfg.run.tokens_per_rank == 32 and cfg.model.num_experts == 8
    assert cfg.schedule.overlap_degree == 2  # a section the file does not have
    # through the command: still refused where no flag replaces the bad value
    assert main(["bench", "--config", str(p), "--iters", "2"]) == 2
    err = capsys.readouterr().err
    assert "run.tokens_per_rank" in err and "run.iters" not in err, err


def test_parse_topology():
    assert parse_topology("2x4") == (2, 4)
    for bad in ("2*4", "0x4", "x4", "2x"):
        with pytest.raises(ConfigError, match="--topology"):
            parse_topology(bad)


def test_default_config_is_valid():
    assert Config().dispatcher == "dedup"
