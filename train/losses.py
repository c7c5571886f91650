"""Distillation losses against the target's own next-token distribution, computed on the fly.

Notation (as in koala.heads): x_0..x_{T-1} the tokens, h_t = target hidden at t (final norm),
z_t = target logits at t, the teacher distribution of x_{t+1}. mask[t] is True where x_t is an
assistant token (a token the heads will have to draft).

Medusa head i (0-based) at position t predicts x_{t+2+i}: student head_i(h_t), teacher z_{t+1+i},
trained where mask[t+2+i].

EAGLE, in the shifted frame u = 0..T-2 (input token x_{u+1}, input feature f_u): the output
feature predicts h_{u+1} and its logits predict x_{u+2} with teacher z_{u+1}; trained where
mask[u+2]. Rollout step s (0-based) feeds the head its own step-(s-1) output feature instead of
h_u, and attends to the keys the head would have in its cache at drafting time: those of
step 0 (true features) up to u-s, then its own steps 1..s at u-s+1..u (HASS-style alignment).
Step s is trained where u >= s.

Every function returns *sums*; the trainer divides by counts taken over the global batch, so
several ranks add up to exactly one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from koala.model import rotate_half


@dataclass
class Term:
    """One prediction target of a head: a Medusa head, or an EAGLE rollout step."""
    name: str
    valid: torch.Tensor       # (B, L) bool: positions trained (row-major selection order)
    draft: torch.Tensor       # (N, V) draft logits at the valid positions
    teacher_src: torch.Tensor  # (B*T, V) all the target's logits (a view, not a copy)
    rows: torch.Tensor        # (N,) int64: row of teacher_src for each draft row
    cond: torch.Tensor        # (N, D) target hidden state the draft conditions on
    feat_sum: torch.Tensor | None = None  # EAGLE: sum over N of smooth-L1 (mean over D)

    @property
    def teacher(self) -> torch.Tensor:
        """(N, V) the target's logits for the draft rows (a gathered copy)."""
        return self.teacher_src[self.rows]


def _flat_rows(valid, T: int, shift: int):
    """Rows of the (B*T, V) teacher for the True entries of valid (B, L), in row-major order:
    b * T + l + shift."""
    b, l = valid.nonzero(as_tuple=True)
    return b * T + l + shift


# ----------------------------------------------------------------------------------------------
# the distillation term: fused Triton kernel on CUDA, the PyTorch formula elsewhere

def kl_backend(device) -> str:
    """Which implementation distill_sums uses on `device`: "fused" (kernels.distill, one Triton
    launch per term) on CUDA unless KOALA_FUSED_KL=0, else "reference" (PyTorch, chunked)."""
    dev = torch.device(device)
    return "fused" if dev.type == "cuda" and os.environ.get("KOALA_FUSED_KL", "1") != "0" else "reference"


def distill_sums(t: Term):
    """(sum over rows of KL(teacher || draft), differentiable in the draft; number of rows whose
    top-1 tokens agree)."""
    if kl_backend(t.draft.device) == "fused":
        from kernels.distill import fused_kl
        kl, agree = fused_kl(t.draft, t.teacher_src, t.rows)
        return kl.sum(), agree.sum()
    teacher = t.teacher
    return kl_sum(t.draft, teacher), agree_sum(t.draft.detach(), teacher)


def _kl(draft, teacher):
    logq = F.log_softmax(draft.float(), dim=-1)
    logp = F.log_softmax(teacher.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum()


def kl_sum(draft, teacher, chunk: int = 2048):
    """sum over rows of KL(teacher || draft), in fp32. (N, V), (N, V) -> scalar.
    Rows go in checkpointed chunks: for SmolLM2 (V = 49152) one fp32 (N, V) is 2 GB at N = 10k
    rows, and the plain formula keeps about three of them per term for the backward pass."""
    if draft.shape[0] <= chunk or not torch.is_grad_enabled() or not draft.requires_grad:
        return _kl(draft, teacher)
    from torch.utils.checkpoint import checkpoint
    return sum(checkpoint(_kl, draft[i:i + chunk], teacher[i:i + chunk], use_reentrant=False)
               for i in range(0, draft.shape[0], chunk))


def agree_sum(draft, teacher):
    """number of rows whose top-1 token agrees. -> scalar (int64)"""
    return (draft.argmax(-1) == teacher.argmax(-1)).sum()


# ----------------------------------------------------------------------------------------------
# Medusa

def medusa_valid(mask, i: int):
    """(B, T) -> (B, T) bool: positions t where head i is trained (x_{t+2+i} exists, assistant)."""
    v = torch.zeros_like(mask)
    T = mask.shape[1]
    if T > 2 + i:
        v[:, : T - 2 - i] = mask[:, 2 + i:]
    return v


def medusa_terms(head, hidden, teacher, mask) -> list[Term]:
    """hidden (B, T, D), teacher (B, T, V) target logits, mask (B, T) bool."""
    terms = []
    T = hidden.shape[1]
    for i, blocks in enumerate(head.blocks):
        valid = medusa_valid(mask, i)
        cond = hidden[valid]                                   # (N, D)
        x = cond
        for blk in blocks:                                     # ResBlocks act per position:
            x = blk(x)                                         # run them on the valid rows only
        draft = head.project(i, x)
        rows = _flat_rows(valid, T, 1 + i)                     # teacher z_{t+1+i}
        terms.append(Term(f"head{i}", valid, draft, teacher.reshape(-1, teacher.shape[-1]), rows, cond))
    return terms


# ----------------------------------------------------------------------------------------------
# EAGLE

def eagle_valid(mask, s: int):
    """(B, T) -> (B, T-1) bool: shifted positions u where rollout step s is trained."""
    B, T = mask.shape
    v = torch.zeros(B, T - 1, dtype=torch.bool, device=mask.device)
    if T > 2:
        v[:, : T - 2] = mask[:, 2:]
    v[:, :s] = False
    return v


def rollout_mask(T: int, s: int, device):
    """(T, (s+1)*T) bool: which keys a step-s query at u sees, as blocks [step 0 | ... | step s]."""
    u = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    blocks = [j <= u - s] + [j == u - s + r for r in range(1, s + 1)]
    return torch.cat(blocks, dim=1)


def _attend(attn, x, cos, sin, past_k, past_v, s: int):
    """Attention of step s: x (B, T, D) -> (B, T, D); appends this step's k, v to past_k/past_v."""
    B, T, _ = x.shape
    h, nkv, hd = attn.n_heads, attn.n_kv, attn.hd
    q, k, v = attn.wqkv(x).split([h * hd, nkv * hd, nkv * hd], dim=-1)
    q, k = attn.norm_qk(q.view(B, T, h, hd), k.view(B, T, nkv, hd))   # Qwen3's per-head norms
    q = q.transpose(1, 2)
    k = k.transpose(1, 2)
    v = v.view(B, T, nkv, hd).transpose(1, 2)
    c, sn = cos.unsqueeze(1), sin.unsqueeze(1)
    q = (q * c + rotate_half(q) * sn).to(v.dtype)   # fp32 tables would promote q, k under autocast
    k = (k * c + rotate_half(k) * sn).to(v.dtype)
    past_k.append(k)
    past_v.append(v)
    K, V = torch.cat(past_k, dim=2), torch.cat(past_v, dim=2)   # (B, nkv, (s+1)T, hd)
    if h // nkv > 1:
        K, V = K.repeat_interleave(h // nkv, 1), V.repeat_interleave(h // nkv, 1)
    if s == 0:
        y = F.scaled_dot_product_attention(q, K, V, is_causal=True)
    else:
        y = F.scaled_dot_product_attention(q, K, V, attn_mask=rollout_mask(T, s, x.device))
    return attn.wo(y.transpose(1, 2).reshape(B, T, h * hd))


def eagle_rollout(head, tokens, features, steps: int) -> list[torch.Tensor]:
    """The head's training-time rollout. tokens (B, T): x_{u+1}; features (B, T, D): h_u.
    Returns `steps` output features (B, T, D); element 0 equals head(tokens, features)[1]."""
    B, T = tokens.shape
    pos = torch.arange(T, device=tokens.device).expand(B, T)
    emb = head._frozen.embedding(tokens).to(head.dtype)
    cos, sin = head.rotary(pos, head.dtype)
    kv = [([], []) for _ in head.layers]
    outs = []
    feats = features.to(head.dtype)
    for s in range(steps):
        if s > 0:  # step s at u reads the step-(s-1) output at u-1 (u = 0 keeps h_0; never trained)
            feats = torch.cat([features[:, :1].to(head.dtype), outs[-1][:, :-1]], dim=1)
        x = head.fc(torch.cat([emb, feats], dim=-1))
        for layer, (pk, pv) in zip(head.layers, kv):
            x = x + _attend(layer.attention, layer.attention_norm(x), cos, sin, pk, pv, s)
            x = x + layer.feed_forward(layer.ffn_norm(x))
        outs.append(x)
    return outs


def eagle_terms(head, tokens, hidden, teacher, mask, steps: int) -> list[Term]:
    """tokens (B, T), hidden (B, T, D), teacher (B, T, V) target logits, mask (B, T) bool."""
    outs = eagle_rollout(head, tokens[:, 1:], hidden[:, :-1], steps)
    h_next = hidden[:, 1:]                                     # targets of shifted position u
    T = teacher.shape[1]
    z_all = teacher.reshape(-1, teacher.shape[-1])             # z_{u+1}: row b*T + u + 1
    terms = []
    for s, out in enumerate(outs):
        valid = eagle_valid(mask, s)
        o = out[valid]
        cond_pos = torch.zeros_like(valid)                     # last true hidden: h_{u-s}
        cond_pos[:, : valid.shape[1] - s] = valid[:, s:]
        feat = F.smooth_l1_loss(o.float(), h_next[valid].float(), reduction="none").mean(-1).sum()
        terms.append(Term(f"step{s}", valid, head.lm_head(o), z_all, _flat_rows(valid, T, 1),
                          hidden[:, :-1][cond_pos], feat))
    return terms
