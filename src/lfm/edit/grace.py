"""GRACE: lifelong editing with a discrete key-value adaptor (Hartvigsen et al. 2023, arXiv 2211.11031).

GRACE edits no weight. It keeps a codebook at one layer — entries (key k_i, value v_i, radius ε_i,
label y_i) — and wraps that layer: at every position whose layer input h lies within the radius
of its nearest key, the layer's output is replaced by that key's value,

    i* = argmin_i ‖h − k_i‖₂,     out ← v_{i*}  if ‖h − k_{i*}‖₂ ≤ ε_{i*},  else out unchanged.

The distance is the paper's: Euclidean on the raw activations (its code: `torch.cdist`). The
layer is the MLP output projection of the edit site's block (`lfm.edit.site`, ≈ depth/6); the key
is that projection's input at the prompt's last token (the token whose next-token prediction is
the target), and the value replaces its output there.

One edit (the paper's Algorithm 1), with d the distance of the new key to its nearest entry i:
  - d > ε_i + ε_init: no overlap, add (h, v, ε_init);
  - same label as entry i: expand, ε_i ← max(ε_i, d);
  - another label: split, ε_i ← d/2 and add (h, v, d/2).
A new value starts at the layer's output and is trained by Adam (the paper: lr 1.0, at most 100
steps) on the target's NLL with the layer's output at that position replaced by it; it stops once
the NLL is below `stop_nll`. Sequential edits grow one codebook (`grace(..., codebook=patch)`;
from the command line, `lfm edit apply -m grace --on old.safetensors`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from lfm.access import Access, narrow
from lfm.config import Config
from lfm.core.hooks import frozen, hooked
from lfm.core.io import load_tensors, save_tensors
from lfm.edit import common, locate, progress
from lfm.edit.contract import EDITOR
from lfm.edit.patch import check_module, fingerprint
from lfm.edit.requests import Batch, Request, build_batch
from lfm.edit.site import EditSite, edit_site
from lfm.errors import LfmError
from lfm.registry import Example, register

FORMAT = "lfm-edit-grace/1"


class GraceConfig(Config):
    # wrapped block; None = the edit site's default (≈ depth/6); negative counts from the top
    layer: int | None = None
    eps_init: float = Field(
        1.0, gt=0
    )  # ε of a new entry, Euclidean on raw activations (paper: 1.0)
    lr: float = Field(1.0, gt=0)  # Adam lr on a new value (paper: 1.0)
    steps: int = Field(100, ge=1)  # Adam steps on a new value at most (paper: 100)
    stop_nll: float = Field(0.05, ge=0)  # stop once the target's mean NLL is below this


@dataclass
class Codebook:
    """GRACE's entries: keys (N, D_in), values (N, D_out), radii (N,), labels (N targets)."""

    keys: torch.Tensor
    values: torch.Tensor
    radii: torch.Tensor
    labels: list[str]

    @classmethod
    def empty(cls, d_in: int, d_out: int) -> Codebook:
        return cls(torch.zeros(0, d_in), torch.zeros(0, d_out), torch.zeros(0), [])

    def add(self, key: torch.Tensor, value: torch.Tensor, radius: float, label: str) -> None:
        self.keys = torch.cat([self.keys, key[None]])
        self.values = torch.cat([self.values, value[None]])
        self.radii = torch.cat([self.radii, torch.tensor([radius])])
        self.labels.append(label)

    def copy(self) -> Codebook:
        return Codebook(self.keys.clone(), self.values.clone(), self.radii.clone(), [*self.labels])


def lookup(codebook: Codebook, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For layer inputs h (..., D_in): the nearest entry per position and whether h is inside
    its radius (both shaped like h without its last dimension)."""
    flat = h.reshape(-1, h.shape[-1]).float()
    dist = torch.cdist(flat, codebook.keys.to(flat.device))  # (P, N)
    d, idx = dist.min(1)
    inside = d <= codebook.radii.to(d.device)[idx]
    return idx.reshape(h.shape[:-1]), inside.reshape(h.shape[:-1])


def replace_hits(codebook: Codebook, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The layer output with every position whose input hits an entry replaced by its value;
    other positions are returned bit for bit (`torch.where`)."""
    if not len(codebook.labels):
        return out
    idx, inside = lookup(codebook, h)
    vals = codebook.values.to(out.device, out.dtype)[idx]  # (..., D_out)
    return torch.where(inside[..., None], vals, out)


@contextmanager
def wrapped(
    module: nn.Module, codebook: Codebook, forced: tuple[int, torch.Tensor] | None = None
) -> Iterator[None]:
    """`module` wrapped by the codebook for the block; `forced` = (position, value) also replaces
    the output at that position of every row (the value being trained)."""

    def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        out = replace_hits(codebook, args[0], out)
        if forced is not None:
            pos, value = forced
            mask = torch.zeros(out.shape[1], 1, dtype=torch.bool, device=out.device)
            mask[pos] = True
            out = torch.where(mask, value.to(out.dtype), out)
        return out

    with hooked([(module, hook)]):
        yield


def _prompt_end(batch: Batch) -> int:
    """The prompt's last token: the position whose next-token logits predict the target."""
    return batch.target_pos[0][0]


def key_and_output(
    model: nn.Module, tokenizer: Any, req: Request, site: EditSite, codebook: Codebook
) -> tuple[torch.Tensor, torch.Tensor]:
    """The wrapped layer's input (the key, D_in) and output (D_out) at the prompt's last token."""
    batch = build_batch(tokenizer, req, [""])  # causal: the target after it changes nothing here
    at_end = replace(batch, subject_pos=torch.tensor([_prompt_end(batch)]))
    with wrapped(site.projection(model), codebook):
        ins, outs = locate.read_at_subject(model, at_end, [site.module], [site.module])
    return ins[site.module][0], outs[site.module][0]


def train_value(
    model: nn.Module, tokenizer: Any, req: Request, site: EditSite, codebook: Codebook,
    start: torch.Tensor, cfg: GraceConfig,
) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """The value that makes the model emit the target when it replaces the layer's output at the
    prompt's last token (Adam on the target NLL, from `start`)."""
    batch = build_batch(tokenizer, req, [""])
    pos = _prompt_end(batch)
    value = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([value], lr=cfg.lr)
    trace: dict[str, float] = {}
    for step in range(cfg.steps):
        with wrapped(site.projection(model), codebook, (pos, value)):
            nll = locate._target_nll(model, batch)
        trace.setdefault("nll_start", nll.item())
        trace.update(nll_end=nll.item(), steps=step)
        if nll.item() < cfg.stop_nll:
            break
        opt.zero_grad()
        nll.backward()
        opt.step()
    return value.detach(), trace


def update(codebook: Codebook, key: torch.Tensor, label: str, eps_init: float) -> tuple[str, float]:
    """The paper's rule for a new key: ("add", ε_init), ("expand", 0) — entry i's radius grows to
    reach the key — or ("split", d/2) — entry i's radius shrinks to d/2, the new entry gets d/2.
    Changes the radii in place; the caller adds the entry, with the radius returned, unless
    "expand"."""
    if not codebook.labels:
        return "add", eps_init
    d, i = (codebook.keys - key).norm(dim=1).min(0)
    d, i = float(d), int(i)
    if d > float(codebook.radii[i]) + eps_init:
        return "add", eps_init
    if codebook.labels[i] == label:  # max: a key already inside keeps the radius it had
        codebook.radii[i] = max(float(codebook.radii[i]), d)
        return "expand", 0.0
    codebook.radii[i] = d / 2
    return "split", d / 2


@dataclass
class GraceUndo:
    """The installed hook; `revert` removes it (no weight was changed)."""

    handle: Any

    def revert(self, model: nn.Module | None = None) -> None:
        self.handle.remove()


@dataclass
class CodebookPatch:
    """GRACE's patch: the codebook at one module, the requests it holds, where it came from."""

    codebook: Codebook
    module: str
    requests: list[Request]
    config: dict[str, Any]
    base: str  # fingerprint of the wrapped module's weights
    info: dict[str, Any] = field(default_factory=dict)
    method: str = "grace"

    @property
    def modules(self) -> list[str]:
        return [self.module]

    def check(self, model: nn.Module) -> None:
        """Raise a one-line `LfmError` unless `model` is the one this codebook was made for."""
        check_module(model, self.module, self.base, "patch (grace) wraps", "patch (grace)")

    def apply(self, model: nn.Module) -> GraceUndo:
        """Install the codebook as a forward hook on the module; `undo.revert(model)` removes it."""
        self.check(model)
        book = self.codebook

        def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return replace_hits(book, args[0], out)

        return GraceUndo(model.get_submodule(self.module).register_forward_hook(hook))

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (the codebook + JSON metadata, tagged `FORMAT`)."""
        b = self.codebook
        return save_tensors(
            path, {"keys": b.keys, "values": b.values, "radii": b.radii}, FORMAT,
            labels=b.labels, module=self.module, method=self.method, base=self.base,
            config=self.config, requests=[r.to_dict() for r in self.requests], info=self.info,
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> CodebookPatch:
        """Read a patch written by `save`."""
        t, meta = load_tensors(path, FORMAT)
        book = Codebook(t["keys"], t["values"], t["radii"], list(meta["labels"]))
        reqs = [Request.from_dict(r) for r in meta["requests"]]
        return cls(book, str(meta["module"]), reqs, meta["config"], str(meta["base"]),
                   meta["info"], str(meta["method"]))  # fmt: skip


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _example(level: Access, seed: int) -> Example:
    """One request on a tiny Llama; the summary is the codebook."""
    lm = common.smoke_model("llama", seed)
    cfg = GraceConfig(steps=10)
    return Example(
        (narrow(lm, level), common.SMOKE_REQUEST), {}, cfg,
        lambda p: {"keys": p.codebook.keys, "values": p.codebook.values, "radii": p.codebook.radii},
    )  # fmt: skip


# pragma: no mutate end


def grace(
    handle: Any,
    requests: Request | Sequence[Request],
    cfg: GraceConfig | None = None,
    *,
    codebook: CodebookPatch | None = None,
) -> CodebookPatch:
    """A GRACE codebook for the requests, edited one after another (the model is unchanged).

    Args:
        handle: a `LocalModel` (WEIGHTS access: it reads hidden states and trains values).
        requests: the edits, in order; each sees the codebook of those before it.
        cfg: the configuration (paper defaults).
        codebook: an earlier GRACE patch for this model to continue (lifelong editing); the
            result holds its entries and requests, then the new ones.
    """
    model, tok = common.model_and_tokenizer(handle, "edit/grace")
    cfg, reqs = cfg or GraceConfig(), common.as_requests(requests)
    site = edit_site(model, cfg.layer)
    if codebook is not None:
        codebook.check(model)
        if codebook.module != site.module:
            raise LfmError(
                f"the earlier codebook wraps {codebook.module}, this config {site.module}"
            )
    book = codebook.codebook.copy() if codebook else Codebook.empty(site.d_in, site.shape[0])
    steps: list[dict[str, Any]] = []
    with frozen(model):
        for req in progress.each(reqs):
            key, out = key_and_output(model, tok, req, site, book)
            rule, radius = update(book, key, req.target, cfg.eps_init)
            trace: dict[str, float] = {}
            if rule != "expand":  # the paper trains a value for a new entry only
                value, trace = train_value(model, tok, req, site, book, out, cfg)
                book.add(key, value, radius, req.target)
            steps.append({"rule": rule, **trace})
    earlier = codebook.requests if codebook else []
    info = {
        "layer": site.layer,
        "steps": [*(codebook.info.get("steps", []) if codebook else []), *steps],
    }
    return CodebookPatch(book, site.module, [*earlier, *reqs], cfg.to_dict(),
                         fingerprint(model, [site.module]), info)  # fmt: skip


grace = register(
    "edit", "grace", shape=EDITOR, branch="memory-based", access=Access.WEIGHTS,
    config=GraceConfig, paper="Hartvigsen et al. 2023, arXiv 2211.11031", example=_example,
    cli="lfm edit apply -m grace (a codebook patch; --on OLD grows one; `lfm edit eval` applies it)",
    # `lfm edit apply --on` an earlier codebook grows it (`codebook=`) instead of applying it
    continues=("codebook", CodebookPatch),
)(grace)  # fmt: skip
