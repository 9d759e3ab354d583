"""Weight-decay parameter groups, the optimizers, and the one masked step they all take."""
from collections.abc import Mapping

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.pytorch_utils import Conv1D

from .adafactor import Adafactor
from .muon import Muon

DECAYED = (nn.Linear, Conv1D)


def _is_norm(module: nn.Module) -> bool:
    # By type, not by parameter name: GPT-2 calls its norms ln_1/ln_2/ln_f, and
    # other models bring their own RMSNorm classes.
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay Linear/Conv1D weights; never biases, norms or embeddings.

    A weight tied to an embedding (GPT-2's LM head) is treated as the embedding.
    Weights of other module types decay if they are matrices.
    """
    no_decay, decay = set(), set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias" or _is_norm(module) or isinstance(module, nn.Embedding):
                no_decay.add(id(p))
            elif isinstance(module, DECAYED) or p.ndim >= 2:
                decay.add(id(p))
            else:
                no_decay.add(id(p))
    decay -= no_decay
    params = {id(p): p for p in model.parameters() if p.requires_grad}
    return [
        {"params": [p for i, p in params.items() if i in decay], "weight_decay": weight_decay},
        {"params": [p for i, p in params.items() if i not in decay], "weight_decay": 0.0},
    ]


def muon_split(model: nn.Module) -> tuple[set, set]:
    """(ids for Muon, ids for AdamW): Muon takes the hidden 2-D matrices, by module type.

    The matrices param_groups decays, less the output head (GPT-2's is tied to the
    token embedding and never decays; an untied head, as in Llama, is excluded here):
    the attention and MLP projections inside the blocks, whatever the model calls them.
    """
    decay = {id(p) for p in param_groups(model, 0.0)[0]["params"]}
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is not None:
        decay.discard(id(head.weight))
    muon = decay & {id(p) for p in model.parameters() if p.ndim == 2}
    return muon, {id(p) for p in model.parameters()} - muon


class _States(Mapping):
    """Read-only view of the inner optimizers' per-parameter state (for code that sizes or
    inspects it). Unlike a ChainMap over their defaultdicts, a lookup never adds an entry."""

    def __init__(self, inner: list):
        self.inner = inner

    def __getitem__(self, p):
        for o in self.inner:
            if p in o.state:
                return o.state[p]
        raise KeyError(p)

    def __iter__(self):
        return (p for o in self.inner for p in o.state)

    def __len__(self) -> int:
        return sum(len(o.state) for o in self.inner)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the hidden matrices and fused AdamW for the rest, as one optimizer.

    One object, so Accelerate prepares, saves and loads it like any other (one
    optimizer.bin) and the loop needs no second code path. `param_groups` are the inner
    optimizers' own group dicts, so the LR the loop writes reaches them; each group's
    `lr_scale` is its base LR over optim.lr, so both follow one schedule multiplier.
    """

    def __init__(self, muon: Muon | None, adamw: torch.optim.AdamW | None):
        self.inner = [o for o in (muon, adamw) if o is not None]
        super().__init__([p for o in self.inner for g in o.param_groups for p in g["params"]], {})
        self._link()

    def _link(self) -> None:
        # The inner optimizers' own objects, which their load_state_dict replaces.
        self.param_groups = [g for o in self.inner for g in o.param_groups]
        self.state = _States(self.inner)

    def step(self, closure=None, reject: torch.Tensor | None = None):
        loss = closure() if closure is not None else None
        for o in self.inner:
            step_unless(o, reject)
        return loss

    # The standard layout (`state` by parameter index in param_groups order, `param_groups` with
    # those indices), which torch.distributed.checkpoint reshards under FSDP2 as any optimizer's.
    state_dict = torch.optim.Optimizer.state_dict

    def load_state_dict(self, state_dict):
        if "inner" in state_dict:  # written before the standard layout: one state dict per inner optimizer
            for o, sd in zip(self.inner, state_dict["inner"], strict=True):
                o.load_state_dict(sd)
            self._link()
            return
        groups, states = list(state_dict["param_groups"]), state_dict["state"]
        for o in self.inner:  # each its own groups, renumbered from 0
            mine, groups = groups[:len(o.param_groups)], groups[len(o.param_groups):]
            index = {old: new for new, old in enumerate(i for g in mine for i in g["params"])}
            o.load_state_dict({"state": {index[i]: s for i, s in states.items() if i in index},
                               "param_groups": [{**g, "params": [index[i] for i in g["params"]]} for g in mine]})
        self._link()


def fused_attention_pieces(model: nn.Module) -> dict[int, int]:
    """{id(weight): k} for GPT-2's c_attn, k matrices side by side (Q, K, V; K, V in cross-attention)."""
    return {id(m.c_attn.weight): m.c_attn.weight.shape[1] // m.embed_dim
            for m in model.modules() if isinstance(m, GPT2Attention)}


def build_muon(model: nn.Module, cfg) -> MuonAdamW:
    muon_ids, _ = muon_split(model)
    params = [p for p in model.parameters() if p.requires_grad]
    muon = None
    if any(id(p) in muon_ids for p in params):
        # Each matrix's (or fused Q/K/V piece's) update is scaled by 0.2 * sqrt(max(rows, cols))
        # (muon.py): the same for GPT-2's Conv1D (in, out) and nn.Linear's (out, in).
        matrices = [p for p in params if id(p) in muon_ids]
        fused = fused_attention_pieces(model) if cfg.muon_split_qkv else {}
        muon = Muon(matrices, lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, momentum=cfg.momentum,
                    ns_steps=cfg.ns_steps, pieces={i: fused[id(p)] for i, p in enumerate(matrices) if id(p) in fused})
        muon.param_groups[0]["lr_scale"] = cfg.muon_lr / cfg.lr
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in muon_ids]}
              for g in param_groups(model, cfg.weight_decay)]
    groups = [g for g in groups if g["params"]]
    # (LoRA's adapters are all matrices: Muon may take every trainable parameter.)
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True) if groups else None
    return MuonAdamW(muon, adamw)


# Every optimizer here can skip an update on a device flag without a host sync (step_unless):
# fused Adam and AdamW take it as the kernel's found_inf, gptlab's own Muon and Adafactor as `reject`.
OPTIMIZERS = {  # config.Optimizer -> builder(model, optim config); "auto" picks one of these
    # fused: one kernel per parameter group for the whole update, on CPU and CUDA alike.
    "adamw": lambda model, cfg: torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                                  betas=tuple(cfg.betas), eps=cfg.eps, fused=True),
    "adam": lambda model, cfg: torch.optim.Adam(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                                betas=tuple(cfg.betas), eps=cfg.eps, fused=True),
    # An absolute, externally scheduled LR: the loop sets every group's lr each step.
    "adafactor": lambda model, cfg: Adafactor(param_groups(model, cfg.weight_decay), lr=cfg.lr),
    "muon": build_muon,
}


# SCRATCH_LR and SCRATCH_BETAS: AdamW's beside Muon (embeddings, head, norms), from the
# time-to-quality bench and the default run (bench/RESULTS.md, issue 28: modded-nanogpt's β1,
# a slower β2 than its 0.95); conf/optim/muon.yaml holds the same values.
# FINE_TUNING_LR: transformers' TrainingArguments default.
SCRATCH_LR, FINE_TUNING_LR = 3e-3, 5e-5
SCRATCH_BETAS, FINE_TUNING_BETAS = [0.8, 0.99], [0.9, 0.95]


def choose_optimizer(cfg):
    """optim=auto (the default) becomes Muon + AdamW from scratch, AdamW to fine-tune a pretrained
    model (full or LoRA); optim.lr null becomes 3e-3 from scratch, 5e-5 to fine-tune, and
    optim.betas null (0.8, 0.99) from scratch, (0.9, 0.95) to fine-tune. Returns a copy of cfg
    with these decided (the composed config is left as it was) and the line that says so, or
    None for a named optimizer."""
    oc, tuned = cfg.optim, cfg.model.pretrained_path
    name = oc.name if oc.name != "auto" else "adamw" if tuned else "muon"
    lr = oc.lr if oc.lr is not None else FINE_TUNING_LR if tuned else SCRATCH_LR
    betas = list(oc.betas) if oc.betas is not None else FINE_TUNING_BETAS if tuned else SCRATCH_BETAS
    cfg = OmegaConf.merge(cfg, {"optim": {"name": name, "lr": lr, "betas": betas}})
    if oc.name != "auto":
        return cfg, None
    why = (f"fine-tuning {tuned}{' with LoRA' if cfg.model.lora.r else ''}: Muon on weights trained with AdamW is "
           f"not the tested path" if tuned else "from scratch: it won the time-to-quality bench (docs/recipes-and-speed.md)")
    what = "AdamW" if tuned else f"Muon (muon_lr {oc.muon_lr:g}) + AdamW"
    return cfg, f"optim=auto: {what} at lr {lr:g}, betas ({betas[0]:g}, {betas[1]:g}), {why}; optim=NAME pins another"


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The optimizer config.Optimizer names (optim=auto resolved first, by choose_optimizer)."""
    return OPTIMIZERS[cfg.name](model, cfg)


def step_unless(optimizer, reject: torch.Tensor | None) -> None:
    """optimizer.step(), but where the 0-d bool tensor `reject` is true no update at all: the
    weights and the optimizer state (moments, step counts) stay as they were. The flag is
    never read back to the host, so a GPU need not wait for the step to finish.

    Fused Adam and AdamW take it as `found_inf`, the flag GradScaler hands their kernel;
    gptlab's Muon, Adafactor and MuonAdamW as `reject`.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer
    if reject is None:
        inner.step()
    elif isinstance(inner, (Muon, Adafactor, MuonAdamW)):
        inner.step(reject=reject)
    elif isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and inner.defaults.get("fused"):
        inner.found_inf, inner.grad_scale = reject.float(), None  # what Adam.step reads, as GradScaler sets them
        try:
            inner.step()
        finally:
            del inner.found_inf, inner.grad_scale
    else:
        raise TypeError(f"{type(inner).__name__} cannot skip an update on a device flag; build optimizers with "
                        "gptlab.optim.build_optimizer")


def clip_grad_norm(accelerator, model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients to `max_norm` in total; their norm before clipping, a plain device tensor
    (under FSDP2 the norm over every shard, on each process)."""
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def set_momentum(optimizer: torch.optim.Optimizer, momentum: float) -> None:
    """Muon's groups (the only ones with a `momentum`) at `momentum`."""
    for group in optimizer.param_groups:
        if "momentum" in group:
            group["momentum"] = momentum


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at `lr` times its own `lr_scale` (Muon's groups carry muon_lr / optim.lr)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
