"""Forward+backward throughput and peak memory of LeanAlbertForMaskedLM against transformers' AlbertForMaskedLM.

Run by hand from the repository root: `python tests/benchmarks/bench_model.py [--device cuda] [--rounds 7]`.
Prints, asserts nothing. Models are timed alternately in one process, so a busy machine slows all of them alike; on
CPU the time is the benchmarking thread's CPU time (robust to other processes sharing the cores), on CUDA wall time.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AlbertConfig, AlbertForMaskedLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from model import PRESETS, LeanAlbertForMaskedLM, load_config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size H of both models")
    parser.add_argument("--layers", type=int, default=6, help="depth (one shared group in both models)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1024, help="ALBERT's intermediate size I")
    parser.add_argument("--embedding", type=int, default=128, help="factorised embedding size E")
    parser.add_argument("--vocab", type=int, default=30000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--mask-prob", type=float, default=0.15, help="share of positions carrying an MLM label")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per model, alternating between models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak, to print MFU (H100 bf16: 989)")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: measure one model's CPU peak and exit
    return parser.parse_args()


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """The reference and LeanAlbert at (a) equal intermediate size and (b) equal feed-forward parameters."""
    shape = {
        "vocab_size": args.vocab,
        "embedding_size": args.embedding,
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "max_position_embeddings": args.seq,
    }
    equal_params = round(args.intermediate * 2 / 3)  # GEGLU's H -> 2I input projection holds 1.5x the weights
    builders = {
        "albert": lambda: AlbertForMaskedLM(AlbertConfig(intermediate_size=args.intermediate, **shape)),
        "lean (a) equal I": lambda: LeanAlbertForMaskedLM(
            load_config("tiny", intermediate_size=args.intermediate, **shape)
        ),
        "lean (b) equal FF params": lambda: LeanAlbertForMaskedLM(
            load_config("tiny", intermediate_size=equal_params, **shape)
        ),
        "lean (a) sparse_prediction": lambda: LeanAlbertForMaskedLM(
            load_config("tiny", intermediate_size=args.intermediate, sparse_prediction=True, **shape)
        ),
        "lean (b) sparse_prediction": lambda: LeanAlbertForMaskedLM(
            load_config("tiny", intermediate_size=equal_params, sparse_prediction=True, **shape)
        ),
    }
    if args.memory_of:
        return {args.memory_of: builders[args.memory_of]()}
    return {name: build() for name, build in builders.items()}


def make_batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, args.vocab, (args.batch, args.seq), generator=generator)
    labelled = torch.rand(args.batch, args.seq, generator=generator) < args.mask_prob
    return ids.to(args.device), torch.where(labelled, ids, -100).to(args.device)


def train_step(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, device: str) -> None:
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(ids, labels=labels).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def count_flops(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace) -> float:
    """Matmul FLOPs of one forward+backward as executed (sparse heads count less), attention included."""
    with FlopCounterMode(display=False) as counter:
        train_step(model, ids, labels, args.device)
    counted = {str(op) for op in counter.get_flop_counts()["Global"]}
    flops = counter.get_total_flops()
    if not any("attention" in op for op in counted):
        # FlopCounterMode has no formula for the CPU flash-attention kernel: add QK^T and AV, forward (2 matmuls of
        # 2*B*T*T*H) and backward (twice that), per layer.
        flops += 3 * args.layers * 2 * 2 * args.batch * args.seq * args.seq * args.hidden
    return flops


def elapsed(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, ids, labels, device)
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.thread_time()
    train_step(model, ids, labels, device)
    return time.thread_time() - start


def peak_memory_mib(name: str, model: torch.nn.Module, args: argparse.Namespace) -> float:
    """CUDA: peak allocated during a step. CPU: peak RSS growth of a fresh process running one step of this model."""
    if args.device == "cuda":
        ids, labels = make_batch(args)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        train_step(model, ids, labels, args.device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    command = [sys.executable, __file__, "--memory-of", name, *sys.argv[1:]]
    completed = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    return float(completed.stdout.strip().splitlines()[-1]) if completed.returncode == 0 else float("nan")


def measure_own_peak(args: argparse.Namespace) -> None:
    (model,) = build_models(args).values()
    ids, labels = make_batch(args)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets the peak RSS (VmHWM) to the current RSS: importing torch peaks higher
    before = _status_kib("VmRSS")
    train_step(model, ids, labels, "cpu")
    print((_status_kib("VmHWM") - before) / 1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))


def print_presets() -> None:
    print("\npreset        unique params   unrolled params")
    for name in PRESETS:
        with torch.device("meta"):
            model = LeanAlbertForMaskedLM(load_config(name))
        print(f"{name:12s} {model.num_parameters() / 1e6:12.1f}M {model.num_unrolled_parameters() / 1e6:15.1f}M")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        return measure_own_peak(args)
    models = {name: model.to(args.device).train() for name, model in build_models(args).items()}
    ids, labels = make_batch(args)
    flops = {name: count_flops(model, ids, labels, args) for name, model in models.items()}  # also warms up
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(elapsed(model, ids, labels, args.device))
    tokens = args.batch * args.seq
    print(
        f"device {args.device}, threads {args.threads}, H {args.hidden}, layers {args.layers}, heads {args.heads}, "
        f"I {args.intermediate}, E {args.embedding}, vocab {args.vocab}, batch {args.batch} x {args.seq} tokens, "
        f"{args.rounds} alternating rounds, median step time ({'CPU time' if args.device == 'cpu' else 'wall'})"
    )
    print(
        f"{'model':28s} {'params':>8s} {'ms/step':>9s} {'tokens/s':>9s} {'GFLOP/step':>11s} {'GFLOP/s':>8s} "
        f"{'x tok/s':>8s} {'x FLOP/s':>8s} {'peak MiB':>9s}" + ("  MFU" if args.peak_tflops else "")
    )
    reference = statistics.median(times["albert"])
    for name, model in models.items():
        step = statistics.median(times[name])
        achieved = flops[name] / step
        ratio_flops = achieved / (flops["albert"] / reference)
        mfu = f"  {achieved / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else ""
        print(
            f"{name:28s} {model.num_parameters() / 1e6:7.1f}M {step * 1e3:9.0f} {tokens / step:9.0f} "
            f"{flops[name] / 1e9:11.1f} {achieved / 1e9:8.1f} {reference / step:8.2f} {ratio_flops:8.2f} "
            f"{peak_memory_mib(name, model, args):9.0f}{mfu}"
        )
    print("(a) compares achieved FLOP/s at equal intermediate size (GEGLU does 1.5x the feed-forward work);")
    print("(b) compares tokens/s at equal feed-forward parameters. sparse_prediction decodes only labelled positions.")
    print_presets()


if __name__ == "__main__":
    main()
