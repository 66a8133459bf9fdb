"""How closely A + adapter predicts like B: KL per token and top-1 agreement, from logits given a slice of the
vocabulary at a time.

A real model's LM head does not fit in the memory validation is allowed (Llama 3's is 2 GB in fp32), so the
logits arrive in vocabulary chunks and every statistic is accumulated online, as a streaming softmax does:
per token a running maximum, a running sum of exp(z − max), and for KL the running Σ exp(z_B − max_B)·(z_B − z_X).
Accumulation is in fp64: a KL of 1e-6 is the difference of log-sum-exps of order 10, which fp32 cannot resolve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# B's top-1 leads its runner-up by at least this much log-probability: a prediction any rounding would not flip.
CONFIDENT_MARGIN = 0.1


class _Softmax:
    """Running max, Σ exp(z − max) and arg-max of one stream's logits, per token."""

    def __init__(self, tokens: int):
        self.max = torch.full((tokens,), -math.inf, dtype=torch.float64)
        self.sum = torch.zeros(tokens, dtype=torch.float64)
        self.argmax = torch.zeros(tokens, dtype=torch.long)

    def add(self, z: torch.Tensor, chunk_max: torch.Tensor, chunk_arg: torch.Tensor, offset: int) -> torch.Tensor:
        """Folds in a chunk (fp64 logits, and their max and arg-max found in fp32, which is exact); returns
        exp(z − new max), which callers reuse."""
        chunk_max = chunk_max.double()
        new_max = torch.maximum(self.max, chunk_max)
        weights = (z - new_max[:, None]).exp_()
        self.sum = self.sum * (self.max - new_max).exp() + weights.sum(-1)
        self.argmax = torch.where(chunk_max > self.max, chunk_arg + offset, self.argmax)
        self.max = new_max
        return weights

    def log_normalizer(self) -> torch.Tensor:
        return self.max + self.sum.log()


@dataclass
class Agreement:
    """Per-token KL(B ‖ X) and whether X's top-1 is B's."""

    kl: torch.Tensor
    top1: torch.Tensor


class NextTokenComparison:
    """KL(B ‖ X) and top-1 agreement of several streams X against B, fed vocabulary chunk by chunk."""

    def __init__(self, tokens: int, streams: tuple[str, ...]):
        self.b = _Softmax(tokens)
        self.second_b = torch.full((tokens,), -math.inf, dtype=torch.float64)  # B's runner-up logit
        self.others = {s: _Softmax(tokens) for s in streams}
        self.cross = {s: torch.zeros(tokens, dtype=torch.float64) for s in streams}  # Σ exp(z_B − max_B)(z_B − z_X)

    def add(self, offset: int, logits_b: torch.Tensor, logits: dict[str, torch.Tensor]) -> None:
        """logits_b and each logits[s]: fp32 [tokens, chunk] for vocabulary entries offset … offset + chunk."""
        top = logits_b.topk(min(2, logits_b.shape[-1]), dim=-1)
        runner_up = top.values[:, 1].double() if top.values.shape[1] > 1 else torch.full_like(self.b.max, -math.inf)
        leader = top.values[:, 0].double()
        self.second_b = torch.maximum(torch.minimum(self.b.max, leader), torch.maximum(self.second_b, runner_up))
        old_max = self.b.max
        z_b = logits_b.double()
        weights = self.b.add(z_b, top.values[:, 0], top.indices[:, 0], offset)
        rescale = (old_max - self.b.max).exp()
        for s, z32 in logits.items():
            z = z32.double()
            self.cross[s] = self.cross[s] * rescale + (weights * (z_b - z)).sum(-1)
            self.others[s].add(z, *z32.max(-1), offset)

    def result(self, stream: str) -> Agreement:
        lse_b = self.b.log_normalizer()
        kl = self.cross[stream] / self.b.sum - lse_b + self.others[stream].log_normalizer()
        return Agreement(kl.clamp_min(0), self.others[stream].argmax == self.b.argmax)

    def confident(self) -> torch.Tensor:
        """Tokens where B's top-1 leads its runner-up by CONFIDENT_MARGIN or more."""
        return self.b.max - self.second_b >= CONFIDENT_MARGIN


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """‖x − reference‖_F / ‖reference‖_F over all tokens, in fp64."""
    return (torch.linalg.vector_norm((x - reference).double()) / torch.linalg.vector_norm(reference.double())).item()
