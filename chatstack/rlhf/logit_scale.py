"""A learned logit scale for RL: one scalar that sharpens (or flattens) the policy's whole distribution.

    scale = LogitScale(policy.lm.norm_f, lr=2e-2)           # chatstack rl's default
    loss.backward(); scale.step(); opt.step()        # before the optimizer's step, from the same gradients

The final norm's output is the only input of the tied output layer, so multiplying its gain (and bias) by
e^s multiplies every logit by e^s: sampling at temperature 1 from the scaled model is sampling at temperature
e^-s from the unscaled one. s is the one direction in which RL at small scale mostly moves (sampling more like
greedy decoding, docs/rlhf.md), but per-channel gains see it only as a small sum of noisy terms. Here it is a
parameter of its own: by the chain rule through w = w0 * e^s,

    dL/ds = sum_c w_c dL/dw_c + sum_c b_c dL/db_c,

and a scalar Adam step on s rescales the norm's parameters in place. Nothing is added to the model: the
checkpoint holds the scaled norm, and the reference (the KL term in the loss) holds the policy back as for any
other parameter. `s` (the log of the total scale) is reported as `logit_scale` = e^s in metrics.jsonl.
"""

from __future__ import annotations

import math

import torch


class LogitScale:
    def __init__(self, norm: torch.nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8):
        self.params = [p for p in norm.parameters()]
        if not self.params:
            raise ValueError("LogitScale: the final norm has no parameters to scale")
        self.lr, self.betas, self.eps = float(lr), betas, eps
        self.s, self.m, self.v, self.t = 0.0, 0.0, 0.0, 0
        self.lr_factor = 1.0  # the caller's schedule (warmup), as a fraction of the peak lr

    def grad(self) -> float:
        """dL/ds from the gradients now on the norm's parameters (0 where there are none)."""
        g = 0.0
        for p in self.params:
            if p.grad is not None:
                g += float((p.detach().float() * p.grad.float()).sum())
        return g

    @torch.no_grad()
    def step(self) -> float:
        """One Adam step on s; rescales the norm's parameters by e^(delta s). Returns delta s."""
        g = self.grad()
        if not math.isfinite(g):
            return 0.0  # one bad gradient must not rescale (and so poison) every logit
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        m_hat, v_hat = self.m / (1 - b1**self.t), self.v / (1 - b2**self.t)
        ds = -self.lr * self.lr_factor * m_hat / (math.sqrt(v_hat) + self.eps)
        f = math.exp(ds)
        for p in self.params:
            p.mul_(f)
        self.s += ds
        return ds

    @property
    def scale(self) -> float:
        return math.exp(self.s)

    def state_dict(self) -> dict:
        return {"s": self.s, "m": self.m, "v": self.v, "t": self.t}

    def load_state_dict(self, st: dict) -> None:
        self.s, self.m, self.v, self.t = float(st["s"]), float(st["m"]), float(st["v"]), int(st["t"])
