"""MEND: a meta-learned editor of fine-tuning gradients (Mitchell et al. 2022, arXiv 2110.11309).

For an edit (x_e, y_e), the gradient of the target's NLL with respect to the weight W (out, in)
of a linear layer is a sum of rank-one terms, one per token of the sequence,

    ∇W = Σ_i δ_i u_iᵀ,      u_i the layer's input, δ_i ∂NLL/∂(its output) at token i,

over every token (attention carries the target's loss back to the prompt's tokens), so one
forward and one backward pass with hooks give the factors without forming ∇W (`features`).
A small editor network g_ℓ maps each pair to an edited pair and the edit is the rank-n update

    z_i = [u_i ‖ δ_i],   ẑ_i = (z_i − μ_ℓ)/σ_ℓ          running statistics, identity before any
    g_ℓ(ẑ) = ẑ + U (s_ℓ ⊙ relu(V ẑ + b) + o_ℓ)           one hidden layer of width r, U zero-init
    [ũ_i ‖ δ̃_i] = g_ℓ(ẑ_i),   W̃ = W − α_ℓ Σ_i δ̃_i ũ_iᵀ  α_ℓ a learned step per edited matrix

One network (V, b, U) per weight shape is shared by the matrices of that shape; the scale s_ℓ and
offset o_ℓ of its hidden output, the statistics μ_ℓ, σ_ℓ and the step α_ℓ are per matrix. U
starts at zero and the statistics empty, so an untrained editor's update is −α_ℓ ∇W: MEND starts
as one step of fine-tuning.

Meta-training (`train_mend`), per step, with the base model frozen: an edit request x_e → y_e,
an equivalent input x'_e (the prompt or one of its paraphrases) and an unrelated input x_loc (a
neighbourhood prompt of the fact: another subject, the same relation);

    L = c_edit · NLL(y_e | x'_e; W̃) + KL(p_W(·|x_loc) ‖ p_W̃(·|x_loc)),

the KL averaged over x_loc's tokens, differentiated through W̃ into g, s, o and α
(`torch.func.functional_call`; the factors u, δ are constants). Adam on the editor. The
statistics are updated with each step's features before they are used.

At edit time (`mend`) the trained editor maps one forward and backward pass per request to a
weight `Patch` of rank n per edited matrix (n the tokens of the requests, summed over them as
the paper's batched edits): U = −α_ℓ δ̃ stacked, V = ũ stacked; it applies and reverts bit for
bit. Defaults are the paper's (α_ℓ from 1e-4, Adam at 1e-4, c_edit = 0.1) but the hidden width:
r = 64, not the paper's 1,920 (its models' width); one edit per meta-training step (the paper
batches several); docs/edit.md measures them on SmolLM2. The editor is saved as a folder: `editor.safetensors` (tagged `FORMAT`) and `editor.json`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from lfm.access import Access, narrow
from lfm.config import Config
from lfm.core.hooks import frozen, hooked
from lfm.core.io import atomic_path, load_tensors, save_tensors
from lfm.core.layouts import get_layout, num_layers
from lfm.edit import common, progress
from lfm.edit.contract import EDITOR
from lfm.edit.patch import Delta, Patch, make_patch
from lfm.edit.requests import Request, target_ids
from lfm.edit.site import is_conv1d, layer_of
from lfm.errors import LfmError
from lfm.registry import Example, register

FORMAT = "lfm-edit-mend/1"
PAPER = "Mitchell et al. 2022, arXiv 2110.11309"
TENSORS, DESCRIPTION = "editor.safetensors", "editor.json"
LAST_BLOCKS = 3  # the paper edits the MLP matrices of the last 3 blocks
EPS = 1e-12  # under the square root of the statistics' variance


class MendConfig(Config):
    # folder of a trained editor (`train_mend`, `lfm edit train-mend`); editing needs one
    editor: str | None = None
    # edited blocks (every linear matrix of their MLP); None or () = the last 3 (paper); negative
    # counts from the top. Read when an editor is trained; a trained editor keeps its own
    layers: tuple[int, ...] | None = None
    rank: int = Field(64, ge=1)  # r, the hidden width of each editor network (paper: 1,920)
    lr_init: float = Field(1e-4, gt=0)  # α_ℓ at the start of training (paper: 1e-4)
    lr: float = Field(1e-4, gt=0)  # Adam's learning rate on the editor networks (paper: 1e-4)
    alpha_lr: float = Field(1e-4, gt=0)  # Adam's learning rate on the steps α_ℓ (paper: 1e-4)
    c_edit: float = Field(0.1, gt=0)  # weight of the edit loss against the locality KL (paper: 0.1)
    seed: int = 0  # the networks' initialisation and the order of the training requests


# ---- where MEND edits ----


def mlp_matrices(model: nn.Module, layers: Sequence[int] | None = None) -> list[str]:
    """The linear matrices of the MLP of each block in `layers` (None or empty: the last 3),
    in module order: gate, up and down projections for Llama-style models, c_fc and c_proj for
    GPT-2."""
    lay, n = get_layout(model), num_layers(model)
    blocks = sorted(
        {layer_of(model, b) for b in layers} if layers else range(max(0, n - LAST_BLOCKS), n)
    )
    if "." not in lay.mlp_in:
        raise LfmError(f"mend: no MLP module in the layout of {model.config.model_type!r}")
    mlp = lay.mlp_in.rsplit(".", 1)[0]
    out = []
    for b in blocks:
        prefix = f"{lay.layers}.{b}.{mlp}"
        for name, mod in model.get_submodule(prefix).named_modules():
            if name and (isinstance(mod, nn.Linear) or is_conv1d(mod)):
                out.append(f"{prefix}.{name}")
    return out


def _shape(model: nn.Module, name: str) -> tuple[int, int]:
    """(out, in) of a linear matrix, whatever its storage (GPT-2's Conv1D keeps (in, out))."""
    mod = model.get_submodule(name)
    w = mod.weight
    return (
        (int(w.shape[1]), int(w.shape[0])) if is_conv1d(mod) else (int(w.shape[0]), int(w.shape[1]))
    )


# ---- the gradient's factors ----


@dataclass(frozen=True)
class Tokens:
    """One sequence: `ids` (1, T) and the positions whose next token is a target token."""

    ids: torch.Tensor
    pos: torch.Tensor
    tgt: torch.Tensor


def tokens(tok: Any, prompt: str, target: str | None = None) -> Tokens:
    """`prompt` (+ the target's tokens but its last one, read after the prompt with a space)."""
    ctx = list(tok(prompt)["input_ids"])
    tgt = target_ids(tok, prompt, target) if target else []
    ids = torch.tensor([ctx + tgt[:-1]])
    return Tokens(ids, torch.arange(len(ctx) - 1, len(ctx) - 1 + len(tgt)), torch.tensor(tgt))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def nll(model: nn.Module, t: Tokens, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean NLL of the target tokens, with `params` in place of the model's (None: its own)."""
    ids = t.ids.to(_device(model))
    if params:
        logits = functional_call(model, params, args=(), kwargs={"input_ids": ids}, strict=False)
    else:
        logits = model(input_ids=ids)
    return F.cross_entropy(logits.logits[0, t.pos.to(ids.device)].float(), t.tgt.to(ids.device))


def features(
    model: nn.Module, tok: Any, req: Request, modules: Sequence[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (u (T, D_in), δ (T, D_out))} over every token of `prompt + target`, float32.

    One forward and one backward pass of the mean target NLL: each matrix's output gets a zero
    "tap" that requires a gradient, so ∂NLL/∂tap is δ and Σ_i δ_i u_iᵀ is ∇W (the weights stay
    frozen).
    """
    t = tokens(tok, req.prompt, req.target)
    keys: dict[str, torch.Tensor] = {}
    taps: dict[str, torch.Tensor] = {}

    def tap(name: str) -> Any:
        def fn(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            keys[name] = args[0].detach()
            taps[name] = torch.zeros_like(out, requires_grad=True)
            return out + taps[name]

        return fn

    with hooked([(model.get_submodule(m), tap(m)) for m in modules]), torch.enable_grad():
        loss = nll(model, t)
        grads = torch.autograd.grad(loss, [taps[m] for m in modules])
    return {m: (keys[m][0].float(), g[0].float()) for m, g in zip(modules, grads, strict=True)}


# ---- the editor ----


class _Net(nn.Module):
    """g(ẑ) = ẑ + U (s ⊙ relu(V ẑ + b) + o), shared by the matrices of one shape."""

    def __init__(self, dim: int, rank: int, gen: torch.Generator):
        super().__init__()
        self.v = nn.Parameter(torch.randn(rank, dim, generator=gen) / dim**0.5)
        self.b = nn.Parameter(torch.zeros(rank))
        self.u = nn.Parameter(torch.zeros(dim, rank))  # zero: g starts as the identity

    def forward(self, z: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        hidden = scale * torch.relu(z @ self.v.T + self.b) + offset
        return z + hidden @ self.u.T


def _key(shape: Sequence[int]) -> str:
    return f"{shape[0]}x{shape[1]}"


class MendEditor(nn.Module):
    """The editor networks (one per weight shape), per-matrix scales, offsets, steps α and
    running statistics of the features [u ‖ δ].

    Args:
        modules: the edited matrices' names.
        shapes: their (out, in) shapes.
        rank: the hidden width r of each network.
        lr_init: the initial steps α.
        seed: the networks' initialisation.
    """

    def __init__(
        self,
        modules: Sequence[str],
        shapes: Sequence[tuple[int, int]],
        rank: int = 64,
        lr_init: float = 1e-4,
        seed: int = 0,
    ):
        super().__init__()
        if not modules:
            raise LfmError("a MEND editor needs at least one edited matrix")
        if len(shapes) != len(modules):
            raise LfmError(f"a MEND editor needs one shape per matrix: {len(modules)} matrices, "
                           f"{len(shapes)} shapes")  # fmt: skip
        self.modules_ = list(modules)
        self.shapes = [(int(o), int(i)) for o, i in shapes]
        self.rank = int(rank)
        gen = torch.Generator().manual_seed(seed)
        self.nets = nn.ModuleDict()
        for shape in self.shapes:
            if _key(shape) not in self.nets:
                self.nets[_key(shape)] = _Net(shape[0] + shape[1], rank, gen)
        n = len(self.modules_)
        self.scale = nn.Parameter(torch.ones(n, rank))
        self.offset = nn.Parameter(torch.zeros(n, rank))
        self.alpha = nn.Parameter(torch.full((n,), float(lr_init)))
        dims = [o + i for o, i in self.shapes]
        for k, d in enumerate(dims):
            self.register_buffer(f"count_{k}", torch.zeros((), dtype=torch.float64))
            self.register_buffer(f"mean_{k}", torch.zeros(d, dtype=torch.float64))
            self.register_buffer(f"m2_{k}", torch.zeros(d, dtype=torch.float64))

    @classmethod
    def for_model(cls, model: nn.Module, cfg: MendConfig) -> MendEditor:
        """An untrained editor for the MLP matrices of `cfg.layers` of `model`."""
        modules = mlp_matrices(model, cfg.layers)
        return cls(modules, [_shape(model, m) for m in modules], cfg.rank, cfg.lr_init, cfg.seed)

    def index(self, module: str) -> int:
        return self.modules_.index(module)

    # -- running statistics (Chan's parallel rule) --

    def update_stats(self, k: int, z: torch.Tensor) -> None:
        """Add the features z (n, D) of matrix k to its running mean and variance."""
        with torch.no_grad():
            z = z.double().to(self._buf("mean", k).device)
            count, mean, m2 = self._buf("count", k), self._buf("mean", k), self._buf("m2", k)
            n, zm = z.shape[0], z.mean(0)
            total = count + n
            d = zm - mean
            mean += d * n / total
            m2 += (z - zm).pow(2).sum(0) + d.pow(2) * count * n / total
            count.fill_(total)

    def normalise(self, k: int, z: torch.Tensor) -> torch.Tensor:
        """(z − μ)/σ with matrix k's statistics; z unchanged while they are empty."""
        count = float(self._buf("count", k))
        if count == 0:
            return z
        var = self._buf("m2", k) / max(count - 1.0, 1.0)
        return ((z.double() - self._buf("mean", k)) / (var + EPS).sqrt()).to(z.dtype)

    def _buf(self, name: str, k: int) -> torch.Tensor:
        return getattr(self, f"{name}_{k}")  # type: ignore[no-any-return]

    # -- the edited gradient --

    def transform(
        self, module: str, u: torch.Tensor, delta: torch.Tensor, update: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ũ, δ̃) = g_ℓ([u ‖ δ]) split back (`update`: add [u ‖ δ] to the statistics first)."""
        k = self.index(module)
        z = torch.cat([u, delta], -1).float()
        if update:
            self.update_stats(k, z)
        out = self.nets[_key(self.shapes[k])](self.normalise(k, z), self.scale[k], self.offset[k])
        d_in = self.shapes[k][1]
        return out[:, :d_in], out[:, d_in:]

    def factors(
        self, module: str, u: torch.Tensor, delta: torch.Tensor, update: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (out, n), B (in, n)) with W̃ − W = A Bᵀ = −α_ℓ Σ_i δ̃_i ũ_iᵀ."""
        ut, dt = self.transform(module, u, delta, update)
        return (-self.alpha[self.index(module)] * dt).T, ut.T

    # -- files --

    def description(self) -> dict[str, Any]:
        return {"modules": self.modules_, "shapes": self.shapes, "rank": self.rank}

    def save(self, folder: str | Path, **info: Any) -> Path:
        """Write `editor.safetensors` (tagged `FORMAT`) and `editor.json` in `folder`,
        atomically; `info` (the training config, the loss history) goes into the JSON."""
        desc = {"format": FORMAT, **self.description(), **info}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(folder) as tmp:
            tmp.mkdir(parents=True, exist_ok=True)
            save_tensors(tmp / TENSORS, tensors, FORMAT, **self.description())
            (tmp / DESCRIPTION).write_text(json.dumps(desc, indent=2, default=str) + "\n")
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path) -> MendEditor:
        """Read an editor written by `save` (one-line `LfmError` for anything else)."""
        folder = Path(folder)
        if not (folder / TENSORS).is_file() or not (folder / DESCRIPTION).is_file():
            raise LfmError(
                f"{folder} is not a MEND editor (no {TENSORS} and {DESCRIPTION}); "
                "train one with `lfm edit train-mend`"
            )
        tensors, meta = load_tensors(folder / TENSORS, FORMAT)
        ed = cls(meta["modules"], [tuple(s) for s in meta["shapes"]], int(meta["rank"]))
        try:
            ed.load_state_dict(tensors)
        except RuntimeError as e:
            raise LfmError(
                f"{folder}: the editor's tensors do not match its description ({e})".splitlines()[0]
            ) from None
        return ed

    def check(self, model: nn.Module) -> None:
        """One-line `LfmError` unless `model` has every edited matrix with its shape."""
        for m, shape in zip(self.modules_, self.shapes, strict=True):
            try:
                got = _shape(model, m)
            except AttributeError:
                raise LfmError(f"the MEND editor edits {m}, which this model lacks") from None
            if got != tuple(shape):
                raise LfmError(
                    f"the MEND editor was trained for {m} of shape {tuple(shape)}, not {got}"
                )


# ---- edits and the meta-objective ----


def edited_params(
    model: nn.Module,
    editor: MendEditor,
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]],
    update: bool = False,
) -> dict[str, torch.Tensor]:
    """{"<module>.weight": W̃} in each module's storage orientation, differentiable in the
    editor's parameters."""
    out = {}
    for m, (u, d) in feats.items():
        mod = model.get_submodule(m)
        a, b = editor.factors(m, u, d, update)
        dw = (a @ b.T).to(mod.weight.dtype)
        out[f"{m}.weight"] = mod.weight + (dw.T if is_conv1d(mod) else dw)
    return out


def locality_kl(model: nn.Module, t: Tokens, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(p_W(·|x) ‖ p_W̃(·|x)) at every token of x, averaged."""
    ids = t.ids.to(_device(model))
    with torch.no_grad():
        base = model(input_ids=ids).logits[0].float().log_softmax(-1)
    edit = functional_call(model, params, args=(), kwargs={"input_ids": ids}, strict=False)
    edited = edit.logits[0].float().log_softmax(-1)
    return (base.exp() * (base - edited)).sum(-1).mean()


@dataclass(frozen=True)
class Item:
    """A training or held-out edit: the request, its equivalent prompts, its unrelated prompts."""

    request: Request
    equivalents: tuple[str, ...]  # x'_e: the prompt and its paraphrases
    unrelated: tuple[str, ...]  # x_loc: neighbourhood prompts (another subject, same relation)


def items(data: Sequence[Any]) -> list[Item]:
    """`Item`s from facts (`lfm.edit.facts.Fact`: prompt, paraphrases, neighbourhood) or bare
    requests (the prompt only). An edit without unrelated prompts takes the next edit's (in
    order, the last taking the first's), or that edit's prompt if it has none."""
    base = []
    for d in data:
        if isinstance(d, Request):
            base.append(Item(d, (d.prompt,), ()))
        elif hasattr(d, "request") and hasattr(d, "paraphrases"):
            base.append(Item(d.request, (d.prompt, *d.paraphrases), tuple(d.neighbourhood)))
        else:
            raise LfmError(f"mend trains on facts or edit requests, not {type(d).__name__}")
    if len(base) < 2 and not any(b.unrelated for b in base):
        raise LfmError("mend needs two or more training edits, or facts with neighbourhood prompts")
    out = []
    for i, it in enumerate(base):
        after = base[(i + 1) % len(base)]
        out.append(Item(it.request, it.equivalents,
                        it.unrelated or after.unrelated or (after.request.prompt,)))  # fmt: skip
    return out


def meta_loss(
    model: nn.Module,
    tok: Any,
    editor: MendEditor,
    item: Item,
    c_edit: float,
    equivalents: Sequence[str] | None = None,
    unrelated: Sequence[str] | None = None,
    update: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """c_edit · L_e + L_loc of one edit, averaged over the given x'_e and x_loc (None: all of
    the item's), and its parts {"edit", "loc", "loss"}."""
    feats = features(model, tok, item.request, editor.modules_)
    params = edited_params(model, editor, feats, update)
    eqs = list(equivalents or item.equivalents)
    locs = list(unrelated or item.unrelated)
    l_e = torch.stack([nll(model, tokens(tok, p, item.request.target), params) for p in eqs]).mean()
    l_loc = torch.stack([locality_kl(model, tokens(tok, p), params) for p in locs]).mean()
    loss = c_edit * l_e + l_loc
    parts = {"edit": l_e.item(), "loc": l_loc.item(), "loss": loss.item()}
    return loss, parts


def evaluate_editor(
    handle: Any, data: Sequence[Any], editor: MendEditor, c_edit: float = 0.1
) -> dict[str, float]:
    """The mean meta-loss parts over held-out `data` (facts or requests), every x'_e and x_loc."""
    model, tok = common.model_and_tokenizer(handle, "edit/mend")
    rows = []
    with frozen(model), torch.no_grad():
        for it in items(data):
            rows.append(meta_loss(model, tok, editor, it, c_edit)[1])
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("edit", "loc", "loss")}


def train_mend(
    handle: Any,
    requests: Sequence[Any],
    cfg: MendConfig | None = None,
    steps: int = 1000,
    *,
    editor: MendEditor | None = None,
    max_seconds: float | None = None,
) -> tuple[MendEditor, list[dict[str, float]]]:
    """Meta-train a MEND editor on `requests` (facts, or bare requests); the model is frozen.

    Each step draws an edit (a seeded shuffle of the requests, epoch after epoch), one of its
    equivalent prompts x'_e and one of its unrelated prompts x_loc, and takes one Adam step on
    c_edit · L_e + L_loc.

    Args:
        handle: a `LocalModel` (the model and its tokenizer).
        requests: the training edits: `Fact`s (paraphrases, neighbourhood prompts) or `Request`s.
        cfg: the configuration (`layers`, `rank`, `lr_init` shape a new editor).
        steps: meta-training steps.
        editor: an editor to train further (None: a new one for `cfg.layers`).
        max_seconds: stop after the step that passes this many seconds of wall time, if
            that comes before `steps` (None: no limit).

    Returns:
        The trained editor (in eval mode) and, per step, the loss parts ("edit", "loc",
        "loss") and the mean step α after it ("alpha").
    """
    if steps < 0:
        raise LfmError(f"steps must be 0 or more, not {steps}")
    model, tok = common.model_and_tokenizer(handle, "edit/mend")
    cfg = cfg or MendConfig()
    data = items(requests)
    editor = editor or MendEditor.for_model(model, cfg)
    editor.check(model)
    editor.to(_device(model))
    alpha = [editor.alpha]
    rest = [p for n, p in editor.named_parameters() if n != "alpha"]
    opt = torch.optim.Adam([{"params": rest, "lr": cfg.lr}, {"params": alpha, "lr": cfg.alpha_lr}])
    rng = random.Random(cfg.seed)
    order: list[int] = []
    history = []
    editor.train()
    start = time.perf_counter()
    with frozen(model):
        bar = progress.bar(range(steps), desc="meta-training MEND", unit="step")
        for _ in bar:
            if not order:
                order = list(range(len(data)))
                rng.shuffle(order)
            it = data[order.pop()]
            eq, loc = rng.choice(it.equivalents), rng.choice(it.unrelated)
            loss, parts = meta_loss(model, tok, editor, it, cfg.c_edit, [eq], [loc], update=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append({**parts, "alpha": editor.alpha.mean().item()})
            bar.set_postfix(edit=f"{parts['edit']:.2f}", loc=f"{parts['loc']:.3f}")
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                break
    editor.eval()
    return editor, history


def mend_deltas(
    model: nn.Module, tok: Any, editor: MendEditor, reqs: Sequence[Request]
) -> list[Delta]:
    """The low-rank deltas of the requests edited together (their factors stacked)."""
    editor.check(model)
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in editor.modules_}
    with frozen(model):
        for r in progress.each(reqs):
            feats = features(model, tok, r, editor.modules_)
            with torch.no_grad():
                for m, (u, d) in feats.items():
                    parts[m].append(editor.factors(m, u, d))
    w = {m: model.get_submodule(m).weight for m in editor.modules_}
    return [
        Delta(m, torch.cat([a for a, _ in p], 1).to(w[m].dtype).contiguous(),
              torch.cat([b for _, b in p], 1).to(w[m].dtype).contiguous())
        for m, p in parts.items()
    ]  # fmt: skip


def _load_editor(cfg: MendConfig) -> MendEditor:
    if cfg.editor is None:
        raise LfmError(
            "mend needs a trained editor: train one first (`lfm edit train-mend --out DIR`), "
            "then give its folder as `editor` in the config"
        )
    return MendEditor.load(cfg.editor)


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _example(level: Access, seed: int) -> Example:
    """A tiny editor meta-trained for 3 steps on two requests, then one edit on a tiny Llama."""
    lm = common.smoke_model("llama", seed)
    train = [Request("The old city of Kyoto", "Kyoto", "Berlin"),
             Request("The city of the Colosseum", "Colosseum", "Paris")]  # fmt: skip
    cfg = MendConfig(rank=8, lr_init=0.1, lr=1e-2, seed=seed)
    editor, _ = train_mend(lm, train, cfg, steps=3)
    return Example(
        (narrow(lm, level), common.SMOKE_REQUEST), {"editor": editor}, cfg,
        lambda patch: {d.module: d.matrix() for d in patch.deltas},
    )  # fmt: skip


# pragma: no mutate end


def mend(
    handle: Any,
    requests: Request | Sequence[Request],
    cfg: MendConfig | None = None,
    *,
    editor: MendEditor | None = None,
) -> Patch:
    """A MEND patch: the trained editor's rank-n update of each edited matrix (model unchanged).

    Args:
        handle: a `LocalModel` (WEIGHTS access: it reads activations and gradients).
        requests: the edits, made together (their edited gradients summed).
        cfg: the configuration; `editor` names the trained editor's folder.
        editor: a trained editor in memory, instead of `cfg.editor`.
    """
    model, tok = common.model_and_tokenizer(handle, "edit/mend")
    cfg, reqs = cfg or MendConfig(), common.as_requests(requests)
    editor = editor if editor is not None else _load_editor(cfg)
    editor.to(_device(model)).eval()
    deltas = mend_deltas(model, tok, editor, reqs)
    patch = make_patch(model, deltas, reqs, "mend", cfg)
    patch.info["alpha"] = dict(zip(editor.modules_, editor.alpha.tolist(), strict=True))
    return patch


mend = register(
    "edit", "mend", shape=EDITOR, branch="meta-learned editor", access=Access.WEIGHTS,
    config=MendConfig, paper=PAPER, example=_example,
    cli="lfm edit apply -m mend --editor DIR (an editor trained by lfm edit train-mend)",
)(mend)  # fmt: skip
