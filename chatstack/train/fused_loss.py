"""Output layer + cross-entropy fused, chunk by chunk: the pretraining loss without the (N, V) logits tensor.

    loss = linear_cross_entropy(h, weight, targets)    # == F.cross_entropy(h @ weight.T, targets, ignore_index=-1)

Why: at the tiny preset (128 wide, 4,096 vocab) the logits of one batch are 16.7M floats. The plain path writes
them, reads them for log_softmax, writes log-probs, then in backward fills a zero gradient of the same size,
scatters into it and runs log_softmax's backward: several passes over 67 MB of memory per step, a quarter
of the step on this CPU. Here each chunk of rows computes its logits, the loss and the gradient
(softmax - onehot) while the chunk is still in cache, and multiplies the gradient straight into dL/dh and
dL/dW. The backward pass then only scales the saved gradients. Same FLOPs, far less memory traffic.

Used in CPU training: fp32, or with bf16 matmuls (mm_dtype) under chatstack.model.cpu_bf16_matmuls. Under
torch.autocast (bf16/fp16 on GPU) the plain path keeps autocast's numerics.

    python benchmarks/fused_loss.py              # times plain vs fused on the tiny preset's shapes
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        h: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        mm_dtype: Optional[torch.dtype],
    ) -> torch.Tensor:
        # h: (N, C)   weight: (V, C)   targets: (N,) long, -1 = ignored
        # mm_dtype: None = fp32 matmuls; torch.bfloat16 = bf16 operands, fp32 accumulation and fp32 softmax
        N = h.size(0)
        valid = targets >= 0
        n_valid = int(valid.sum())
        scale = 1.0 / max(n_valid, 1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        hm, wm = (h, weight) if mm_dtype is None else (h.to(mm_dtype), weight.to(mm_dtype))
        for s in range(0, N, chunk):
            hc, tc, vc = hm[s : s + chunk], targets[s : s + chunk], valid[s : s + chunk]
            n = hc.size(0)
            logits = hc @ wm.t()  # (n, V)
            if mm_dtype is not None:
                logits = logits.float()  # softmax and loss in fp32
            tgt = tc.clamp_min(0)
            rows = torch.arange(n, device=h.device)
            tgt_logit = logits[rows, tgt]  # (n,) before the in-place ops
            # one exp pass serves both the loss (log-sum-exp) and the gradient (softmax)
            m = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            e = logits.sub_(m).exp_()  # (n, V), in place
            sumexp = e.sum(dim=-1, keepdim=True)  # (n, 1)
            lse = (m + sumexp.log()).squeeze(1)
            w_row = vc.to(e.dtype) * scale  # ignored rows get no gradient
            total += ((lse - tgt_logit) * vc).sum(dtype=torch.float64)
            if need_h or need_w:
                p = e.mul_(w_row[:, None] / sumexp)  # softmax * row weight
                p[rows, tgt] -= w_row
                if mm_dtype is None:
                    if need_h:
                        torch.mm(p, weight, out=grad_h[s : s + n])  # (n, C)
                    if need_w:
                        grad_w.addmm_(p.t(), hc)  # (V, C)
                else:
                    p = p.to(mm_dtype)
                    if need_h:
                        grad_h[s : s + n] = torch.mm(p, wm)
                    if need_w:
                        grad_w += torch.mm(p.t(), hc)  # bf16 product, fp32 sum over chunks
        ctx.save_for_backward(grad_h, grad_w)
        return (total * scale).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_out if grad_h is not None else None,
            grad_w * grad_out if grad_w is not None else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 256,
    mm_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Mean cross-entropy of softmax(h @ weight.T) against targets (-1 = ignored), fused and chunked.
    mm_dtype=torch.bfloat16: the two matmuls take bf16 operands (CPU AMX; see chatstack.model.cpu_bf16_matmuls);
    logits, softmax, loss and gradients stay fp32."""
    return _LinearCrossEntropy.apply(h.reshape(-1, h.size(-1)), weight, targets.reshape(-1), chunk, mm_dtype)
