"""KOALA's discriminator and the adversarial losses.

D(h, z) = sigmoid(FC([map(h) ; f(z)])), f = log_softmax (the default) or softmax: map is a
Linear from the target's last hidden state (D) to the logit dimension (V); FC is 1 to 3 fully
connected layers (matched to the head's K) over the concatenation (2V), ending in one logit, the
probability that z is the target's.

h is the last hidden state of the target that the draft itself conditions on (Medusa: h_t for
every head; EAGLE rollout step s: h_{t-s}). It is *not* the hidden state whose LM-head image is
the real logits: from that one the map could learn the LM head and tell real from fake trivially.
We feed log-probabilities rather than raw logits (logits are defined only up to a shift), and
each half of the input centred and scaled to unit norm (see _unit) so the wide first layer trains stably.
inputs="prob" feeds probabilities instead: after centring and unit scaling the long tail of very
negative log-probabilities dominates a log-softmax row, whereas a softmax row is dominated by the
mass of the top tokens, which is what acceptance depends on. On the shipped EAGLE head a fresh
discriminator tells target from draft on held-out sequences at 0.62 with probabilities against
0.54 with log-probabilities (bench.disc_probe, bench/results/disc_probe_eagle.json).

Losses (sums over the selected positions; the trainer divides by the global count):
  head:          -lambda * sum log D(h, z_draft)
  discriminator: -sum log(1 - D(h, z_draft)) - sum log D(h, z_target)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


DISC_INPUTS = ("logprob", "prob")


def fc_layers_for(k: int) -> int:
    """Number of FC layers matched to the head's K: 1, 2, 3 for K = 1, 2, >= 3."""
    return max(1, min(3, int(k)))


class Discriminator(nn.Module):
    def __init__(self, dim: int, vocab: int, n_fc: int = 1, width: int = 256, inputs: str = "logprob"):
        super().__init__()
        if not 1 <= n_fc <= 3:
            raise ValueError(f"the discriminator has 1 to 3 FC layers, got {n_fc}")
        if inputs not in DISC_INPUTS:
            raise ValueError(f"discriminator inputs must be one of {DISC_INPUTS}, got {inputs!r}")
        self.inputs = inputs
        self.map = nn.Linear(dim, vocab)
        layers, w = [], 2 * vocab
        for _ in range(n_fc - 1):
            layers += [nn.Linear(w, width), nn.LeakyReLU(0.2)]
            w = width
        layers.append(nn.Linear(w, 1))
        self.fc = nn.Sequential(*layers)

    def forward(self, hidden, logits):  # hidden (N, D), logits (N, V) -> (N,) logit of P(target)
        z = logits.float()
        z = F.log_softmax(z, dim=-1) if self.inputs == "logprob" else F.softmax(z, dim=-1)
        x = torch.cat([_unit(self.map(hidden.float())), _unit(z)], dim=-1)
        return self.fc(x).squeeze(-1)


def _unit(x):  # (N, V): centred, unit L2 norm per row
    # why: the first FC layer has fan-in 2V (98,304 for SmolLM2). Raw log-probabilities (|x| ~ 20)
    # gave initial logits ~ +-10 and, since Adam moves every weight by ~lr, output swings of ~200
    # per step (D saturated at 1e-12 within 4 steps on SmolLM2). Unit rows bound that by
    # lr * sqrt(2V) ~ 0.03 and keep what distinguishes two distributions: the shape.
    return F.normalize(x - x.mean(-1, keepdim=True), dim=-1)


def head_adversarial_sum(d_fake):  # (N,) discriminator logits on draft logits -> -sum log D
    return -F.logsigmoid(d_fake).sum()


def discriminator_sum(d_real, d_fake):  # -sum log D(real) - sum log(1 - D(fake))
    return -F.logsigmoid(d_real).sum() - F.logsigmoid(-d_fake).sum()
