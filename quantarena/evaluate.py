"""Accuracy and size: perplexity, KL divergence to the unquantized model, weight bytes.

The unquantized model's final hidden states are kept per window (small: [T, hidden]); its
logits are recomputed from them through the shared, unquantized ``lm_head`` in chunks of
tokens, so the 262k-vocabulary logits of a whole evaluation never sit in memory at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .models import ArchSpec, blocks, get_module
from .nn import QUANT_LINEARS, QuantLinearBase

LOGIT_CHUNK = 128  # tokens per lm_head chunk


@dataclass
class EvalResult:
    ppl: float
    nll: float
    kld: float | None
    tokens: int
    linear_bytes: int
    linear_params: int
    bytes: int
    extra: dict = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.linear_bytes / max(self.linear_params, 1)

    def as_dict(self) -> dict:
        return dict(ppl=self.ppl, nll=self.nll, kld=self.kld, tokens=self.tokens, bytes=self.bytes,
                    linear_bytes=self.linear_bytes, bits_per_weight=round(self.bits_per_weight, 3), **self.extra)


def size_of(model: nn.Module, arch: ArchSpec) -> tuple[int, int, int]:
    """(linear_bytes, linear_params, checkpoint_bytes): the decoder blocks' Linear layers as stored, their
    parameter count, and the whole checkpoint with unquantized tensors counted at 16 bits."""
    linear_bytes = linear_params = 0
    quantized_ids = set()
    for block in blocks(model, arch):
        for name in arch.linears:
            mod = block.get_submodule(name)
            if isinstance(mod, QuantLinearBase):
                linear_bytes += mod.weight_bytes()
                linear_params += mod.in_features * mod.out_features
                quantized_ids.update(id(b) for b in mod.buffers())
            else:
                linear_bytes += mod.weight.numel() * 2
                linear_params += mod.weight.numel()
    seen, other = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or id(t) in quantized_ids or t is None:
            continue
        seen.add(id(t))
        if t.dtype.is_floating_point and t.element_size() > 2:
            other += t.numel() * 2
        else:
            other += t.numel() * t.element_size()
    return linear_bytes, linear_params, other + sum(
        m.weight_bytes() for m in model.modules() if isinstance(m, QuantLinearBase))


def _logits(model: nn.Module, arch: ArchSpec, hidden: torch.Tensor) -> torch.Tensor:
    # hidden: [T, H] -> logits [T, V] in float32
    head = get_module(model, arch.lm_head)
    logits = head(hidden.to(next(head.parameters()).dtype)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def final_hidden(model: nn.Module, arch: ArchSpec, input_ids: torch.Tensor) -> torch.Tensor:
    """Final (post-norm) hidden states ``[T, H]`` for one window ``[T]``."""
    decoder = get_module(model, arch.decoder)
    device = next(model.parameters()).device
    out = decoder(input_ids=input_ids.unsqueeze(0).to(device), use_cache=False)
    return out.last_hidden_state[0]


@torch.no_grad()
def evaluate(model: nn.Module, arch: ArchSpec, windows: torch.Tensor, reference: list[torch.Tensor] | None = None,
             reference_model: nn.Module | None = None, progress: bool = True, desc: str = "eval"
             ) -> tuple[EvalResult, list[torch.Tensor]]:
    """Perplexity over ``windows`` [n, T] (each starting with BOS; the BOS position is not scored) and,
    given the unquantized model's final hidden states ``reference``, mean KL(P_ref || P_model) per token.

    ``reference_model`` supplies the lm_head for the reference logits (defaults to ``model``; the lm_head is
    never quantized). Returns the result and this model's final hidden states (to serve as a reference).
    """
    nll_sum, kld_sum, count = 0.0, 0.0, 0
    states = []
    ref_head_model = reference_model if reference_model is not None else model
    for w, ids in enumerate(tqdm(windows, desc=desc, disable=not progress, leave=False, unit="win")):
        hidden = final_hidden(model, arch, ids).float()
        states.append(hidden.cpu())
        targets = ids[1:].to(hidden.device)
        for start in range(0, hidden.shape[0] - 1, LOGIT_CHUNK):
            stop = min(start + LOGIT_CHUNK, hidden.shape[0] - 1)
            logp = F.log_softmax(_logits(model, arch, hidden[start:stop]), dim=-1)  # [c, V]
            if not torch.isfinite(logp).all():
                raise FloatingPointError(f"non-finite logits in window {w}: the quantized model is broken")
            nll_sum -= logp.gather(1, targets[start:stop, None]).sum().item()
            if reference is not None:
                ref_h = reference[w][start:stop].to(hidden.device)
                ref_logp = F.log_softmax(_logits(ref_head_model, arch, ref_h), dim=-1)
                kld_sum += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
            count += stop - start
    nll = nll_sum / count
    linear_bytes, linear_params, total = size_of(model, arch)
    result = EvalResult(ppl=math.exp(nll), nll=nll, kld=None if reference is None else kld_sum / count,
                        tokens=count, linear_bytes=linear_bytes, linear_params=linear_params, bytes=total)
    return result, states


def quantized_layers(model: nn.Module) -> int:
    return sum(isinstance(m, QUANT_LINEARS) for m in model.modules())
