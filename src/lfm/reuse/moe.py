"""Sparse upcycling: a Mixtral mixture of experts from fine-tuned Llama models of one base.

Sparse Upcycling (Komatsuzaki et al. 2023, arXiv 2212.05055) starts a sparse mixture of experts
from a dense checkpoint, every expert a copy of its MLP; mergekit-moe (Goddard et al. 2024, arXiv
2403.13257) takes each expert's MLP from another fine-tuned model of one base, the shared parts
(embeddings, attention, norms, head) from the base, and sets the routers so that each expert gets
the text its model was tuned on. At layer l, for the MLP input x of a token:

    y = Σ_{e ∈ top-k(g)} p_e / Σ_{e' ∈ top-k(g)} p_e' · MLP_e(x),   p = softmax(g),   g = W_l x

with W_l (E, d) one router row per expert. Router modes: `hidden` (mergekit-moe's default): row e
is the base's MLP input at layer l averaged over the tokens of each of expert e's positive prompts,
then over its prompts (less the same for its negative prompts), scaled to unit length; `random`:
seeded Gaussian rows of unit length; `train`: the hidden rows, then Adam steps on the mean over
layers of the cross-entropy of softmax(W_l x) against the expert whose prompt x comes from (the
base's MLP inputs, each expert's tokens weighted equally): only the routers learn.

The output is a Mixtral checkpoint in the layout `transformers` saves (`block_sparse_moe.experts.
{e}.w1/w2/w3` = gate/down/up, `block_sparse_moe.gate`), which it loads as its fused 3-D experts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from lfm.access import Access, LocalModel, module_of
from lfm.config import Config
from lfm.core.hooks import capture
from lfm.errors import ConfigError
from lfm.registry import Example, register
from lfm.reuse.contract import UPCYCLER, reader_of
from lfm.reuse.driver import DictReader, MissingTensorError, Reader, ShapeMismatchError

SUPPORTED = ("llama", "mistral")  # model types whose blocks are Mixtral's less the MoE
_PROJ = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # Llama MLP -> Mixtral expert
_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Config fields that must agree between the base and every expert for their MLPs to be swapped.
SHAPE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "vocab_size", "hidden_act")  # fmt: skip
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class MoeUpcycleConfig(Config):
    # router initialisation: the prompts' hidden states (mergekit-moe's default), random, or
    # hidden then trained on the prompts
    gate_mode: Literal["hidden", "random", "train"] = "hidden"
    # experts per token (top-k); None: 2, or the number of experts if fewer (mergekit-moe's)
    experts_per_token: int | None = Field(None, ge=1)
    # embeddings, attention, norms and head: the base's (mergekit-moe) or the experts' mean
    shared: Literal["base", "average"] = "base"
    train_steps: int = Field(100, ge=1)  # router-only Adam steps of gate_mode train
    lr: float = Field(1e-2, gt=0)  # their step size
    seed: int = 0  # seeds the random rows
    dtype: Literal["float32", "float16", "bfloat16"] | None = None  # output; None: the base's


def top_k(cfg: MoeUpcycleConfig, n_experts: int) -> int:
    """Experts per token; a one-line error when more than there are experts."""
    k = cfg.experts_per_token or min(2, n_experts)
    if k > n_experts:
        raise ConfigError(f"experts_per_token is {k} but there are only {n_experts} experts")
    return k


class MoeExpert(Config):
    source_model: str = Field(min_length=1)  # an asset name, a model folder (plan-relative)
    positive_prompts: tuple[str, ...] = ()  # texts this expert should receive
    negative_prompts: tuple[str, ...] = ()  # texts it should not (subtracted, hidden mode)

    @field_validator("positive_prompts", "negative_prompts")
    @classmethod
    def _no_blank(cls, prompts: tuple[str, ...]) -> tuple[str, ...]:
        if any(not p.strip() for p in prompts):
            raise ValueError("a prompt is empty; give each prompt some text")
        return prompts


class MoePlan(MoeUpcycleConfig):
    """An upcycling plan in mergekit-moe's form: `base_model`, `experts` (`source_model`,
    `positive_prompts`, `negative_prompts`), `gate_mode`, `experts_per_token`, `dtype`, and lfm's
    other `MoeUpcycleConfig` fields."""

    base_model: str = Field(min_length=1)  # shared parts and the hidden states of the prompts
    experts: tuple[MoeExpert, ...] = Field(min_length=1)  # one expert per entry, in order

    @model_validator(mode="after")
    def _fits(self) -> MoePlan:
        top_k(self, len(self.experts))
        if self.gate_mode != "random":
            for i, e in enumerate(self.experts):
                if not e.positive_prompts:
                    raise ValueError(f"expert {i} has no positive_prompts (gate_mode "
                                     f"{self.gate_mode} needs them; random does not)")  # fmt: skip
        return self

    def config(self) -> MoeUpcycleConfig:
        """The method's config, less the models."""
        fields = self.to_dict()
        return MoeUpcycleConfig.build({k: fields[k] for k in MoeUpcycleConfig.model_fields})

    def prompts(self) -> tuple[list[list[str]], list[list[str]]]:
        """Positive and negative prompts, one list per expert."""
        return [list(e.positive_prompts) for e in self.experts], [
            list(e.negative_prompts) for e in self.experts
        ]


# ---------------------------------------------------------------------------------------------
# Configs: what is checked before any tensor is read.


def check_configs(base: Any, experts: Sequence[Any], names: Sequence[str]) -> None:
    """One-line errors unless the base is a Llama or Mistral without biases and every expert
    has its architecture and sizes (`names`: the base's then the experts' for messages)."""
    kind = getattr(base, "model_type", None)
    if kind not in SUPPORTED:
        raise ConfigError(f"{names[0]} is a {kind!r} model; MoE upcycling builds Mixtral from "
                          f"{' or '.join(SUPPORTED)} models")  # fmt: skip
    if getattr(base, "attention_bias", False) or getattr(base, "mlp_bias", False):
        raise ConfigError(f"{names[0]} has attention or MLP biases, which Mixtral has not")
    for name, cfg in zip(names[1:], experts, strict=True):
        for f in SHAPE_FIELDS:
            if getattr(cfg, f, None) != getattr(base, f, None):
                raise ShapeMismatchError(f"{name} has {f} {getattr(cfg, f, None)!r}, the base "
                                         f"{getattr(base, f, None)!r}: experts must share the "
                                         "base's architecture")  # fmt: skip


def mixtral_config(base: Any, n_experts: int, k: int, dtype: torch.dtype) -> Any:
    """A MixtralConfig with the base's sizes, attention and vocabulary, and `n_experts` experts."""
    from transformers import MixtralConfig

    known = MixtralConfig().to_dict()
    fields = {f: v for f, v in base.to_dict().items() if f in known and f != "architectures"}
    fields.update(num_local_experts=n_experts, num_experts_per_tok=k, output_router_logits=False,
                  sliding_window=getattr(base, "sliding_window", None))  # fmt: skip
    cfg = MixtralConfig(**fields)
    cfg.architectures = ["MixtralForCausalLM"]
    cfg.dtype = dtype
    return cfg


# ---------------------------------------------------------------------------------------------
# Routers.


def mlp_inputs(model: nn.Module, tokenizer: Any, prompts: Sequence[str]) -> list[list[Tensor]]:
    """The MLP input of every layer for each prompt's own tokens (special tokens left out):
    [layer][prompt] -> (tokens, d), float32 on the CPU. One prompt per pass: no padding."""
    n = model.config.num_hidden_layers
    names = [f"model.layers.{i}.mlp" for i in range(n)]
    out: list[list[Tensor]] = [[] for _ in names]
    device = next(model.parameters()).device
    for p in prompts:
        enc = tokenizer(p, return_tensors="pt", return_special_tokens_mask=True)
        keep = enc["special_tokens_mask"][0] == 0  # a BOS is the same for every prompt
        if not keep.any():
            raise ConfigError(f"the prompt {p!r} has only special tokens; give it some text")
        with torch.no_grad(), capture(model, names, inputs=True) as acts:
            model(input_ids=enc["input_ids"].to(device))
        for i, name in enumerate(names):
            out[i].append(acts[name][0].float().cpu()[keep])
    return out


def _prompt_mean(feats: list[list[Tensor]]) -> Tensor:
    """(layers, d): per layer, the mean over prompts of each prompt's mean over its tokens."""
    return torch.stack([torch.stack([t.mean(0) for t in layer]).mean(0) for layer in feats])


def _unit(rows: Tensor) -> Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def hidden_rows(
    pos: Sequence[list[list[Tensor]]], neg: Sequence[list[list[Tensor]] | None]
) -> Tensor:
    """(layers, experts, d): each expert's mean positive MLP input less its mean negative one,
    of unit length (`pos[e]`, `neg[e]`: `mlp_inputs` of expert e's prompts)."""
    rows = [
        _prompt_mean(p) - (_prompt_mean(q) if q else 0.0) for p, q in zip(pos, neg, strict=True)
    ]
    return _unit(torch.stack(rows, 1))


def random_rows(layers: int, experts: int, d: int, seed: int) -> Tensor:
    """(layers, experts, d): seeded Gaussian rows of unit length."""
    g = torch.Generator().manual_seed(seed)
    return _unit(torch.randn(layers, experts, d, generator=g))


def train_rows(init: Tensor, pos: Sequence[list[list[Tensor]]], steps: int, lr: float) -> Tensor:
    """Router-only training from `init` (layers, experts, d): Adam on the mean over layers of the
    cross-entropy routing each token of expert e's prompts to e, every expert weighted equally."""
    n_exp = init.shape[1]
    x = torch.stack([torch.cat([torch.cat(p[i]) for p in pos]) for i in range(init.shape[0])])
    counts = [sum(len(t) for t in p[0]) for p in pos]  # tokens per expert (the same every layer)
    y = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    w = torch.cat([torch.full((c,), 1.0 / (n_exp * c)) for c in counts])
    rows = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([rows], lr=lr)
    for _ in range(steps):
        logits = torch.einsum("lnd,led->lne", x, rows)  # (layers, tokens, experts)
        ce = F.cross_entropy(logits.reshape(-1, n_exp), y.repeat(len(x)), reduction="none")
        loss = (ce * w.repeat(len(x))).sum() / len(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return rows.detach()


def router_rows(
    cfg: MoeUpcycleConfig,
    model: nn.Module,
    tokenizer: Any,
    positive: Sequence[Sequence[str]],
    negative: Sequence[Sequence[str]] | None = None,
    progress: bool = False,
) -> Tensor:
    """(layers, experts, d) router weights of `cfg.gate_mode`; the base `model` runs the prompts
    (`positive`, `negative`: one list per expert; `progress`: a bar over the experts)."""
    from tqdm.auto import tqdm

    mc = model.config
    if cfg.gate_mode == "random":
        return random_rows(mc.num_hidden_layers, len(positive), mc.hidden_size, cfg.seed)
    bar = tqdm(positive, desc="router prompts", unit="expert", disable=not progress)
    pos = [mlp_inputs(model, tokenizer, p) for p in bar]
    neg = [mlp_inputs(model, tokenizer, q) if q else None
           for q in (negative or [[] for _ in positive])]  # fmt: skip
    rows = hidden_rows(pos, neg)
    return train_rows(rows, pos, cfg.train_steps, cfg.lr) if cfg.gate_mode == "train" else rows


# ---------------------------------------------------------------------------------------------
# Tensors: which output tensor comes from where.


@dataclass(frozen=True)
class Part:
    """One tensor of the Mixtral checkpoint and where it comes from."""

    out: str  # its name in the checkpoint
    src: str  # the tensor read ("" for a router)
    expert: int | None  # the expert model it comes from; None: shared (base or average)
    layer: int | None  # its decoder layer; None: embeddings, final norm, head


def expert_name(layer: int, e: int, proj: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{e}.{_PROJ[proj]}.weight"


def router_name(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


def parts(names: Sequence[str], n_experts: int, n_layers: int, tied: bool) -> list[Part]:
    """Every output tensor, layer by layer (shared tensors first, then experts, then the router;
    embeddings, final norm and head before the layers). A tied head is left out: the MoE ties it
    to its embeddings too."""
    out: list[Part] = []
    for name in names:
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue  # a buffer old checkpoints stored; a head the loader ties
        m, layer = _MLP.match(name), _LAYER.match(name)
        if m is None:
            out.append(Part(name, name, None, int(layer[1]) if layer else None))
        else:
            i = int(m[1])
            out += [Part(expert_name(i, e, m[2]), name, e, i) for e in range(n_experts)]
    out += [Part(router_name(i), "", None, i) for i in range(n_layers)]
    return sorted(out, key=lambda p: -1 if p.layer is None else p.layer)  # stable: base order


def check_parts(ps: Sequence[Part], base: Reader, experts: Sequence[Reader], shared: str) -> None:
    """Every tensor an expert gives exists with the base's shape (headers only, no tensor read)."""
    have = [set(r.keys()) for r in experts]
    for p in ps:
        users = [p.expert] if p.expert is not None else range(len(experts))
        if not p.src or (p.expert is None and shared == "base"):
            continue
        for e in users:
            if p.src not in have[e]:
                raise MissingTensorError(f"expert {e} has no tensor {p.src}")
            if experts[e].shape(p.src) != base.shape(p.src):
                raise ShapeMismatchError(f"expert {e}: {p.src} is {list(experts[e].shape(p.src))}, "
                                         f"the base's {list(base.shape(p.src))}")  # fmt: skip


def tensor_of(p: Part, base: Reader, experts: Sequence[Reader], rows: Tensor, shared: str,
              dtype: torch.dtype) -> Tensor:  # fmt: skip
    """The output tensor `p` in `dtype` (integer buffers as stored)."""
    if not p.src:
        assert p.layer is not None
        t = rows[p.layer]
    elif p.expert is not None:
        t = experts[p.expert].get(p.src)
    elif shared == "average" and base.get(p.src).is_floating_point():
        t = sum(r.get(p.src).float() for r in experts) / len(experts)  # one tensor at a time
    else:
        t = base.get(p.src)
    return t.to(dtype) if t.is_floating_point() else t


def tensors(ps: Sequence[Part], base: Reader, experts: Sequence[Reader], rows: Tensor,
            shared: str, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:  # fmt: skip
    """(name, tensor) of every part, in order; each read when it is reached."""
    for p in ps:
        yield p.out, tensor_of(p, base, experts, rows, shared, dtype)


def fused(state: dict[str, Tensor], n_layers: int, n_experts: int) -> dict[str, Tensor]:
    """A checkpoint's state dict in the names and 3-D expert tensors of transformers' module."""
    out = {k: v for k, v in state.items() if ".block_sparse_moe." not in k}
    for i in range(n_layers):
        pre = f"model.layers.{i}.block_sparse_moe"
        ws = [[state[f"{pre}.experts.{e}.{w}.weight"] for e in range(n_experts)]
              for w in ("w1", "w3", "w2")]  # fmt: skip
        out[f"model.layers.{i}.mlp.gate.weight"] = state[f"{pre}.gate.weight"]
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat(
            [torch.stack(ws[0]), torch.stack(ws[1])], dim=1
        )  # (E, 2I, d): gate rows then up rows
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(ws[2])  # (E, d, I)
    return out


# ---------------------------------------------------------------------------------------------
# The registered method: in memory.


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _example(level: Access, seed: int) -> Example:
    from lfm.access import narrow
    from lfm.core.tiny import tiny_lm

    (base, tok), *rest = [tiny_lm("llama", seed + i) for i in range(3)]
    handles = [narrow(LocalModel(m, tok, name=f"lm{i}"), level)
               for i, m in enumerate([base] + [m for m, _ in rest])]  # fmt: skip
    prompts = [["The capital of Italy is Rome."], ["Tokyo is a large city in Japan."]]
    return Example((handles[0], handles[1:], prompts), cfg=MoeUpcycleConfig(gate_mode="train",
                   train_steps=5), summary=lambda h: h.model.state_dict())  # fmt: skip


# pragma: no mutate end


def moe_upcycle(
    base: Any,
    experts: Sequence[Any],
    prompts: Sequence[Sequence[str]],
    cfg: MoeUpcycleConfig | None = None,
    negative: Sequence[Sequence[str]] | None = None,
) -> LocalModel:
    """A Mixtral model in memory from a base LM and fine-tuned copies of it.

    Args:
        base: the base causal LM (a `LocalModel`: its tokenizer encodes the prompts).
        experts: the fine-tuned models (handles, modules, state dicts or weight files), one
            expert each.
        prompts: positive prompts, one list per expert (may be empty lists for random gates).
        cfg: router mode, experts per token, shared parts, output dtype.
        negative: negative prompts, one list per expert (hidden and train modes).

    Returns:
        The MoE as a `LocalModel` with the base's tokenizer.
    """
    assert cfg is not None  # resolved by the registry
    net = module_of(base, "reuse/moe_upcycle")
    tokenizer = getattr(base, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("give the base as a LocalModel: its tokenizer encodes the prompts and "
                          "goes with the MoE")  # fmt: skip
    n, k = len(experts), top_k(cfg, len(experts))
    if len(prompts) != n:
        raise ConfigError(f"{len(prompts)} prompt lists for {n} experts; give one per expert")
    if cfg.gate_mode != "random" and not all(prompts):
        raise ConfigError(f"gate_mode {cfg.gate_mode} needs positive prompts for every expert")
    check_configs(net.config, [getattr(m, "config", net.config) for m in _modules(experts)],
                  ["the base"] + [f"expert {i}" for i in range(n)])  # fmt: skip
    tied = bool(getattr(net.config, "tie_word_embeddings", False))
    base_reader = DictReader(net.state_dict(), tied)
    readers = [reader_of(m) for m in experts]
    ps = parts(base_reader.keys(), n, net.config.num_hidden_layers, tied)
    check_parts(ps, base_reader, readers, cfg.shared)
    rows = router_rows(cfg, net, tokenizer, prompts, negative)
    dtype = DTYPES[cfg.dtype] if cfg.dtype else net.get_input_embeddings().weight.dtype
    state = dict(tensors(ps, base_reader, readers, rows, cfg.shared, dtype))
    from transformers import MixtralForCausalLM

    config = mixtral_config(net.config, n, k, dtype)
    moe = MixtralForCausalLM(config).to(dtype)
    missing, unexpected = moe.load_state_dict(
        fused(state, config.num_hidden_layers, n), strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    moe.tie_weights()  # a tied head: the embeddings, as transformers' loader does
    return LocalModel(moe.eval(), tokenizer, name="moe")


moe_upcycle = register(
    "reuse", "moe_upcycle", shape=UPCYCLER, branch="mixture of experts", access=Access.WEIGHTS,
    config=MoeUpcycleConfig, example=_example, cli="lfm reuse moe PLAN.yaml --out DIR",
    paper="Komatsuzaki et al. 2023 (Sparse Upcycling), arXiv 2212.05055; mergekit-moe "
    "(Goddard et al. 2024, arXiv 2403.13257)",
)(moe_upcycle)  # fmt: skip


def _modules(models: Sequence[Any]) -> list[Any]:
    """The modules behind handles (a state dict or a path has no config: None)."""
    return [m if isinstance(m, nn.Module) else getattr(m, "model", None) for m in models]


# ---------------------------------------------------------------------------------------------
# On disk: a plan in, a Mixtral folder out, one tensor at a time.


def model_folder(name: str, root: Path, what: str) -> Path:
    """The safetensors folder of a plan's model: an asset name (`lfm models`; a GGUF asset's
    fp32 conversion, made once) or a folder, relative paths read from the plan's folder."""
    from lfm.assets.models import MODELS, convert_gguf

    if name in MODELS:
        if MODELS[name].kind != "causal-lm":
            raise ConfigError(f"{what}: {name} is a {MODELS[name].kind} model, not a causal LM")
        path = MODELS[name].locate()
        return convert_gguf(path) if path.suffix == ".gguf" else path
    path = Path(name).expanduser()
    path = path if path.is_absolute() or not (root / path).exists() else root / path
    if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
        known = ", ".join(n for n, m in MODELS.items() if m.kind == "causal-lm")
        raise ConfigError(f"{what}: {name} is neither a model folder (config.json and safetensors "
                          f"weights; relative to the plan's folder) nor an asset ({known})")  # fmt: skip
    return path


def plan_folders(plan: MoePlan, root: str | Path = ".") -> list[Path]:
    """The folders of a plan's base and experts, in order (`root`: the plan's folder)."""
    models = [plan.base_model] + [e.source_model for e in plan.experts]
    whats = ["base_model"] + [f"expert {i}" for i in range(len(plan.experts))]
    return [model_folder(m, Path(root), w) for m, w in zip(models, whats, strict=True)]


def _config(folder: Path, what: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{what}: cannot read {folder}/config.json ({e})") from None


@dataclass
class Upcycled:
    """What `upcycle_folder` wrote."""

    out: Path  # the Mixtral folder
    experts: int  # experts per layer
    experts_per_token: int  # top-k
    folders: list[Path]  # the folders read: the base's, then each expert's


def upcycle_folder(
    plan: MoePlan,
    out: str | Path,
    *,
    root: str | Path = ".",
    overwrite: bool = False,
    progress: bool = True,
    max_shard_size: int | str = "2GB",
) -> Upcycled:
    """Write the Mixtral folder a plan describes: weights streamed tensor by tensor, the routers
    from the base's hidden states (when the gate mode needs them), config and tokenizer.

    Args:
        plan: the validated plan (`MoePlan.load(path)`).
        out: the output folder; it appears in one rename when everything is written.
        root: the folder relative model paths are read from (the plan's).
        overwrite: replace an existing `out`.
        progress: a progress bar over the layers (stderr).
        max_shard_size: the largest output shard.
    """
    from tqdm.auto import tqdm

    from lfm.core.io import atomic_path, write_json
    from lfm.core.shards import ShardWriter, copy_side_files
    from lfm.reuse.engine import SafetensorsReader, parse_size

    out, cfg = Path(out), plan.config()
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; choose another folder or overwrite it")
    names = ["base_model"] + [f"expert {i}" for i in range(len(plan.experts))]
    folders = plan_folders(plan, root)
    configs = [_config(f, w) for f, w in zip(folders, names, strict=True)]
    check_configs(configs[0], configs[1:], names)
    base, experts = SafetensorsReader(folders[0]), [SafetensorsReader(f) for f in folders[1:]]
    n, layers = len(experts), configs[0].num_hidden_layers
    ps = parts(base.keys(), n, layers, base.tied)
    check_parts(ps, base, experts, cfg.shared)  # headers only: nothing is read before this
    dtype = DTYPES[cfg.dtype] if cfg.dtype else base.dtype("model.embed_tokens.weight")
    rows = _rows_on_disk(cfg, folders[0], configs[0], plan, progress)
    config = mixtral_config(configs[0], n, top_k(cfg, n), dtype)
    entries = [_entry(p, base, n, dtype) for p in ps]
    with atomic_path(out, replace=overwrite) as tmp:
        tmp.mkdir()
        with ShardWriter(tmp, entries, parse_size(max_shard_size)) as writer:
            groups = [[p for p in ps if p.layer == i] for i in [None, *range(layers)]]
            for group in tqdm(groups, desc="moe layers", unit="layer", disable=not progress):
                for name, t in tensors(group, base, experts, rows, cfg.shared, dtype):
                    writer.add(name, t)
            writer.close()
        copy_side_files(folders[0], tmp)  # tokenizer and generation config of the base
        (tmp / "lfm-source.json").unlink(missing_ok=True)  # the base's record, not the MoE's
        config.save_pretrained(tmp)
        write_json(tmp / "lfm_moe.json", {"plan": plan.to_dict(),
                                          "folders": [str(f) for f in folders]})  # fmt: skip
    return Upcycled(out, n, config.num_experts_per_tok, folders)


def _entry(p: Part, base: Reader, n_experts: int, dtype: torch.dtype) -> Any:
    """The header of one output tensor: floats in `dtype`, other tensors as the base stores them."""
    from lfm.core.shards import Entry

    if not p.src:
        return Entry(p.out, dtype, (n_experts, base.shape("model.embed_tokens.weight")[1]))
    kept = base.dtype(p.src)
    return Entry(p.out, dtype if kept.is_floating_point else kept, base.shape(p.src))


def _rows_on_disk(
    cfg: MoeUpcycleConfig, folder: Path, config: Any, plan: MoePlan, progress: bool
) -> Tensor:
    """The routers: random ones from the config alone, else from the base loaded to run the
    prompts (and freed)."""
    if cfg.gate_mode == "random":
        return random_rows(config.num_hidden_layers, len(plan.experts), config.hidden_size,
                           cfg.seed)  # fmt: skip
    from lfm.assets.models import load_model

    handle = load_model(folder, kind="causal-lm")
    positive, negative = plan.prompts()
    return router_rows(cfg, handle.model, handle.tokenizer, positive, negative, progress)


def routing_accuracy(handle: Any, prompts: Sequence[Sequence[str]]) -> float:
    """How often the routers of a Mixtral model put expert e first for the tokens of expert e's
    prompts: the mean over experts of the share of (token, layer) pairs routed to it first."""
    model, tok = module_of(handle, "routing_accuracy"), handle.tokenizer
    shares = []
    for e, texts in enumerate(prompts):
        hits = total = 0
        for text in texts:
            enc = tok(text, return_tensors="pt", return_special_tokens_mask=True)
            keep = enc["special_tokens_mask"][0] == 0
            with torch.no_grad():
                res = model(input_ids=enc["input_ids"].to(model.device), output_router_logits=True)
            for logits in res.router_logits:  # (tokens, experts) per layer
                hits += int((logits[keep.to(logits.device)].argmax(-1) == e).sum())
                total += int(keep.sum())
        shares.append(hits / max(total, 1))
    return sum(shares) / len(shares)
