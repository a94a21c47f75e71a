"""Build the corpus, decoder vocabulary and embedding caches ahead of training (training builds them when missing).

    uv run python src/prepare_data.py --config configs/quickstart.yaml [section.key=value ...]

Prints sentence counts, vocabulary sizes (pruned decoder vocabulary vs the encoder tokenizer's) and the
encoding speed when something had to be encoded.
"""

import argparse

from sgdd.cli import add_config_args, run_main


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    args = parser.parse_args()

    from sgdd.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors surface before torch is imported
    from sgdd.embed_cache import prepare

    data = prepare(cfg)
    s = data.stats
    print(f"train sentences:   {len(data.train_sentences)}")
    print(f"valid sentences:   {len(data.valid_sentences)}")
    print(f"decoder vocab:     {s['vocab']['decoder']} (encoder tokenizer: {s['vocab']['tokenizer']})")
    print(f"vocab file:        {data.vocab_path}")
    print(
        f"embeddings:        train {tuple(data.train_emb.shape)}, valid {tuple(data.valid_emb.shape)} float32"
    )
    for split in ("train", "valid"):
        print(f"{split} cache:       {s[split]['cache']}")
    if s["encode_sentences_per_s"]:
        secs = s["train"]["seconds"] + s["valid"]["seconds"]
        print(
            f"encoded:           {s['encoded']} sentences in {secs:.1f} s ({s['encode_sentences_per_s']:.1f} sentences/s)"
        )
    else:
        print("encoded:           nothing (caches were valid)")
    return 0


if __name__ == "__main__":
    run_main(main)
