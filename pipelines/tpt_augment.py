"""TPT's thinking, written by a model (methods.md §3): every document gets a thinking trajectory
from a rollout engine, sampled by Ray actors, and the corpus is written back with a `thinking`
column that thinking-augmented pretraining reads.

    python pipelines/tpt_augment.py model=runs/ttt_pretrain/model max_docs=1000
    ray job submit --working-dir . -- python pipelines/tpt_augment.py model=/abs/path/model
    python pipelines/ttt_pretrain.py data=files data.source=runs/tpt_corpus/documents.jsonl \\
        data.augment=tpt data.thinking_field=thinking

The prompt is the document followed by the instruction to simulate an expert's in-depth thought
process about its complex, informative parts, then <think>; generation stops at </think>.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from training.cluster import start_ray  # noqa: E402
from training.config import CONFIG_DIR, TPTAugmentConfig  # noqa: E402
from training.data import build_embedded_corpus, clean_documents, load_documents  # noqa: E402
from training.run import parse_config_or_exit  # noqa: E402

INSTRUCTION = ("\n\nSimulate an expert's in-depth thought process as they analyse the text above, "
               "focusing on its complex and informative parts.\n")


class ThinkingWriter:
    """A Ray actor holding a model behind the torch engine."""

    def __init__(self, model_dir: str, tokenizer_dir: str, seed: int):
        import torch

        import models  # noqa: F401  (registers the Auto classes)
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        from rollout.torch_engine import TorchEngine

        torch.set_num_threads(1)
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
        self.engine = TorchEngine(AutoModelForCausalLM.from_pretrained(model_dir), seed=seed)
        self.think_open, self.think_close = self.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])

    def write(self, texts: list[str], max_tokens: int, temperature: float, top_p: float) -> list[str]:
        prompts = [self.tokenizer(t + INSTRUCTION, add_special_tokens=False)["input_ids"] + [self.think_open]
                   for t in texts]
        out = self.engine.generate(prompts, 1, max_tokens, temperature, top_p, stop=[self.think_close])
        return [self.tokenizer.decode(g[0].ids, skip_special_tokens=True).strip() for g in out]


def main(argv: list[str]) -> Path:
    cfg = parse_config_or_exit(TPTAugmentConfig, CONFIG_DIR / "tpt_augment.yaml", argv)
    model_dir = Path(cfg.model).resolve()
    tokenizer_dir = Path(cfg.tokenizer).resolve() if cfg.tokenizer else model_dir.parent / "tokenizer"
    for what, path in (("model", model_dir / "config.json"), ("tokenizer", tokenizer_dir / "tokenizer.json")):
        if not path.is_file():
            raise SystemExit(f"tpt_augment: no {what} at {path.parent} (expected {path.name}); set {what}=<dir>")
    d = cfg.data
    docs = (build_embedded_corpus(d.num_docs, cfg.seed, d.cache_dir) if d.source == "embedded"
            else load_documents(d.source, d.text_field, d.format))
    docs, skipped = clean_documents(docs, d.text_field)
    if cfg.max_docs:
        docs = docs.select(range(min(cfg.max_docs, len(docs))))

    started = start_ray(cfg.ray_address)
    try:
        writers = [ray.remote(num_cpus=0.5)(ThinkingWriter).remote(str(model_dir), str(tokenizer_dir), cfg.seed + i)
                   for i in range(cfg.num_workers)]
        texts = docs[d.text_field]
        batch = 8
        pending = [writers[i % len(writers)].write.remote(texts[s : s + batch], cfg.max_thinking_tokens,
                                                          cfg.temperature, cfg.top_p)
                   for i, s in enumerate(range(0, len(texts), batch))]
        thinking = []
        for ref in tqdm(pending, desc="writing thinking", unit="batch"):
            thinking.extend(ray.get(ref))
    finally:
        if started:
            ray.shutdown()
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    docs.add_column("thinking", thinking).to_json(str(out), lines=True)
    print(f"{len(thinking)} documents with thinking ({skipped} skipped as empty or malformed) written to {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
