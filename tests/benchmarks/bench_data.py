"""Tokens/s of the data pipeline (tokenize + pack + collate) next to what the `base` model consumes, on one core.

Run by hand: `python tests/benchmarks/bench_data.py [--seconds 20] [--corpus PATH]`. Prints, never asserts; the
target is a pipeline at least 20x faster than the model's forward+backward on the same core.
"""

import argparse
import os
import sys
import time
from pathlib import Path

# One core for everything, set before torch and the Rust tokenizer start their thread pools.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from data import MLMDataset, WholeWordMaskCollator, load_tokenizer, model_overrides_from_tokenizer

RUSLIT = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "ruslit"


def pipeline_rate(corpus: str | None, tokenizer, seconds: float, batch_size: int, max_length: int) -> dict:
    """Real (non-padding) tokens per second out of DataLoader(MLMDataset, WholeWordMaskCollator), after startup."""
    started = time.perf_counter()
    dataset = MLMDataset(corpus, tokenizer, max_length=max_length, seed=0, peer_id="bench")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=WholeWordMaskCollator(tokenizer))
    batches = iter(loader)
    next(batches)
    first_batch_s = time.perf_counter() - started
    tokens, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        tokens += int(next(batches)["attention_mask"].sum())
    return {"tokens_per_s": tokens / (time.perf_counter() - begin), "first_batch_s": first_batch_s}


def model_rate(tokenizer, preset: str, seconds: float, batch_size: int, max_length: int) -> float:
    """Tokens per second through forward + backward of the masked-LM model."""
    from model import LeanAlbertForMaskedLM, load_config

    model = LeanAlbertForMaskedLM(load_config(preset, **model_overrides_from_tokenizer(tokenizer)))
    batch = WholeWordMaskCollator(tokenizer)(
        next(
            iter(
                torch.utils.data.DataLoader(
                    MLMDataset(None, tokenizer, max_length=max_length), batch_size=batch_size, collate_fn=list
                )
            )
        )
    )
    model(**batch).loss.backward()  # warm-up: allocations, first-call overheads
    steps, begin = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - begin < seconds:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        steps += 1
    return steps * int(batch["attention_mask"].sum()) / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring time per figure")
    parser.add_argument(
        "--corpus", default=None, help="extra corpus to measure (default: ../shared ruslit if present)"
    )
    parser.add_argument("--preset", default="base", help="model preset whose consumption rate is the reference")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer()

    corpora = {"bundled": None}
    extra = args.corpus or (str(RUSLIT) if RUSLIT.is_dir() else None)
    if extra:
        corpora[Path(extra).name] = extra
    consumed = model_rate(tokenizer, args.preset, args.seconds, 8, args.max_length)
    print(f"model '{args.preset}' forward+backward, 1 core: {consumed:,.0f} tokens/s (batch 8 x {args.max_length})")
    for name, corpus in corpora.items():
        result = pipeline_rate(corpus, tokenizer, args.seconds, args.batch_size, args.max_length)
        print(
            f"pipeline on {name}, 1 core: {result['tokens_per_s']:,.0f} tokens/s "
            f"= {result['tokens_per_s'] / consumed:,.0f}x the model (target >= 20x); "
            f"first batch after {result['first_batch_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
