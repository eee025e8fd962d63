"""`albert-data`: train a tokenizer, inspect masked batches, rebuild the bundled corpus.

User errors (missing corpus, bad tokenizer directory, non-UTF-8 files) end with one clear line and exit status 2.
"""

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from .collator import WholeWordMaskCollator
from .dataset import MLMDataset, stream_seed
from .sources import BUNDLED_CORPUS, CorpusError, DocumentStats, iter_documents, load_stream, resolve_corpus
from .tokenization import BUNDLED_TOKENIZER, TokenizerError, load_tokenizer, train_tokenizer

logger = logging.getLogger("albert-data")


def _add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corpus",
        default=None,
        help="text/json/jsonl/parquet/csv file (optionally .gz), directory, glob, or a datasets hub "
        "name; default: the bundled English + Russian corpus",
    )
    parser.add_argument("--text-column", default="text", help="column holding the text (json/parquet/csv/hub)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="albert-data", description=__doc__.splitlines()[0].replace("`", ""))
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and skipped documents")
    commands = parser.add_subparsers(dest="command", required=True)

    tokenizer = commands.add_parser("tokenizer", help="train a Unigram (SentencePiece-style) tokenizer")
    _add_corpus_arguments(tokenizer)
    tokenizer.add_argument("--vocab-size", type=int, default=32000, help="rounded up to a multiple of 64")
    tokenizer.add_argument("--out", required=True, type=Path, help="directory to write the tokenizer to")
    tokenizer.add_argument(
        "--max-chars",
        type=int,
        default=200_000_000,
        help="train on at most this many characters of the (shuffled) corpus",
    )
    tokenizer.add_argument("--model-max-length", type=int, default=512, help="recorded in tokenizer_config.json")

    inspect = commands.add_parser("inspect", help="print masked sequences and the measured mask rate")
    _add_corpus_arguments(inspect)
    inspect.add_argument("--tokenizer", default=None, help=f"tokenizer directory (default {BUNDLED_TOKENIZER})")
    inspect.add_argument("--max-length", type=int, default=128, help="tokens per sequence")
    inspect.add_argument("--show", type=int, default=3, help="sequences to print")
    inspect.add_argument("--batches", type=int, default=50, help="batches to measure the masking over")
    inspect.add_argument("--batch-size", type=int, default=16)
    inspect.add_argument("--mlm-probability", type=float, default=0.15)
    inspect.add_argument("--peer-id", default="inspect", help="the peer identity whose stream to show")

    build = commands.add_parser("build-corpus", help="rebuild the bundled corpus from Debian packages")
    build.add_argument("--out", type=Path, default=Path(BUNDLED_CORPUS), help="directory for the jsonl.gz shards")
    return parser


def run_tokenizer(args: argparse.Namespace) -> None:
    if args.out.exists() and any(args.out.iterdir()) and not (args.out / "tokenizer.json").exists():
        raise TokenizerError(f"{args.out} exists and holds other files; choose an empty or new directory")
    source = resolve_corpus(args.corpus, args.text_column)
    stats = DocumentStats()
    documents = _limit_chars(iter_documents(source, load_stream(source, args.seed), stats), args.max_chars)
    tokenizer = train_tokenizer(documents, args.vocab_size, args.out, model_max_length=args.model_max_length)
    print(
        f"trained on {stats.documents} documents ({stats.empty} empty, {stats.duplicates} duplicate skipped); "
        f"{len(tokenizer)} tokens; saved to {args.out}"
    )


def _limit_chars(documents, max_chars: int):
    total = 0
    for document in documents:
        yield document
        total += len(document)
        if total >= max_chars:
            return


def run_inspect(args: argparse.Namespace) -> None:
    from .inspection import LEGEND, inspect

    tokenizer = load_tokenizer(args.tokenizer)
    dataset = MLMDataset(
        args.corpus,
        tokenizer,
        max_length=args.max_length,
        seed=args.seed,
        peer_id=args.peer_id,
        text_column=args.text_column,
    )
    collator = WholeWordMaskCollator(
        tokenizer, mlm_probability=args.mlm_probability, seed=stream_seed(args.seed, args.peer_id)
    )
    shown, stats = inspect(dataset, collator, show=args.show, batches=args.batches, batch_size=args.batch_size)
    print(
        f"corpus {dataset.source.spec} ({len(dataset.source.data_files) or 'hub'} files), tokenizer "
        f"{args.tokenizer or BUNDLED_TOKENIZER} ({len(tokenizer)} tokens), max_length {args.max_length}"
    )
    print(LEGEND)
    for number, text in enumerate(shown, 1):
        print(f"\n--- sequence {number} ---\n{text}")
    print(f"\n--- masking over {args.batches} batches of {args.batch_size} ---\n{stats.report()}")


def run_build_corpus(args: argparse.Namespace) -> None:
    from .build_corpus import build_corpus

    for path in build_corpus(args.out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    commands = {"tokenizer": run_tokenizer, "inspect": run_inspect, "build-corpus": run_build_corpus}
    try:
        commands[args.command](args)
    except (CorpusError, TokenizerError, ValueError, OSError, RuntimeError, subprocess.SubprocessError) as error:
        if args.verbose:  # the one-line message is for users; -v keeps the traceback for bug reports
            logger.exception("albert-data %s failed", args.command)
        print(f"albert-data {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
