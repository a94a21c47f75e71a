"""Evaluate a trained SGDD checkpoint: decode held-out sentences through the sampler and score the text.

    uv run python src/evaluate.py --checkpoint checkpoints/quickstart/best
    uv run python src/evaluate.py --checkpoint DIR --data sentences.txt --num-samples 500 --rerank 8 \\
        --output results.json
    uv run python src/evaluate.py --checkpoint DIR --mode paraphrase --num-paraphrases 5 --temperature 0.8

Default data: the first --num-samples sentences of the checkpoint config's validation split. Prints the metrics
(BLEU / chrF / exact match / token F1 against the raw sentence and against its tokenizer round trip, the
cosine between input and output vectors, NLL per token), a by-length table, examples and the decoding speed;
--output writes them as JSON with the resolved config, the checkpoint and the settings.
"""

import argparse

from sgdd.cli import add_decoding_flags, decoding_overrides, run_main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder, e.g. checkpoints/<run>/best")
    ap.add_argument("--data", help="UTF-8 text file, one sentence per line (default: the validation split)")
    ap.add_argument("--num-samples", type=int, default=200, help="sentences to evaluate (0 = all)")
    ap.add_argument("--mode", choices=["reconstruct", "paraphrase"], default="reconstruct")
    add_decoding_flags(ap)
    ap.add_argument("--batch-size", type=int, help="sentences decoded per batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-paraphrases", type=int, default=5, help="paraphrase mode: outputs per sentence")
    ap.add_argument("--temperature", type=float, default=1.0, help="paraphrase mode: token temperature")
    ap.add_argument("--output", help="write the report as JSON here")
    ap.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    args = ap.parse_args()

    from sgdd.evaluation import evaluate_checkpoint

    evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        num_samples=args.num_samples,
        mode=args.mode,
        output=args.output,
        device=args.device,
        seed=args.seed,
        num_paraphrases=args.num_paraphrases,
        temperature=args.temperature,
        **decoding_overrides(args),
        batch_size=args.batch_size,
    )
    return 0


if __name__ == "__main__":
    run_main(main)
