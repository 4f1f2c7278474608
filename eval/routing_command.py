"""Routing analysis of a looped MoE model on a text: top-k agreement across loops, expert load, convergence.

Writes `routing.json` (see `modeling_looped_moe.eval.routing.summarize_routing` for its fields) and
PNG plots (`loop_agreement.png`, `expert_load.png`, `loop_convergence.png`) into `--output-dir`.

    looped-moe-eval routing --model DIR [--text FILE] --output-dir OUT
    looped-moe-eval routing --preset tiny --output-dir OUT      # randomly initialised, for a smoke run

The text defaults to Python's own documentation prose (`pydoc_data.topics`). The tokenizer is the model folder's
(or `--tokenizer DIR`); without one, a byte-level BPE is trained on the text when the vocabulary has room for it,
else UTF-8 bytes are used (meaningful only for models trained that way; fine for random models).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from modeling_looped_moe import LoopedMoeForCausalLM, load_preset
from modeling_looped_moe.data import python_docs_corpus, read_texts, train_bpe_tokenizer
from modeling_looped_moe.eval.routing import analyze_routing, plot_routing_report, text_to_blocks

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
BPE_MIN_VOCAB = 259  # 256 byte symbols + <pad>, <s>, </s>


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(prog="looped-moe-eval routing", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="folder of a saved LoopedMoeForCausalLM")
    source.add_argument("--preset", help="preset name or config path (random weights, seeded by --seed)")
    parser.add_argument("--text", nargs="*", default=None,
                        help="text files or folders of *.txt (default: Python docs corpus)")
    parser.add_argument("--output-dir", default="routing-analysis", help="where routing.json and the PNGs go")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder's)")
    parser.add_argument("--bpe-vocab-size", type=int, default=2048,
                        help="vocabulary of the fallback BPE trained on the text (capped at the model's)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens analysed (whole blocks)")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per row (default min(256, max pos.))")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plots", action="store_true", help="write routing.json only")
    return parser.parse_args(argv)


def load_tokenizer(args: argparse.Namespace, text: str, vocab_size: int):
    """The tokenizer to use (see the module docstring), or `None` for UTF-8 bytes; also a description."""
    folder = args.tokenizer or args.model
    if folder and any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder), f"from {folder}"
    if args.model:
        print(f"warning: no tokenizer in {folder}; the fallback tokenizer is not the model's", file=sys.stderr)
    bpe_vocab = min(args.bpe_vocab_size, vocab_size)
    if bpe_vocab >= BPE_MIN_VOCAB:
        return train_bpe_tokenizer(text, vocab_size=bpe_vocab), f"byte-level BPE ({bpe_vocab}) trained on the text"
    return None, "UTF-8 bytes"


def main(argv: list[str] | None = None) -> dict:
    """Run the analysis; returns the report written to `routing.json`."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.model:
        model = LoopedMoeForCausalLM.from_pretrained(args.model)
    else:
        model = LoopedMoeForCausalLM(load_preset(args.preset))
    config = model.config
    text = read_texts(args.text) if args.text else python_docs_corpus()
    tokenizer, tokenizer_desc = load_tokenizer(args, text, config.vocab_size)
    block_size = args.block_size or min(256, config.max_position_embeddings)
    input_ids = text_to_blocks(text, tokenizer, config.vocab_size, block_size, args.max_tokens)

    report = analyze_routing(model, input_ids, batch_size=args.batch_size)
    report["source"] = {
        "model": args.model, "preset": args.preset, "seed": None if args.model else args.seed,
        "text": args.text or "python_docs_corpus()", "tokenizer": tokenizer_desc,
        "blocks": int(input_ids.shape[0]), "block_size": block_size,
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "routing.json").write_text(json.dumps(report, indent=2) + "\n")
    plots = [] if args.no_plots else plot_routing_report(report, output_dir)

    print(f"{report['model']['layout']} | {report['num_tokens']} tokens | {tokenizer_desc}")
    for pair in report["loop_pairs"]:
        print(f"layer {pair['layer']} loops {pair['loop_a']}-{pair['loop_b']}: identical {pair['identical']:.3f}  "
              f"disjoint {pair['disjoint']:.3f}  mean overlap {pair['mean_overlap']:.3f}")
    for entry in report["loop_convergence"]:
        print(f"loop {entry['loop']}: JSD to final / ln 2 = {entry['jsd_to_final_mean']:.4f} "
              f"(std {entry['jsd_to_final_std']:.4f})")
    print(f"wrote {output_dir / 'routing.json'}" + "".join(f", {p.name}" for p in plots))
    return report
