"""The distillation forms by name: one entry per form (docs/METHOD.md, "Distillation forms").

An AQD form is a feature loss against the full-precision teacher pass; an SQD form is a
teacher draw (how mode "stochastic" makes the teacher differ from the student, a
`qgnn_jax.qat.TEACHER_DRAWS` kind) plus a loss between the two logits. The run config
chooses them by name (`aqd_form`, `sqd_form`); the method string (pq+aqd+sqd) stays the same.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Generic, Iterable, Tuple, TypeVar

from qgnn_jax.distill import aqd, sqd


@dataclasses.dataclass(frozen=True)
class AqdForm:
  """loss(student_feats, teacher_feats, tau) -> float32 scalar; feats: lists of (B, N, C)."""
  name: str
  loss: Callable
  summary: str


@dataclasses.dataclass(frozen=True)
class SqdForm:
  """teacher: the TeacherDraw kind of the stochastic pass; loss(z_s, z_t, T) -> scalar."""
  name: str
  teacher: str
  loss: Callable
  summary: str


Form = TypeVar("Form", AqdForm, SqdForm)


class FormRegistry(Generic[Form]):
  """Name -> form; `get` errors name the config field and list the valid names."""

  def __init__(self, field: str, entries: Iterable[Form]):
    self.field = field
    self._entries: Dict[str, Form] = {}
    for e in entries:
      if e.name in self._entries:
        raise ValueError(f"{field} {e.name!r} is registered twice")
      self._entries[e.name] = e

  def get(self, name: str) -> Form:
    if name not in self._entries:
      raise ValueError(f"{self.field}={name!r}; valid: {', '.join(self.names())}")
    return self._entries[name]

  def names(self) -> Tuple[str, ...]:
    return tuple(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries


AQD_FORMS: FormRegistry[AqdForm] = FormRegistry("aqd_form", [
    AqdForm("channel_mse", aqd.channel_mse,
            "feature MSE weighted by the FP teacher's channel attention (the original AQD)"),
    AqdForm("attention_transfer", aqd.attention_transfer,
            "L2 between L2-normalised node-attention maps sum_c F^2 (Zagoruyko & "
            "Komodakis 2017)"),
    AqdForm("channel_attention", aqd.channel_attention_kl,
            "KL of the student's channel-attention distribution to the FP teacher's"),
])

SQD_FORMS: FormRegistry[SqdForm] = FormRegistry("sqd_form", [
    SqdForm("bypass_kl", "bypass", sqd.kl,
            "each site bypassed (full precision) with probability p, at least one; KL"),
    SqdForm("speq", "precision", sqd.cosine,
            "each site's activation bits drawn from a set such as {b, b+2, 8, fp}, at least "
            "one site not b; 1 - cosine of the soft outputs (Boo et al. 2021)"),
    SqdForm("stochastic_channels", "channels", sqd.kl,
            "per site, each output channel of the weight and input channel of the "
            "activation stays full precision with probability p, at least one; KL "
            "(after Dong et al. 2017)"),
])
