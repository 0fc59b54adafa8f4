"""Before and after fine-tuning, side by side: held-out eval loss and replies to held-out questions.

    python examples/smollm2/compare.py runs/smollm2

reads OUT/sft/metrics.jsonl (the eval loss at step 0, before training, and at the last eval),
then asks the base model (OUT/hf) and the fine-tuned one (OUT/sft/hf) the same questions from
OUT/chat_eval.jsonl -- conversations held out of training, none of whose questions is asked in
OUT/chat.jsonl -- and prints each question, the corpus's answer and both replies (greedy).
"""
import argparse
import json
import sys
from pathlib import Path

from chat import load_chat_model, reply_with


def eval_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, eval loss) of every eval in the run's metrics.jsonl, in order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: not found (the run's save folder has it)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(row["step"], row["eval_loss"]) for row in rows if "eval_loss" in row]


def held_out_questions(path: Path, count: int) -> list[tuple[str, str]]:
    """``count`` (question, answer) pairs spread over the held-out conversations, prose only
    (the code answers are too long to read side by side)."""
    if not path.is_file():
        raise ValueError(f"{path}: not found (written by prepare.py)")
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        if "```" not in messages[1]["content"]:
            pairs.append((messages[0]["content"], messages[1]["content"]))
    if not pairs:
        raise ValueError(f"{path}: no held-out conversation without code")
    step = max(1, len(pairs) // count)
    return pairs[step // 2::step][:count]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="prepare.py's output folder (with hf/ and sft/)")
    parser.add_argument("--questions", type=int, default=3, help="held-out questions to ask")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    base, tuned = args.out / "hf", args.out / "sft" / "hf"
    try:
        losses = eval_losses(args.out / "sft")
        questions = held_out_questions(args.out / "chat_eval.jsonl", args.questions)
        for folder in (base, tuned):
            if not (folder / "config.json").is_file():
                raise ValueError(f"{folder}: no config.json (expected an HF model folder)")
    except ValueError as error:
        print(f"compare.py: {error}", file=sys.stderr)
        return 1
    if len(losses) >= 2:
        (first_step, first), (last_step, last) = losses[0], losses[-1]
        print(f"held-out eval loss: {first:.4f} at step {first_step} (before training) -> "
              f"{last:.4f} at step {last_step} ({last - first:+.4f})")
    models = {name: load_chat_model(folder) for name, folder in
              (("base", base), ("fine-tuned", tuned))}
    for question, answer in questions:
        print(f"\nheld-out question: {question}\n  corpus answer : {answer}")
        for name, model in models.items():
            print(f"  {name:<14}: {reply_with(model, question, args.max_new_tokens)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
