"""The Megatron adapter's options and config checks (integrations/megatron_options.py) import without
megatron-core and refuse bad values with the option's name, its value and what is allowed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from c2r_comm.integrations.megatron_options import C2RMegatronOptions, check_megatron_config

REPO = Path(__file__).resolve().parents[1]


def test_imports_no_megatron_core():
    code = ("import sys; import c2r_comm.integrations.megatron_options; "
            "loaded = [k for k in sys.modules if k == 'megatron' or k.startswith('megatron.')]; "
            "assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_bad_values_are_refused_with_the_option_named():
    with pytest.raises(ValueError, match=r"dispatcher='alltoall' is not supported: allowed \('dedup', 'hierarchical'\)"):
        C2RMegatronOptions(dispatcher="alltoall")
    with pytest.raises(ValueError, match="nodes=0 is invalid"):
        C2RMegatronOptions(nodes=0)
    with pytest.raises(ValueError, match="timeout_s=inf is invalid"):
        C2RMegatronOptions(timeout_s=float("inf"))
    with pytest.raises(ValueError, match="expert_tensor_parallel_size=2 is not supported"):
        check_megatron_config(SimpleNamespace(expert_tensor_parallel_size=2))
    with pytest.raises(ValueError, match="moe_token_dispatcher_type='flex'"):
        check_megatron_config(SimpleNamespace(expert_tensor_parallel_size=1, moe_token_dispatcher_type="flex"))
