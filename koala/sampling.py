"""Sampling without host syncs: settings live in device tensors, randomness comes from noise
drawn with the user's torch.Generator, so the same code runs eagerly and inside a CUDA graph.

Terms used across koala:
  p        the target's warped next-token distribution (temperature, top-k, top-p applied)
  q        the draft's warped distribution
  warping  temperature scaling then top-k then top-p truncation, renormalised
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import SamplingError
from .model import argmax_last


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0         # nucleus mass in (0, 1]
    top_k: int = 0             # 0 = no top-k truncation

    def __post_init__(self):
        t, p, k = self.temperature, self.top_p, self.top_k
        if not isinstance(t, (int, float)) or math.isnan(t) or t < 0 or math.isinf(t):
            raise SamplingError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def truncates(self) -> bool:
        """Top-k or top-p cut the distribution (warp_probs must then sort the vocabulary)."""
        return self.top_k > 0 or self.top_p < 1.0

    @property
    def graph_mode(self) -> str:
        return graph_mode(self.greedy, self.truncates)


def graph_mode(greedy: bool, truncate: bool) -> str:
    """What a captured step traces: 'greedy' (argmax), 'sample' (temperature only) or 'truncate'
    (top-k / top-p, a sort of the vocabulary): one CUDA graph each."""
    return "greedy" if greedy else ("truncate" if truncate else "sample")


class SamplerState:
    """The settings as device tensors (so one captured graph serves any setting)."""

    def __init__(self, device):
        self.temperature = torch.ones((), device=device)
        self.top_p = torch.ones((), device=device)
        self.top_k = torch.zeros((), dtype=torch.long, device=device)
        # host flag, fixed within a captured graph (graphs are keyed by SamplingParams.graph_mode):
        # without top-k / top-p, warp_probs is one softmax instead of a sort of the vocabulary
        self.truncate = False

    def set(self, params: SamplingParams):
        self.temperature.fill_(params.temperature if params.temperature > 0 else 1.0)
        self.top_p.fill_(params.top_p)
        self.top_k.fill_(params.top_k)
        self.truncate = params.truncates


def warp_probs(logits, st: SamplerState):
    """logits (..., V) -> probs (..., V) float32 after temperature, top-k and top-p.
    Temperature alone (st.truncate False, the common case) is a softmax; top-k / top-p sort each
    row of the vocabulary (49,152 values for SmolLM2), cumulate it and softmax twice."""
    x = logits.float() / st.temperature
    if not st.truncate:
        return torch.softmax(x, dim=-1)
    V = x.shape[-1]
    sorted_x, idx = x.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=x.device)
    k = torch.where(st.top_k > 0, st.top_k, torch.full_like(st.top_k, V))
    keep = rank < k                                          # top-k in sorted order
    sp = torch.softmax(sorted_x.masked_fill(~keep, float("-inf")), dim=-1)
    before = sp.cumsum(-1) - sp                              # mass strictly before each token
    keep = keep & (before < st.top_p)                        # the first token is always kept
    sp = torch.softmax(sorted_x.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.zeros_like(sp).scatter_(-1, idx, sp)


def sample(probs, noise):
    """Draw one token per row: argmax(p / E) with E ~ Exp(1) is an exact sample from p
    (the exponential race), needing no host sync. probs (..., V), noise (..., V) -> (...)."""
    return argmax_last(probs / noise)


def draw_noise(shape, generator, device):
    # clamp: an exact zero would turn 0/0 into NaN for tokens of zero probability
    return torch.empty(shape, device=device).exponential_(generator=generator).clamp_min_(1e-30)
