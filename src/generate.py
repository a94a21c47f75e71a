"""Generate text from sentences with a trained SGDD checkpoint.

    uv run python src/generate.py --checkpoint checkpoints/quickstart/best "A sentence." "Another one."
    uv run python src/generate.py --checkpoint DIR --input sentences.txt --mode paraphrase --num-samples 3
    cat sentences.txt | uv run python src/generate.py --checkpoint DIR --plain
    uv run python src/generate.py --checkpoint DIR --mode interpolate "First sentence." "Second sentence."
    uv run python src/generate.py --checkpoint DIR --show-steps "Watch this sentence appear."

Modes: reconstruct (decode each sentence's meaning vector back into text), paraphrase (--num-samples stochastic
decodes per sentence), interpolate (exactly two sentences; --num-samples points between their latents).
Output: `input -> output` lines (or only the outputs with --plain); warnings go to stderr.
Sampling options left out keep the checkpoint's config.
"""

import argparse
import sys

from sgdd.cli import add_decoding_flags, decoding_overrides, run_main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sentences", nargs="*", help="input sentences (or --input FILE, or stdin)")
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder, e.g. checkpoints/<run>/best")
    ap.add_argument("--input", dest="input_path", help="UTF-8 text file, one sentence per line")
    ap.add_argument("--mode", choices=["reconstruct", "paraphrase", "interpolate"], default="reconstruct")
    ap.add_argument(
        "--num-samples", type=int, help="paraphrases per sentence / interpolation points (default 5)"
    )
    add_decoding_flags(ap)
    ap.add_argument(
        "--temperature", type=float, help="token sampling temperature (reconstruct: turns off greedy)"
    )
    ap.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = all)")
    ap.add_argument("--top-p", type=float, help="nucleus sampling mass (1 = off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--show-steps", action="store_true", help="print the text after every denoising step (_ = mask)"
    )
    ap.add_argument("--plain", action="store_true", help="print only the outputs, one per line")
    ap.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    args = ap.parse_args()

    from sgdd.cli import run_generate

    run_generate(
        args.checkpoint,
        args.sentences,
        args.input_path,
        mode=args.mode,
        num_samples=args.num_samples,
        seed=args.seed,
        show_steps=args.show_steps,
        plain=args.plain,
        device=args.device,
        stdin=sys.stdin,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        **decoding_overrides(args),
    )
    return 0


if __name__ == "__main__":
    run_main(main, log_stream=sys.stderr)
