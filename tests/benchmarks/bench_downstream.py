"""Downstream check: is a swarm checkpoint worth fine-tuning? Author attribution on RusLit. Run by hand, never by CI.

Five authors, balanced, train and test passages from disjoint works. The checkpoint is fine-tuned with
AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True) and compared with the same shape from
random init, identical settings and seeds; prints test accuracy per seed and the mean.

    nice -n 10 python tests/benchmarks/bench_downstream.py --checkpoint RUN_DIR/checkpoints/epoch-000100
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
AUTHORS = ("Chekhov", "Dostoevsky", "Gogol", "Tolstoy", "Turgenev")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="A save_pretrained masked-LM directory.")
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared/corpora/ruslit")
    parser.add_argument("--train-per-author", type=int, default=300)
    parser.add_argument("--test-per-author", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--mode",
        choices=("fine-tune", "probe", "both"),
        default="both",
        help="fine-tune: train the whole model; probe: a linear classifier on frozen mean-pooled features.",
    )
    return parser.parse_args()


def passages(path: Path, min_chars: int = 200, max_chars: int = 1000) -> list[str]:
    """Paragraphs (one per line in RusLit) long enough to carry style; headers and titles are too short."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines())
    return [line[:max_chars] for line in lines if len(line) >= min_chars]


def build_task(args) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Balanced (text, label) pairs; every 4th work of an author (sorted by name) is a test work, never trained on."""
    rng = random.Random(0)
    train, test = [], []
    for label, author in enumerate(AUTHORS):
        works = sorted((args.corpus / "prose" / author).glob("*.txt"))
        if len(works) < 2:
            raise SystemExit(f"{args.corpus}/prose/{author} needs at least two works")
        test_works = works[::4]
        pools = {"train": [], "test": []}
        for work in works:
            pools["test" if work in test_works else "train"].extend(passages(work))
        for pool, wanted, out in (
            (pools["train"], args.train_per_author, train),
            (pools["test"], args.test_per_author, test),
        ):
            if len(pool) < wanted:
                raise SystemExit(f"{author}: only {len(pool)} passages for {wanted} wanted")
            out.extend((text, label) for text in rng.sample(pool, wanted))
    rng.shuffle(train)
    return train, test


def batches(pairs, tokenizer, args, shuffle_seed: int | None = None):
    order = list(range(len(pairs)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), args.batch_size):
        chunk = [pairs[i] for i in order[start : start + args.batch_size]]
        encoded = tokenizer(
            [text for text, _ in chunk], truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"
        )
        yield encoded, torch.tensor([label for _, label in chunk])


def fine_tune(model, train, test, tokenizer, args, seed: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    for epoch in range(args.epochs):
        model.train()
        for encoded, labels in batches(train, tokenizer, args, shuffle_seed=seed * 1000 + epoch):
            model(**encoded, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    correct = 0
    with torch.no_grad():
        for encoded, labels in batches(test, tokenizer, args):
            correct += int((model(**encoded).logits.argmax(-1) == labels).sum())
    return correct / len(test)


@torch.no_grad()
def features(model, pairs, tokenizer, args) -> torch.Tensor:
    """Mean-pooled final hidden states of a frozen encoder, one row per passage."""
    model.eval()
    rows = []
    for encoded, _ in batches(pairs, tokenizer, args):
        hidden = model.lean_albert(encoded["input_ids"], encoded["attention_mask"]).last_hidden_state
        weights = encoded["attention_mask"].unsqueeze(-1).float()
        rows.append((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0))
    return torch.cat(rows)


def linear_probe(model, train, test, tokenizer, args, seed: int) -> float:
    """Logistic regression on frozen features: what the encoder knows, without fine-tuning's own learning."""
    x_train, x_test = features(model, train, tokenizer, args), features(model, test, tokenizer, args)
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)  # standardise: the two encoders' scales differ
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train, y_test = torch.tensor([y for _, y in train]), torch.tensor([y for _, y in test])
    torch.manual_seed(seed)
    classifier = torch.nn.Linear(x_train.shape[1], len(AUTHORS))
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(300):  # full batch: a few thousand rows of a few hundred features
        loss = torch.nn.functional.cross_entropy(classifier(x_train), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float((classifier(x_test).argmax(-1) == y_test).float().mean())


def load(name: str, args):
    if name == "pretrained":
        return AutoModelForSequenceClassification.from_pretrained(
            args.checkpoint, trust_remote_code=True, num_labels=len(AUTHORS)
        )
    config = AutoConfig.from_pretrained(args.checkpoint, trust_remote_code=True, num_labels=len(AUTHORS))
    return AutoModelForSequenceClassification.from_config(config, trust_remote_code=True)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, trust_remote_code=True)
    train, test = build_task(args)
    print(f"{len(AUTHORS)} authors, {len(train)} train / {len(test)} test passages (disjoint works)", flush=True)
    methods = {"probe": linear_probe, "fine-tune": fine_tune}
    if args.mode != "both":
        methods = {args.mode: methods[args.mode]}
    results = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for method, evaluate in methods.items():
            for name in ("pretrained", "random init"):
                started = time.time()
                torch.manual_seed(seed)  # the same encoder (random init) and classifier-head init for both
                accuracy = evaluate(load(name, args), train, test, tokenizer, args, seed)
                results.setdefault((method, name), []).append(accuracy)
                print(
                    f"  seed {seed} {method:<9} {name:<12} accuracy {accuracy:.3f} ({time.time() - started:.0f} s)",
                    flush=True,
                )
    print(f"\n{'method':<9} {'model':<12} {'mean acc':>8}  per seed   (chance {1 / len(AUTHORS):.2f})")
    for (method, name), accuracies in results.items():
        print(
            f"{method:<9} {name:<12} {statistics.mean(accuracies):>8.3f}  {' '.join(f'{a:.3f}' for a in accuracies)}"
        )


if __name__ == "__main__":
    sys.exit(main())
