"""Hooks that record routing from tiny, randomly initialised transformers MoE models (no downloads)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from c2r_comm.routing.hf_hooks import RoutingRecorder, find_moe_gates, record_prompts  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, moe_intermediate_size=16,
           n_shared_experts=1, first_k_dense_replace=0, n_routed_experts=8)


def tiny_model(kind: str) -> nn.Module:
    t = transformers
    if kind == "mixtral":
        cfg, cls = t.MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2), t.MixtralForCausalLM
    elif kind == "qwen2_moe":
        cfg = t.Qwen2MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                               shared_expert_intermediate_size=16)
        cls = t.Qwen2MoeForCausalLM
    elif kind == "qwen3_moe":
        cfg = t.Qwen3MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8)
        cls = t.Qwen3MoeForCausalLM
    elif kind == "deepseek_v2":
        cfg = t.DeepseekV2Config(**COMMON, **MLA, num_experts_per_tok=2, q_lora_rank=None, topk_method="greedy",
                                 n_group=1, topk_group=1)
        cls = t.DeepseekV2ForCausalLM
    else:  # deepseek_v3: one expert group, so sigmoid + zero bias ranks experts like the raw logits
        cfg = t.DeepseekV3Config(**COMMON, **MLA, num_experts_per_tok=2, q_lora_rank=16, n_group=1, topk_group=1)
        cls = t.DeepseekV3ForCausalLM
    torch.manual_seed(0)
    return cls(cfg).eval()


def gate_weight(gate: nn.Module) -> torch.Tensor:
    return gate.weight  # routers and legacy nn.Linear gates both keep [E, hidden]


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"])
def test_recorded_experts_match_gate_logits(kind):
    model = tiny_model(kind)
    sites = find_moe_gates(model)
    assert [s.name for s in sites] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(s.num_experts == 8 and s.top_k == 2 for s in sites)
    # Independent reference: the gate's input, captured separately, times its weight. Softmax and
    # sigmoid are monotonic, so the top-2 of the raw logits are the chosen experts.
    inputs: list[list[torch.Tensor]] = [[] for _ in sites]
    handles = [s.gate.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].reshape(-1, 32)))
               for i, s in enumerate(sites)]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 64, (n,), generator=g) for n in (7, 5, 9)]
    trace = record_prompts(model, prompts)
    for h in handles:
        h.remove()
    assert trace.expert_ids.shape == (21, 2, 2) and trace.num_experts == 8
    assert trace.prompt_offsets.tolist() == [0, 7, 12, 21]
    for l, s in enumerate(sites):
        logits = F.linear(torch.cat(inputs[l]).float(), gate_weight(s.gate).float())
        expected = torch.topk(logits, 2, dim=-1).indices.sort(-1).values
        assert torch.equal(torch.from_numpy(trace.expert_ids[:, l, :]).sort(-1).values, expected)
    assert len({tuple(r) for r in trace.expert_ids[:, 0, :].tolist()}) > 3  # real, varied routing
    assert not any(s.gate._forward_hooks for s in sites)  # hooks removed


class LegacyBlock(nn.Module):
    """transformers-4 style block: the gate is a plain nn.Linear returning router logits."""

    def __init__(self, hidden: int, experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(experts))

    def forward(self, x):
        idx = torch.topk(torch.softmax(self.gate(x), -1), self.top_k, -1).indices
        return torch.stack([sum(self.experts[e](x[t]) for e in idx[t].tolist()) for t in range(len(x))])


def test_legacy_linear_gate_and_manual_prompts():
    torch.manual_seed(0)
    model = nn.Sequential(LegacyBlock(8, 6, 3), LegacyBlock(8, 6, 3))
    rec = RoutingRecorder(model)
    x1, x2 = torch.randn(4, 8), torch.randn(3, 8)
    with rec:
        model(x1)
        rec.end_prompt()
        rec.end_prompt()  # closing an empty prompt adds nothing
        model(x2)
    model(x1)  # after the context: not recorded
    trace = rec.to_trace()
    assert trace.prompt_offsets.tolist() == [0, 4, 7]
    expected = torch.topk(model[0].gate(torch.cat([x1, x2])), 3, -1).indices
    assert torch.equal(torch.from_numpy(trace.expert_ids[:, 0, :]), expected)


def test_recorder_errors():
    with pytest.raises(ValueError, match="has no MoE block"):
        RoutingRecorder(nn.Sequential(nn.Linear(4, 4)))
    mixed = nn.Sequential(LegacyBlock(8, 6, 3), LegacyBlock(8, 6, 2))
    with pytest.raises(ValueError, match="disagree on top_k"):
        RoutingRecorder(mixed)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.top_k, self.num_experts = 2, 4
            self.gate, self.experts = nn.Linear(8, 3), nn.Identity()

        def forward(self, x):
            return self.gate(x)

    odd = Odd()  # its gate returns 3 logits but it claims 4 experts
    with RoutingRecorder(odd), pytest.raises(ValueError, match="expected a tuple with an integer"):
        odd(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"input_ids \[seq\] or \[1, seq\]"):
        record_prompts(tiny_model("qwen3_moe"), [torch.zeros(2, 3, dtype=torch.long)])
