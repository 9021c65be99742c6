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


def projection(x, weight, fast, name, scaling, keep=None):
    """``x W^T`` plus the fast-weight term of ``name`` for each sequence, if any, on ``x * keep`` (a scaled
    dropout keep-mask) when given."""
    out = x @ weight.t()
    if fast is None or name not in fast:
        return out
    if keep is not None:
        x = x * keep
    tensors = fast[name]
    if len(tensors) == 1:
        return out + torch.einsum("bli,boi->blo", x, tensors[0])
    a, b = tensors
    return out + scaling * torch.einsum("blr,bor->blo", torch.einsum("bli,bri->blr", x, a), b)


def forward_hidden(p, cfg, ids, fast=None, scaling=2.0, padding=None, dropout=None):
    """The last layer's output ``[b, l, hidden]`` (before the final norm) of the whole model on ``ids``.
    ``dropout``: ``{site name: scaled keep-mask [b, l, in]}`` on the fast weights' inputs."""
    b, l = ids.shape
    heads, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    drop = dropout or {}

    def proj(x, name):
        weight = p[pre + {"qkv": "attention.qkv", "out": "attention.out", "gate": "mlp.gate", "up": "mlp.up",
                          "down": "mlp.down"}[name] + ".weight"]
        return projection(x, weight, fast, pre + name, scaling, drop.get(pre + name))

    h = p["embedding.weight"][ids]
    for i in range(cfg.num_layers):
        pre = f"layers.{i}."
        x = rms_norm(h, p[pre + "attention_norm.weight"], cfg.norm_eps)
        qkv = proj(x, "qkv").view(b, l, heads, 3, d)
        q, k, v = rope(qkv[:, :, :, 0], cfg.rope_theta), rope(qkv[:, :, :, 1], cfg.rope_theta), qkv[:, :, :, 2]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        if padding is not None:
            scores = scores.masked_fill(~padding[:, None, None, :], float("-inf"))
        context = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, l, heads * d)
        h = h + proj(context, "out")
        x = rms_norm(h, p[pre + "mlp_norm.weight"], cfg.norm_eps)
        if pre + "mlp.router.weight" in p:
            h = h + mixture_of_experts(p, cfg, pre, x, fast, scaling)
        else:
            h = h + proj(F.silu(proj(x, "gate")) * proj(x, "up"), "down")
    return h


def mixture_of_experts(p, cfg, pre, x, fast, scaling):
    """An MoE MLP written plainly: every expert on every token, weighted by its routing weight (zero where not
    chosen), each with its per-sequence LoRA terms (``fast[pre + "expert_gate"]``: ``A [b, E, r, in]``,
    ``B [b, E, out, r]``), plus the shared expert (fast weights ``pre + "gate"`` etc.). The expert bias
    (``p[pre + "mlp.expert_bias"]``) chooses only. No expert groups."""
    scores = x @ p[pre + "mlp.router.weight"].t()
    scores = scores.softmax(-1) if cfg.moe_score == "softmax" else scores.sigmoid()
    choice = scores + p[pre + "mlp.expert_bias"] if pre + "mlp.expert_bias" in p else scores
    top = choice.topk(cfg.moe_top_k, dim=-1).indices
    weight = torch.zeros_like(scores).scatter(-1, top, scores.gather(-1, top))
    if cfg.moe_norm_topk:
        weight = weight / weight.sum(-1, keepdim=True)
    weight = weight * cfg.moe_routed_scaling
    out = torch.zeros_like(x)
    for e in range(cfg.moe_num_experts):
        def expert(inputs, module):
            y = inputs @ p[pre + f"mlp.experts.{module}"][e].t()
            if fast is not None and pre + f"expert_{module}" in fast:
                a, b = (t[:, e] for t in fast[pre + f"expert_{module}"])
                y = y + scaling * torch.einsum("blr,bor->blo", torch.einsum("bli,bri->blr", inputs, a), b)
            return y

        out = out + weight[..., e:e + 1] * expert(F.silu(expert(x, "gate")) * expert(x, "up"), "down")
    if pre + "mlp.shared_expert.gate.weight" in p:
        def shared(inputs, module):
            return projection(inputs, p[pre + f"mlp.shared_expert.{module}.weight"], fast, pre + module, scaling)

        out = out + shared(F.silu(shared(x, "gate")) * shared(x, "up"), "down")
    return out


def forward_logits(p, cfg, ids, fast=None, scaling=2.0, padding=None, dropout=None):
    """Logits ``[b, l, vocab]`` of the whole model on ``ids`` with weights ``p`` (dict by name)."""
    h = forward_hidden(p, cfg, ids, fast, scaling, padding, dropout)
    return rms_norm(h, p["final_norm.weight"], cfg.norm_eps) @ p["lm_head.weight"].t()


def token_ce(logits, x0):
    return -logits.log_softmax(-1).gather(-1, x0[..., None])[..., 0]  # [b, l]


def _trajectory(memory, batch):
    """The inner steps of one epoch as (input mask, next mask or None, t per sequence), transcribed from the
    reference spec: pmc = pre-anchor states then the anchor (K = 1: the pre-anchor state alone);
    pre_only = the pre-anchor state, its next the anchor; no_progressive = the anchor with the sampled t;
    progressive_memory = independent states with t = 0.8 + (p - 0.8) s / (K - 1)."""
    strategy = {"progressive_memory_consistent": "pmc"}.get(memory.masking_strategy, memory.masking_strategy)
    k = memory.num_inner_steps
    anchor = batch.inner_anchor_mask if batch.inner_anchor_mask is not None else batch.anchor_mask
    pool = batch.inner_maskable if batch.inner_maskable is not None else batch.maskable
    n = pool.sum(1).to(torch.float64)
    states = list(batch.inner_masks)

    def realized(mask):
        return mask.sum(1).to(torch.float64) / n

    if strategy == "pmc" and k == 1:
        steps = [(states[0], None, realized(states[0]))]
    elif strategy == "pmc":
        chain = states + [anchor]
        steps = [(chain[j], chain[j + 1] if j + 1 < len(chain) else None, realized(chain[j]))
                 for j in range(len(chain))]
    elif strategy == "pre_only":
        steps = [(states[0], anchor, realized(states[0]))]
    elif strategy == "no_progressive":
        steps = [(anchor, None, batch.t.to(torch.float64))]
    else:
        p = memory.prompt_mask_ratio
        steps = [(states[j], states[j + 1] if j + 1 < k else None,
                  torch.full_like(n, 0.8 + (p - 0.8) * j / (k - 1) if k > 1 else p)) for j in range(k)]
    if memory.leak_free:
        steps = [s for s in steps if s[0] is not anchor]
    return steps


def reference_step(p, cfg, memory, batch, mask_id, phi0, num_maskable_global, eps_weight="inverse_t",
                   memory_step=True, dropout=None):
    """Returns (outer objective, [phi_1, ..., phi_K], gradients of the objective w.r.t. ``p``).

    ``phi0``: ``{site name: (A [b, r, in], B [b, out, r])}`` or ``{name: (delta,)}``. ``dropout``:
    ``{pass id: {site name: scaled keep-mask}}`` (inner step n: pass 2n, its teacher 2n + 1, outer 2**20).
    """
    x0 = batch.input_ids
    scaling = memory.lora_alpha / memory.lora_rank if memory.adapter == "lora" else 1.0
    frozen = {k: v.detach() for k, v in p.items()}
    padding = batch.key_padding_mask
    dropout = dropout or {}
    T = memory.distill_temperature

    def noised(mask):
        return torch.where(mask, torch.full_like(x0, mask_id), x0)

    def features(params, ids, phi, pass_id, kind):
        """logits, normed (final-norm output) or hidden (before it) ``[b, l, .]``."""
        h = forward_hidden(params, cfg, ids, phi, scaling, padding, dropout.get(pass_id))
        if kind == "hidden":
            return h
        normed = rms_norm(h, params["final_norm.weight"], cfg.norm_eps)
        return normed if kind == "normed" else normed @ params["lm_head.weight"].t()

    # Inner loop: SGD steps along the trajectory, epochs replayed, base weights constant.
    phi = {k: tuple(t.detach().clone() for t in v) for k, v in phi0.items()}
    history = []
    steps = _trajectory(memory, batch) * memory.inner_epochs if memory_step else []
    for number, (state, following, t_inner) in enumerate(steps):
        scored = state if (following is None or memory.inner_loss_mask == "student_masked") else state & ~following
        if memory.leak_free:
            scored = scored & ~batch.anchor_mask
        leaves = {k: tuple(t.clone().requires_grad_() for t in v) for k, v in phi.items()}
        if memory.inner_loss == "ce":
            per_token = token_ce(features(frozen, noised(state), leaves, 2 * number, "logits"), x0)
        else:
            kind = "logits" if memory.inner_loss != "distill_hidden" else "normed"
            teacher_ids = x0 if following is None else noised(following)
            with torch.no_grad():
                teacher = features(frozen, teacher_ids, phi, 2 * number + 1, kind)
            student_kind = "hidden" if (kind == "normed" and memory.reference_compat) else kind
            student = features(frozen, noised(state), leaves, 2 * number, student_kind)
            if memory.inner_loss == "distill_hidden":
                if memory.distill_hidden_type == "cosine":
                    per_token = 1 - F.cosine_similarity(student, teacher, dim=-1)
                else:
                    per_token = (student - teacher).pow(2).mean(-1)
            else:
                log_s, log_t = (student / T).log_softmax(-1), (teacher / T).log_softmax(-1)
                if memory.inner_loss == "distill":
                    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
                else:
                    per_token = (log_s.exp() * (log_s - log_t)).sum(-1)
        if memory.inner_loss_weight == "uniform":
            weight = torch.ones_like(t_inner)
        elif memory.reference_compat:
            weight = (1.0 / (t_inner.float() + 1e-6)).double()
        else:
            weight = 1.0 / t_inner
        count = scored.sum(1).to(torch.float64)
        per_sequence = [weight[i] * (per_token[i] * scored[i]).sum() / count[i]
                        for i in range(x0.shape[0]) if count[i] > 0]
        loss = torch.stack(per_sequence).sum() if per_sequence else per_token.sum() * 0
        flat = [t for v in leaves.values() for t in v]
        grads = iter(torch.autograd.grad(loss, flat, allow_unused=True, materialize_grads=True))
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

    # Outer: MDLM loss on the anchor state with phi_K constant (and base_weight x the loss without fast
    # weights); gradient w.r.t. the base weights.
    params = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
    anchor = batch.anchor_mask
    x_t = noised(anchor)
    w = 1.0 / batch.t if eps_weight == "inverse_t" else torch.ones_like(batch.t)

    def mdlm(phi_outer, pass_id):
        ce = token_ce(features(params, x_t, phi_outer, pass_id, "logits"), x0)
        return (w[:, None] * ce * anchor).sum() / num_maskable_global

    outer = mdlm(phi if memory_step else None, 1 << 20)
    if memory_step and memory.base_weight > 0:
        outer = outer + memory.base_weight * mdlm(None, -1)
    names = list(params)
    grads = torch.autograd.grad(outer, [params[k] for k in names], allow_unused=True)
    return outer.detach(), history, {k: g for k, g in zip(names, grads)}
