"""What Muon's orthogonalisation costs per step on N processes: every process orthogonalising every
matrix (DDP: the matrices are whole everywhere) against gptlab's FSDP2 path (each matrix gathered
on its owner, orthogonalised there, scattered back as row shards).

    python bench/muon_dist.py                      # GPT-2 124M's 48 block matrices, 2 CPU processes
    python bench/muon_dist.py --layers 2 --processes 2

Both arms run gptlab.muon.Muon.step (Newton–Schulz in bf16, 5 steps) on the same matrices with
random gradients; the FSDP2 arm on DTensors sharded by rows as fully_shard shards them. The
time is the median step after one warm-up, on rank 0. Raw results: bench/results/muon_dist.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import ROOT, add_json_option, free_port, write_json


def gpt2_matrices(layers: int, width: int = 768):
    """GPT-2's Conv1D weights in one block, (in, out): c_attn, attn c_proj, c_fc, mlp c_proj."""
    return [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)] * layers


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from gptlab.muon import Muon

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    shapes = gpt2_matrices(args.layers)
    full = [torch.randn(*s, generator=g) * 0.02 for s in shapes]
    grads = [torch.randn(*s, generator=g) for s in shapes]
    results = {}
    for arm in ("every process, whole matrices", "FSDP2: owner gathers, orthogonalises, scatters"):
        if arm.startswith("every"):
            params = [torch.nn.Parameter(w.clone()) for w in full]
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
        else:
            params = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in full]
            for p, gr in zip(params, grads):
                p.grad = distribute_tensor(gr.clone(), mesh, [Shard(0)])
        opt = Muon(params, lr=2e-3, weight_decay=0.1, momentum=0.95, ns_steps=5)
        times = []
        for _ in range(args.steps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        results[arm] = statistics.median(times[1:])
    if rank == 0:
        print("RESULT " + json.dumps({"processes": world, "matrices": len(shapes), "threads": args.threads,
                                      "seconds_per_step": results}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--steps", type=int, default=3)
    add_json_option(ap, "muon_dist")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
           "--master_port", str(free_port()), __file__, "--worker", "--layers", str(args.layers), "--threads",
           str(args.threads), "--steps", str(args.steps)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(proc.stderr[-3000:])
    result = json.loads(line[7:])
    write_json(args.json, result)
    base = result["seconds_per_step"]["every process, whole matrices"]
    print(f"\n| Muon step, {result['matrices']} matrices, {result['processes']} processes | seconds per step | x |")
    print("|---|---|---|")
    for arm, s in result["seconds_per_step"].items():
        print(f"| {arm} | {s:.3f} | {s / base:.2f} |")


if __name__ == "__main__":
    main()
