"""A small byte-level MoE transformer language model for the training demo.

Every block is pre-norm causal self-attention followed by our `MoELayer` (router + dispatcher +
this rank's experts). The model is data- and expert-parallel over the same ranks: each rank reads
its own tokens; the dense weights (embedding, attention, norms, routers, shared expert) are
replicated (same initial values on every rank, gradients summed across ranks each step, see
train/step.py); each rank holds only its own experts, whose gradients already include every rank's
tokens through the dispatch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from c2r_comm.config import Config, with_overrides
from c2r_comm.groups import ProcessGroups
from c2r_comm.layer import DTYPES, build_moe_layer
from c2r_comm.train.data import VOCAB

LAYER_SEED_STRIDE = 1000  # MoE layer i's experts and gate use seed run.seed + i * stride


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"--heads {heads}: allowed a divisor of model.hidden_size {hidden}")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


@dataclass(frozen=True)
class LMOutput:
    logits_BSV: torch.Tensor
    aux_loss: torch.Tensor  # routers' weighted auxiliary losses, summed over layers
    topk_idx_LTK: tuple[torch.Tensor, ...]  # each MoE layer's routing (for load and copy metrics)
    rows_sent_L: tuple[int, ...]  # rows each MoE layer's dispatch sent from this rank (copies of tokens)


class MoETransformerLM(nn.Module):
    def __init__(self, config: Config, groups: ProcessGroups, device: torch.device, layers: int, heads: int,
                 seq_len: int):
        super().__init__()
        D = config.model.hidden_size
        with torch.random.fork_rng(devices=[]):  # dense weights: the same on every rank, from run.seed alone
            torch.manual_seed(config.run.seed)
            self.embed = nn.Embedding(VOCAB, D)
            nn.init.normal_(self.embed.weight, std=0.02)  # tied with the output: logits start near uniform
            self.pos = nn.Parameter(0.02 * torch.randn(seq_len, D))
            self.attn_norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(layers))
            self.attns = nn.ModuleList(CausalSelfAttention(D, heads) for _ in range(layers))
            self.moe_norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(layers))
            self.final_norm = nn.LayerNorm(D)
        self.moes = nn.ModuleList(
            build_moe_layer(with_overrides(config, {"placement.layer": i,
                                                    "run.seed": config.run.seed + i * LAYER_SEED_STRIDE}),
                            groups, device) for i in range(layers))
        self.to(device, DTYPES[config.run.dtype])  # dense weights in run.dtype too (the MoE layers already are)

    def forward(self, tokens_BS: torch.Tensor) -> LMOutput:
        B, S = tokens_BS.shape
        h = self.embed(tokens_BS) + self.pos[:S]
        aux = h.new_zeros(())
        idx, rows = [], []
        for attn_norm, attn, moe_norm, moe in zip(self.attn_norms, self.attns, self.moe_norms, self.moes):
            h = h + attn(attn_norm(h))
            out = moe(moe_norm(h).reshape(B * S, -1))
            h = h + out.out_TD.reshape(B, S, -1)
            aux = aux + out.aux_loss
            idx.append(out.routing.topk_idx_TK)
            rows.append(sum(st.rows_local + st.rows_off_rank for st in (hd.dispatch_stats for hd in out.handles)))
        logits = self.final_norm(h) @ self.embed.weight.t()  # tied output embedding
        return LMOutput(logits, aux, tuple(idx), tuple(rows))

    def expert_parameters(self) -> list[nn.Parameter]:
        """This rank's routed experts (not replicated: no gradient all-reduce)."""
        return [p for moe in self.moes for p in moe.experts.parameters()]

    def replicated_parameters(self) -> list[nn.Parameter]:
        local = {id(p) for p in self.expert_parameters()}
        return [p for p in self.parameters() if id(p) not in local]
