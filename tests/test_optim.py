import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gptlab.optim import param_groups


def test_weight_decay_groups_by_module_type():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}  # the tied LM head is named wte
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    # GPT-2's norms are ln_1/ln_2/ln_f: a "LayerNorm.weight" name rule misses all of them.
    for n in ("transformer.h.0.ln_1.weight", "transformer.h.1.ln_2.weight", "transformer.ln_f.weight",
              "transformer.h.0.attn.c_attn.bias", "transformer.wte.weight", "transformer.wpe.weight"):
        assert n in not_decayed, n
    for n in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
              "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"):
        assert n in decayed, n
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique
    assert len(decay["params"]) == 2 * 4  # four matrices per block


# --- every optimizer can skip an update on a device flag (optim.step_unless) ---

def _model(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _steps(model, opt, n, reject=lambda i: None):
    """n updates on fixed batches; opt is stepped through step_unless with reject(i)."""
    from gptlab.optim import step_unless

    g = torch.Generator().manual_seed(1)
    for i in range(n):
        x = torch.randint(0, 64, (2, 16), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        step_unless(opt, reject(i))
        opt.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _state(opt):
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in opt.state.values()]


def test_muon_is_torchs_muon():
    """gptlab's Muon (for its masked step, and FSDP2) computes what torch.optim.Muon does, to the bit."""
    from gptlab.muon import Muon

    results = []
    for make in (lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.1, momentum=0.95, ns_steps=5,
                                             adjust_lr_fn="match_rms_adamw"),
                 lambda ps: Muon(ps, lr=0.02, weight_decay=0.1, momentum=0.95, ns_steps=5, ns_dtype=torch.bfloat16)):
        model = _model()
        mats = [p for n, p in model.named_parameters() if p.ndim == 2 and ".h." in n]
        opt = make(mats)
        results.append(_steps(model, opt, 4))
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


class _MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """The dtypes of every matmul run under it."""

    MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
               torch.ops.aten.baddbmm.default}

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.MATMULS:
            self.dtypes.add(args[-1].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("native", [True, False])
def test_muon_orthogonalises_in_fp32_where_bf16_is_emulated(monkeypatch, native):
    """Muon's Newton-Schulz runs in bf16 (torch's choice) only where bf16 matmul is native: on a CPU
    without AVX512-BF16/AMX it is emulated, 33-37x slower than fp32 (bench/ns_precision.py)."""
    from gptlab.muon import Muon, orthogonalise

    monkeypatch.setattr("gptlab.distributed.fast_cpu_precision", lambda precision: native)
    model = _model()
    mats = [p for n, p in model.named_parameters() if p.ndim == 2 and ".h." in n]
    before = [p.detach().clone() for p in mats]
    opt = Muon(mats, lr=0.02, weight_decay=0.0, momentum=0.0, ns_steps=5)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=x, labels=x).loss.backward()
    with _MatmulDtypes() as seen:
        opt.step()
    dtype = torch.bfloat16 if native else torch.float32
    assert seen.dtypes == {dtype}
    for p, w in zip(mats, before):  # momentum 0, no decay: the step is the orthogonalised gradient, scaled
        update = orthogonalise(p.grad, 5, dtype).to(w.dtype) * 0.02 * 0.2 * max(p.shape) ** 0.5
        torch.testing.assert_close(p.detach(), w - update, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (3, 16, 48)])
def test_wide_matrices_orthogonalise_through_their_gram_matrix_in_fp32(shape):
    """In fp32 a matrix at least twice as wide as tall (either way round) runs Newton–Schulz on its
    Gram matrix: the textbook iteration's result (in fp64) in 4·m²·n + 34·m³ FLOPs for 5 steps,
    against 5·(4·m²·n + 2·m³). bf16 keeps the textbook iteration, which the Gram one is unstable in."""
    from torch.utils.flop_counter import FlopCounterMode

    from gptlab.muon import NS_COEFFICIENTS, orthogonalise

    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x = (g if shape[-2] < shape[-1] else g.mT).double()
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    want = x if shape[-2] < shape[-1] else x.mT
    count = shape[0] if len(shape) == 3 else 1
    m, n = min(shape[-2:]), max(shape[-2:])
    for dtype, flops in ((torch.float32, 4 * m * m * n + 34 * m ** 3), (torch.bfloat16, 5 * (4 * m * m * n + 2 * m ** 3))):
        with FlopCounterMode(display=False) as counted:
            orthogonalise(g, 5, dtype)
        assert counted.get_total_flops() == count * flops
    torch.testing.assert_close(orthogonalise(g, 5, torch.float32).double(), want, rtol=0, atol=1e-5)


def test_adafactor_is_the_hf_trainers():
    """Seed 004's Adafactor: transformers' with an external lr (no relative step, no parameter scale),
    factored for matrices, full for vectors, with weight decay. (Not on GPT-2: its key biases get
    exactly zero gradients, which Adafactor's rsqrt turns into full-size updates from any rounding.)"""
    from transformers.optimization import Adafactor as HFAdafactor

    from gptlab.adafactor import Adafactor

    weights = []
    for make in (lambda ps: HFAdafactor(ps, lr=1e-2, weight_decay=0.01, relative_step=False, scale_parameter=False,
                                        warmup_init=False),
                 lambda ps: Adafactor(ps, lr=1e-2, weight_decay=0.01)):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        opt, g = make(list(net.parameters())), torch.Generator().manual_seed(1)
        for _ in range(6):
            x = torch.randn(32, 8, generator=g)
            net(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        weights.append(net.state_dict())
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", ["adamw", "adam", "adafactor", "muon"])
def test_a_rejected_step_leaves_weights_and_state_as_they_were(name):
    from omegaconf import OmegaConf

    from gptlab.optim import build_optimizer

    cfg = OmegaConf.create({"name": name, "lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8,
                            "muon_lr": 2e-2, "muon_weight_decay": 0.1, "momentum": 0.95, "ns_steps": 5, "muon_split_qkv": True})
    runs = []
    for rejected in (set(), {1, 2}):  # steps 1 and 2 rejected: the run is then steps 0 and 3
        model = _model()
        opt = build_optimizer(model, cfg)
        weights = _steps(model, opt, 4, lambda i: torch.tensor(i in rejected))
        runs.append((weights, _state(opt)))
    model = _model()
    opt = build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(4)]
    for x in (batches[0], batches[3]):  # the same two updates, nothing between them
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    got, state = runs[1]
    for k in want:
        assert torch.equal(got[k], want[k]), k
    for a, b in zip(state, _state(opt)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
    assert any(not torch.equal(runs[0][0][k], got[k]) for k in got)  # rejecting changed the outcome


SHARDED_NS = """
import os, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
import gptlab.distributed
gptlab.distributed.fast_cpu_precision = lambda precision: False  # a CPU that emulates bf16
from gptlab.muon import Muon

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
w, g = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), torch.randn(16, 8)
p = torch.nn.Parameter(distribute_tensor(w.clone(), init_device_mesh("cpu", (1,)), [Shard(0)]))
p.grad = distribute_tensor(g.clone(), p.device_mesh, [Shard(0)])
opt = Muon([p], lr=0.02, weight_decay=0.0, momentum=0.0, ns_steps=5)
opt.step()
x = g.mT / g.norm()  # Newton-Schulz in fp32, written out: Keller Jordan's quintic, 5 iterations
for _ in range(5):
    gram = x @ x.mT
    x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
update = (w - p.full_tensor()) / (0.02 * 0.2 * 16 ** 0.5)
torch.testing.assert_close(update, x.mT, rtol=0, atol=1e-5)  # bf16 is off by ~1e-2
# A fused Q/K/V matrix (in, 3·out) goes through its owner as three matrices, scaled as (8, 8) ones.
from gptlab.muon import orthogonalise
w, g = torch.zeros(8, 24), torch.randn(8, 24, generator=torch.Generator().manual_seed(1))
p = torch.nn.Parameter(distribute_tensor(w.clone(), init_device_mesh("cpu", (1,)), [Shard(0)]))
p.grad = distribute_tensor(g.clone(), p.device_mesh, [Shard(0)])
Muon([p], lr=0.02, weight_decay=0.0, momentum=0.0, ns_steps=5, pieces={0: 3}).step()
want = torch.cat([orthogonalise(piece, 5, torch.float32) for piece in g.chunk(3, dim=1)], dim=1)
torch.testing.assert_close(-p.full_tensor() / (0.02 * 0.2 * 8 ** 0.5), want, rtol=0, atol=1e-6)
dist.destroy_process_group()
print("ok")
"""


def test_sharded_muon_orthogonalises_in_fp32_where_bf16_is_emulated():
    """FSDP2's path (a row-sharded matrix gathered on its owner) takes the same precision as the
    plain one. Its own process: a process group of one, a 1-D mesh, Shard(0)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, free_port

    proc = subprocess.run([sys.executable, "-c", SHARDED_NS], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PORT": str(free_port())})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
