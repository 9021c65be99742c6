"""The oracle: MemDLM's step transcribed from the equations (docs/DESIGN.md section 2), unfused.

Deliberately simple and independent of the production code: one functional forward of the
whole model on every position (no prefix/tail split, no shared prefix, no row gathering, no
megatron layers), the loss as a log-softmax over full logits, fast weights as explicit
per-sequence LoRA (or dense) terms, inner gradients by ``torch.autograd.grad`` of the whole
inner loss. It reads the production model's weights by name; nothing else is shared except
phi_0, whose random draw is not what is being checked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x, theta):
    # x [b, l, heads, d]; rotate-half convention, angle = position * theta^(-2k/d)
    b, l, heads, d = x.shape
    k = torch.arange(d // 2, dtype=torch.float64)
    angle = torch.arange(l, dtype=torch.float64)[:, None] * theta ** (-2 * k / d)[None, :]
    cos = torch.cat([angle.cos(), angle.cos()], -1)[None, :, None, :].to(x.dtype)
    sin = torch.cat([angle.sin(), angle.sin()], -1)[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def projection(x, weight, fast, name, scaling):
    """``x W^T`` plus the fast-weight term of ``name`` for each sequence, if any."""
    out = x @ weight.t()
    if fast is None or name not in fast:
        return out
    tensors = fast[name]
    if len(tensors) == 1:
        return out + torch.einsum("bli,boi->blo", x, tensors[0])
    a, b = tensors
    return out + scaling * torch.einsum("blr,bor->blo", torch.einsum("bli,bri->blr", x, a), b)


def forward_logits(p, cfg, ids, fast=None, scaling=2.0, padding=None):
    """Logits ``[b, l, vocab]`` of the whole model on ``ids`` with weights ``p`` (dict by name)."""
    b, l = ids.shape
    heads, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    h = p["embedding.weight"][ids]
    for i in range(cfg.num_layers):
        pre = f"layers.{i}."
        x = rms_norm(h, p[pre + "attention_norm.weight"], cfg.norm_eps)
        qkv = projection(x, p[pre + "attention.qkv.weight"], fast, pre + "qkv", scaling).view(b, l, heads, 3, d)
        q, k, v = rope(qkv[:, :, :, 0], cfg.rope_theta), rope(qkv[:, :, :, 1], cfg.rope_theta), qkv[:, :, :, 2]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        if padding is not None:
            scores = scores.masked_fill(~padding[:, None, None, :], float("-inf"))
        context = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, l, heads * d)
        h = h + projection(context, p[pre + "attention.out.weight"], fast, pre + "out", scaling)
        x = rms_norm(h, p[pre + "mlp_norm.weight"], cfg.norm_eps)
        gate = projection(x, p[pre + "mlp.gate.weight"], fast, pre + "gate", scaling)
        up = projection(x, p[pre + "mlp.up.weight"], fast, pre + "up", scaling)
        h = h + projection(F.silu(gate) * up, p[pre + "mlp.down.weight"], fast, pre + "down", scaling)
    return rms_norm(h, p["final_norm.weight"], cfg.norm_eps) @ p["lm_head.weight"].t()


def token_ce(logits, x0):
    return -logits.log_softmax(-1).gather(-1, x0[..., None])[..., 0]  # [b, l]


def reference_step(p, cfg, memory, batch, mask_id, phi0, num_maskable_global, eps_weight="inverse_t"):
    """Returns (outer loss, [phi_1, ..., phi_K], gradients of the outer loss w.r.t. ``p``).

    ``phi0``: ``{site name: (A [b, r, in], B [b, out, r])}`` or ``{name: (delta,)}``.
    """
    x0 = batch.input_ids
    maskable = batch.maskable
    n = maskable.sum(1).to(torch.float64)
    scaling = memory.lora_alpha / memory.lora_rank if memory.adapter == "lora" else 1.0
    frozen = {k: v.detach() for k, v in p.items()}

    # Inner loop: K SGD steps along (pre-anchor states..., anchor), base weights constant.
    states = list(batch.pre_anchor_masks) + [batch.anchor_mask]
    phi = {k: tuple(t.detach().clone() for t in v) for k, v in phi0.items()}
    history = []
    for state in states:
        leaves = {k: tuple(t.clone().requires_grad_() for t in v) for k, v in phi.items()}
        x_state = torch.where(state, torch.full_like(x0, mask_id), x0)
        ce = token_ce(forward_logits(frozen, cfg, x_state, leaves, scaling, batch.key_padding_mask), x0)
        num_masked = state.sum(1).to(torch.float64)
        ratio = num_masked / n
        weight = 1.0 / ratio if memory.inner_loss_weight == "inverse_ratio" else torch.ones_like(ratio)
        per_sequence = [
            weight[i] * (ce[i] * state[i]).sum() / num_masked[i] for i in range(x0.shape[0]) if num_masked[i] > 0
        ]
        loss = torch.stack(per_sequence).sum()
        flat = [t for v in leaves.values() for t in v]
        grads = iter(torch.autograd.grad(loss, flat))
        new_phi = {}
        for name, tensors in leaves.items():
            updated = []
            for t in tensors:
                g = next(grads)
                if memory.inner_grad_clip > 0:
                    for i in range(g.shape[0]):  # each sequence's tensor on its own
                        norm = g[i].norm()
                        if norm > memory.inner_grad_clip:
                            g[i] = g[i] * (memory.inner_grad_clip / norm)
                updated.append((t - memory.inner_lr * g).detach())
            new_phi[name] = tuple(updated)
        phi = new_phi
        history.append(phi)

    # Outer: MDLM loss on the anchor state with phi_K constant; gradient w.r.t. the base weights.
    params = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
    anchor = batch.anchor_mask
    x_t = torch.where(anchor, torch.full_like(x0, mask_id), x0)
    ce = token_ce(forward_logits(params, cfg, x_t, phi, scaling, batch.key_padding_mask), x0)
    w = 1.0 / batch.t if eps_weight == "inverse_t" else torch.ones_like(batch.t)
    outer = (w[:, None] * ce * anchor).sum() / num_maskable_global
    names = list(params)
    grads = torch.autograd.grad(outer, [params[k] for k in names], allow_unused=True)
    return outer.detach(), history, {k: g for k, g in zip(names, grads)}
