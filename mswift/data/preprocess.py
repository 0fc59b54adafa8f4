"""`mswift preprocess`: tokenize text rows into megatron-core's indexed .bin/.idx format.

    mswift preprocess --input FILE [FILE ...] --tokenizer DIR --output-prefix PREFIX
                      [--text-key text] [--append-eod] [--workers N] [--on-bad-row skip]

One document per input row, in input order (files in the order given, folders in sorted
path order). Worker processes tokenize; the parent writes. PREFIX.bin / PREFIX.idx appear
only when complete: they are written under temporary names and renamed at the end.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from mswift.data.formats import BadRowError, row_to_example
from mswift.data.sources import RawRow, count_rows, iter_file_rows, list_data_files

_worker_tokenizer = None
_worker_options: dict = {}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mswift preprocess",
        description="Tokenize text rows into megatron-core indexed .bin/.idx files.")
    parser.add_argument("--input", nargs="+", required=True,
                        help="jsonl / json / parquet / csv files or folders of them")
    parser.add_argument("--tokenizer", required=True,
                        help="folder with a Hugging Face tokenizer (AutoTokenizer)")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--text-key", default="text", help="field holding the text (text)")
    parser.add_argument("--append-eod", action="store_true",
                        help="end every document with the tokenizer's eos token")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes (1)")
    parser.add_argument("--on-bad-row", choices=("error", "skip"), default="error",
                        help="stop at a bad row (error) or skip and count it (skip)")
    parser.add_argument("--chunk-size", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: expected at least 1")
    return args


def _load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    if not Path(folder).is_dir():
        raise ValueError(f"--tokenizer {folder}: not a folder")
    return AutoTokenizer.from_pretrained(folder)


def _init_worker(tokenizer_folder: str, text_key: str, append_eod: bool) -> None:
    global _worker_tokenizer, _worker_options
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker_tokenizer = _load_tokenizer(tokenizer_folder)
    _worker_options = {"text_key": text_key, "append_eod": append_eod}


def _tokenize_row(raw: RawRow) -> tuple[Optional[np.ndarray], Optional[str]]:
    """(token ids, None) or (None, "FILE:LINE: reason")."""
    try:
        example = row_to_example(raw.load(), "text", _worker_options["text_key"], raw.where)
    except BadRowError as error:
        return None, str(error)
    ids = _worker_tokenizer(example.text, add_special_tokens=False)["input_ids"]
    if _worker_options["append_eod"]:
        ids.append(_worker_tokenizer.eos_token_id)
    return np.asarray(ids, dtype=np.int64), None


def _iter_rows(files: list[Path]) -> Iterator[RawRow]:
    for file in files:
        yield from iter_file_rows(file)


def _tokenized(args, files: list[Path]) -> Iterator[tuple[Optional[np.ndarray], Optional[str]]]:
    init_args = (args.tokenizer, args.text_key, args.append_eod)
    if args.workers == 1:
        _init_worker(*init_args)
        yield from map(_tokenize_row, _iter_rows(files))
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(args.workers, initializer=_init_worker, initargs=init_args) as pool:
        yield from pool.imap(_tokenize_row, _iter_rows(files), chunksize=args.chunk_size)


def write_indexed_dataset(args: argparse.Namespace) -> dict:
    """Tokenize and write; returns counts. Raises ValueError on a bad row (unless skipped)
    or when no document is left."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    tokenizer = _load_tokenizer(args.tokenizer)
    if args.append_eod and tokenizer.eos_token_id is None:
        raise ValueError(f"--append-eod: the tokenizer in {args.tokenizer} has no eos token")
    files = [file for path in args.input for file in list_data_files(path)]
    total = sum(count_rows(file) for file in files)
    prefix = Path(args.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    temporary = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    bin_tmp, idx_tmp = Path(f"{temporary}.bin"), Path(f"{temporary}.idx")
    builder = IndexedDatasetBuilder(str(bin_tmp), dtype=DType.optimal_dtype(len(tokenizer)))
    counts = {"documents": 0, "tokens": 0, "bad_rows_skipped": 0}
    try:
        for tokens, problem in tqdm(_tokenized(args, files), total=total, unit="rows",
                                    desc="tokenizing", file=sys.stderr):
            if problem is not None:
                if args.on_bad_row == "error":
                    raise ValueError(problem)
                counts["bad_rows_skipped"] += 1
                continue
            builder.add_document(tokens, [len(tokens)])
            counts["documents"] += 1
            counts["tokens"] += len(tokens)
        if counts["documents"] == 0:
            raise ValueError(f"no documents left in {', '.join(args.input)} "
                             f"({counts['bad_rows_skipped']} bad rows skipped)")
        builder.finalize(str(idx_tmp))
        os.replace(bin_tmp, f"{prefix}.bin")
        os.replace(idx_tmp, f"{prefix}.idx")
    finally:
        builder.data_file.close()
        for leftover in (bin_tmp, idx_tmp):
            leftover.unlink(missing_ok=True)
    return counts


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        counts = write_indexed_dataset(args)
    except ValueError as error:
        print(f"mswift preprocess: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_prefix}.bin/.idx: {counts['documents']} documents, "
          f"{counts['tokens']} tokens, {counts['bad_rows_skipped']} bad rows skipped",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
