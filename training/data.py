"""Documents -> packed token windows.

Documents come from the embedded corpus (made offline from reasoning-gym) or from local files
(json, jsonl, parquet, text). They are cleaned, split into train / held-out by document,
tokenized, and packed into one stream with EOS after each document; the stream is cut into
windows of seq_len + 1 tokens (inputs and shifted targets) that WindowLoader serves in a
resumable shuffled order.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, load_dataset, load_from_disk
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from training import arithmetic
from training.config import DEFAULT_TASKS, ConfigError, DataConfig
from training.tokenizer import load_or_train_tokenizer, token_byte_lengths

# Bump when the document format or the generation recipe changes, so old caches are not reused.
CORPUS_VERSION = 2

DATA_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
ALLOWED_FORMATS = ("auto", "json", "jsonl", "parquet", "text")


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from `parts` that is the same in every process (unlike hash())."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---- the embedded corpus -------------------------------------------------------------------------


def format_document(question: str, solution: str, answer: str) -> str:
    """The one document format: question, worked solution (when there is one), answer."""
    lines = [f"Question: {question.strip()}"]
    if solution.strip():
        lines.append(f"Solution: {solution.strip()}")
    lines.append(f"Answer: {answer.strip()}")
    return "\n".join(lines)


def _worked_solution(item: dict) -> str:
    cot = item["metadata"].get("answer_cot", "")
    # GSM8K-style solutions end with "#### <answer>": drop it, the answer follows on its own line.
    return re.sub(r"\n?####[^\n]*\s*$", "", cot).strip()


def _task_counts(num_docs: int, tasks: Sequence[str]) -> dict[str, int]:
    """gsm_symbolic gets half the documents (when there are other tasks), the rest share equally."""
    weights = [max(len(tasks) - 1, 1) if t == "gsm_symbolic" else 1 for t in tasks]
    counts = [num_docs * w // sum(weights) for w in weights]
    for i in range(num_docs - sum(counts)):  # the remainder goes to the first tasks
        counts[i] += 1
    return dict(zip(tasks, counts))


def build_embedded_corpus(
    num_docs: int, seed: int, cache_dir: str | Path, tasks: Sequence[str] = DEFAULT_TASKS
) -> Dataset:
    """Generate (or load from cache) `num_docs` documents of reasoning-gym tasks (and of
    training/arithmetic.py's worked_arithmetic).

    Columns: id, task, question, solution, answer, text. Offline and deterministic in
    (num_docs, seed, tasks); cached under cache_dir.
    """
    import reasoning_gym  # slow to import; only the embedded corpus needs it

    tasks = tuple(tasks)
    if num_docs <= 0 or not tasks:
        raise ValueError(f"need num_docs > 0 and at least one task, got {num_docs=} {tasks=}")
    cache_dir = Path(cache_dir)
    path = cache_dir / f"reasoning_gym-v{CORPUS_VERSION}-n{num_docs}-s{seed}-{'+'.join(tasks)}"
    if path.is_dir():
        return load_from_disk(str(path))

    rows: dict[str, list[str]] = {k: [] for k in ("id", "task", "question", "solution", "answer", "text")}
    with tqdm(total=num_docs, desc="reasoning-gym corpus", unit="doc") as bar:
        for task, count in _task_counts(num_docs, tasks).items():
            if count == 0:
                continue
            # A seed per task: tasks seeded alike draw the same numbers (chain_sum and products
            # would both ask about 60 and 93).
            task_seed = stable_seed(seed, task) % 2**31
            if task == arithmetic.TASK:
                items = arithmetic.worked_arithmetic(count, task_seed)
            else:
                generator = reasoning_gym.create_dataset(task, size=count, seed=task_seed)
                items = ({"question": item["question"], "solution": _worked_solution(item), "answer": item["answer"]}
                         for item in (generator[i] for i in range(count)))
            for i, item in enumerate(items):
                rows["id"].append(f"{task}:{seed}:{i}")
                rows["task"].append(task)
                rows["question"].append(item["question"].strip())
                rows["solution"].append(item["solution"])
                rows["answer"].append(str(item["answer"]).strip())
                rows["text"].append(format_document(item["question"], item["solution"], str(item["answer"])))
                bar.update()

    # Write beside the final folder and rename, so an interrupted run leaves no partial cache.
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=f".{path.name}.tmp-")
    try:
        Dataset.from_dict(rows).save_to_disk(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any folder
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.is_dir():  # not a lost race with another writer: a real error
            raise
    return load_from_disk(str(path))


# ---- user corpora ---------------------------------------------------------------------------------


def _data_files(source: str) -> list[str]:
    p = Path(source)
    if p.is_dir():
        files = [str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")]
    elif glob.has_magic(source):
        files = [f for f in glob.glob(source, recursive=True) if Path(f).is_file()]
    else:
        files = [source] if p.is_file() else []
    if not files:
        raise FileNotFoundError(f"no data files found at {source!r}")
    return sorted(files)


def load_documents(source: str, text_field: str = "text", data_format: str = "auto", **load_kwargs) -> Dataset:
    """Load a local corpus: a file, a directory or a glob of json / jsonl / parquet / text files.

    With data_format="auto" the format comes from the file extensions. Text files give one
    document per line (datasets' default; pass sample_by="paragraph" or "document" to change it).
    Adds a stable `id` column ("<source name>:<row>") when there is none.
    """
    if data_format not in ALLOWED_FORMATS:
        raise ValueError(f"unknown data_format {data_format!r}; allowed: {', '.join(ALLOWED_FORMATS)}")
    files = _data_files(source)
    if data_format == "auto":
        known = [f for f in files if Path(f).suffix.lower() in DATA_FORMATS]
        formats = {DATA_FORMATS[Path(f).suffix.lower()] for f in known}
        if len(formats) != 1:
            raise ValueError(
                f"cannot infer one data format from the files at {source!r} (found {sorted(formats) or 'none'}); "
                f"known extensions: {', '.join(DATA_FORMATS)}; or set data_format to one of "
                f"{', '.join(ALLOWED_FORMATS[1:])}"
            )
        files, builder = known, formats.pop()
    else:
        builder = "json" if data_format == "jsonl" else data_format

    ds = load_dataset(builder, data_files=files, split="train", **load_kwargs)
    if text_field not in ds.column_names:
        raise KeyError(f"text field {text_field!r} not in {source!r}; columns present: {ds.column_names}")
    if "id" not in ds.column_names:
        name = Path(source.rstrip("/")).name
        ds = ds.add_column("id", [f"{name}:{i}" for i in range(len(ds))])
    return ds


def clean_documents(ds: Dataset, text_field: str = "text") -> tuple[Dataset, int]:
    """Drop documents whose text is missing, not a string, or only whitespace.

    Returns (kept, number skipped); the count feeds the data/docs_skipped metric.
    """
    kept = ds.filter(
        lambda texts: [isinstance(t, str) and t.strip() != "" for t in texts],
        input_columns=text_field,
        batched=True,
    )
    return kept, len(ds) - len(kept)


def split_documents(
    ds: Dataset, heldout_fraction: float, seed: int, text_field: str = "text"
) -> tuple[Dataset, Dataset]:
    """Split into (train, held-out) by document, deterministically in `seed`.

    Documents are ranked by a hash of (seed, text), so identical texts (a generator can repeat a
    question) always land on the same side and nothing held out is ever trained on. Held-out is
    non-empty whenever heldout_fraction > 0 and there are at least two distinct texts.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    keys = [stable_seed(seed, t) for t in ds[text_field]]
    distinct = sorted(set(keys))
    n_heldout = round(heldout_fraction * len(distinct))
    if heldout_fraction > 0:
        n_heldout = min(max(n_heldout, 1), len(distinct) - 1)
    heldout_keys = set(distinct[:n_heldout])
    is_heldout = [k in heldout_keys for k in keys]
    train = ds.select([i for i, h in enumerate(is_heldout) if not h])
    heldout = ds.select([i for i, h in enumerate(is_heldout) if h])
    return train, heldout


# ---- tokens and windows ---------------------------------------------------------------------------


def tokenize_documents(tokenizer, texts: list[str], batch_size: int = 1000) -> list[list[int]]:
    """Encode texts in batches (the fast tokenizer parallelises within a batch); no specials added."""
    ids: list[list[int]] = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="tokenizing", unit="batch", disable=len(starts) <= 1):
        batch = texts[start : start + batch_size]
        ids.extend(tokenizer(batch, add_special_tokens=False)["input_ids"])
    return ids


def pack_documents(token_lists: Iterable[list[int]], eos_id: int, seq_len: int) -> torch.LongTensor:
    """Concatenate documents (EOS after each) and cut windows of seq_len + 1 tokens, stride seq_len.

    Consecutive windows share one boundary token, so every stream token after the first is a
    prediction target exactly once. The tail that does not fill a window is dropped.
    Returns [num_windows, seq_len + 1].
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got seq_len={seq_len}")
    docs = (chain(ids, (eos_id,)) for ids in token_lists if len(ids) > 0)
    stream = torch.from_numpy(np.fromiter(chain.from_iterable(docs), dtype=np.int64))
    if len(stream) < seq_len + 1:
        raise ValueError(
            f"corpus too small: {len(stream)} tokens (EOS included), need at least {seq_len + 1} "
            f"for one window of seq_len={seq_len}"
        )
    return stream.unfold(0, seq_len + 1, seq_len).contiguous()


def split_window(windows: torch.Tensor, boundary_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and aligned targets of [B, T+1] windows. Given `boundary_id` (the end-of-document
    separator), the target after each separator, the first token of the next document, is
    masked (-100): a packed window does not learn to guess it from the document before."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    if boundary_id is not None:
        targets = targets.masked_fill(inputs == boundary_id, -100)
    return inputs, targets


class WindowLoader:
    """Endless batches of windows, reshuffled each epoch, resumable exactly from state_dict().

    Epoch e's order is a permutation drawn from a generator seeded by (seed, e), so the batch
    stream is a pure function of (seed, epoch, cursor). The last partial batch is dropped.

    With stream_windows=S the units shuffled are streams of S consecutive windows of the packed
    corpus instead (training through the carried state, training/carry.py): each batch row reads
    one stream, windows_per_step=K windows at a time ([B, K, T+1] batches), for S/K batches in a
    row, then the rows take the next B streams; `starts_streams` tells whether the last batch
    began new streams.
    """

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int, shuffle: bool = True,
                 thought_mask: torch.Tensor | None = None, stream_windows: int = 0, windows_per_step: int = 1):
        if stream_windows and (windows_per_step <= 0 or stream_windows % windows_per_step):
            raise ValueError(f"stream_windows={stream_windows} must be a multiple of windows_per_step={windows_per_step}")
        self.stream_windows = stream_windows
        self.unit = stream_windows or 1  # windows per shuffled unit
        self.windows_per_step = windows_per_step if stream_windows else 1
        n_units = len(windows) // self.unit
        if batch_size <= 0 or batch_size > n_units:
            what = f"streams of {stream_windows} windows" if stream_windows else "windows"
            raise ValueError(f"batch_size={batch_size} must be between 1 and the number of {what} ({n_units})")
        self.windows = windows
        self.thought_mask = thought_mask  # aligned with windows: thinking tokens (TPT)
        self.last_thought_tokens = 0  # thinking tokens among the targets of the last batch
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.n_units = n_units
        self.steps_per_unit = self.unit // self.windows_per_step
        self.batches_per_epoch = n_units // batch_size * self.steps_per_unit
        self.seq_len = windows.shape[1] - 1
        self.tokens_per_batch = batch_size * self.windows_per_step * self.seq_len  # data tokens trained on
        self.epoch = 0
        self.cursor = 0  # batches already served in this epoch
        self.starts_streams = True
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(stable_seed(self.seed, self.epoch))
                self._order = torch.randperm(self.n_units, generator=g)
            else:
                self._order = torch.arange(self.n_units)
        return self._order

    def next_batch(self) -> torch.Tensor:
        if self.cursor == self.batches_per_epoch:
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        group, step = divmod(self.cursor, self.steps_per_unit)
        idx = self._epoch_order()[group * self.batch_size : (group + 1) * self.batch_size]
        self.starts_streams = step == 0
        self.cursor += 1
        if self.stream_windows:  # [B, K]: the next K windows of every row's stream
            idx = idx[:, None] * self.unit + step * self.windows_per_step + torch.arange(self.windows_per_step)
        if self.thought_mask is not None:
            self.last_thought_tokens = int(self.thought_mask[idx][..., 1:].sum())
        return self.windows[idx]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor <= self.batches_per_epoch:
            raise ValueError(f"bad loader state {state}: cursor must be in [0, {self.batches_per_epoch}]")
        self.epoch, self.cursor, self._order = epoch, cursor, None


# ---- everything a pipeline needs -----------------------------------------------------------------


@dataclass
class PreparedData:
    tokenizer: PreTrainedTokenizerFast
    train_windows: torch.Tensor  # [N, seq_len + 1]
    heldout_windows: torch.Tensor  # [M, seq_len + 1], original held-out documents only
    heldout_docs: Dataset
    token_bytes: torch.Tensor  # [V] UTF-8 bytes per token id, for bits per byte
    docs_skipped: int
    # [N, seq_len + 1], True on thinking tokens that TPT appended (None without augmentation):
    # they are counted as thought tokens, not data tokens.
    train_thought_mask: torch.Tensor | None = None


def tpt_document(tokenizer, document: list[int], thinking: str) -> tuple[list[int], list[int]]:
    """TPT's [d ; <think> t </think>] (methods.md §3) and its 0/1 mask of thinking tokens."""
    if not thinking.strip():
        return document, [0] * len(document)
    t = tokenizer(f"<think>{thinking.strip()}</think>", add_special_tokens=False)["input_ids"]
    return document + t, [0] * len(document) + [1] * len(t)


def think_document(tokenizer, document: list[int], thinking: str, position: int) -> tuple[list[int], list[int]]:
    """`document` with "<think> thinking </think>" inserted before its token `position`, and its
    0/1 mask of thinking tokens. RLP's setting (methods.md §1): a thought at some position t,
    after which the document reads on. Empty thinking: the document as it is."""
    if not thinking.strip():
        return document, [0] * len(document)
    thought = tokenizer(f"<think>{thinking.strip()}</think>", add_special_tokens=False)["input_ids"]
    return (document[:position] + thought + document[position:],
            [0] * position + [1] * len(thought) + [0] * (len(document) - position))


def prepare_data(cfg: DataConfig, run_dir: str | Path, seed: int) -> PreparedData:
    """Corpus -> clean -> split by document -> tokenizer (trained on the train split, or reused)
    -> packed windows for both splits (with TPT's thinking appended to train documents when
    data.augment=tpt; held-out documents stay original)."""
    if cfg.source == "embedded":
        docs = build_embedded_corpus(cfg.num_docs, seed, cfg.cache_dir, cfg.tasks)
    else:
        docs = load_documents(cfg.source, cfg.text_field, cfg.format)
    docs, skipped = clean_documents(docs, cfg.text_field)
    if skipped:
        print(f"skipped {skipped} empty or malformed documents (data/docs_skipped)")
    train, heldout = split_documents(docs, cfg.heldout_fraction, seed, text_field=cfg.text_field)
    for name, part in (("train", train), ("held-out", heldout)):
        if len(part) == 0:
            raise ConfigError(f"the {name} split is empty ({len(docs)} documents, data.heldout_fraction="
                              f"{cfg.heldout_fraction}): give more documents or change data.heldout_fraction")
    tokenizer_dir = Path(cfg.tokenizer or Path(run_dir) / "tokenizer")
    fresh_tokenizer = not (tokenizer_dir / "tokenizer.json").is_file()
    tokenizer = load_or_train_tokenizer(tokenizer_dir, lambda: train[cfg.text_field], cfg.vocab_size)
    eos = tokenizer.eos_token_id
    train_ids = tokenize_documents(tokenizer, train[cfg.text_field])
    mask = None
    if cfg.augment != "none":
        if cfg.thinking_field not in train.column_names:
            raise KeyError(f"data.augment={cfg.augment} needs a column data.thinking_field={cfg.thinking_field!r}; "
                           f"the corpus has {train.column_names}")
        thinking = [t or "" for t in train[cfg.thinking_field]]
        if cfg.augment == "tpt":
            pairs = [tpt_document(tokenizer, ids, t) for ids, t in zip(train_ids, thinking)]
        else:  # a thought at a position drawn per document, after its first token
            pairs = [think_document(tokenizer, ids, t, 1 + stable_seed(seed, "think", i) % len(ids))
                     for i, (ids, t) in enumerate(zip(train_ids, thinking))]
        train_ids = [ids for ids, _ in pairs]
        mask = pack_documents([m for _, m in pairs], 0, cfg.seq_len).bool()
    split = "train"
    try:
        train_windows = pack_documents(train_ids, eos, cfg.seq_len)
        split = "held-out"
        heldout_windows = pack_documents(tokenize_documents(tokenizer, heldout[cfg.text_field]), eos, cfg.seq_len)
    except ValueError as e:
        if fresh_tokenizer:  # trained for a run that cannot start: do not leave it to be reused
            shutil.rmtree(tokenizer_dir, ignore_errors=True)
        if split != "held-out":
            raise ConfigError(f"the train split is too small: {e}; give more documents") from None
        raise ConfigError(f"the held-out split ({len(heldout)} documents) is too small: {e}; raise "
                          f"data.heldout_fraction (now {cfg.heldout_fraction}) or lower data.seq_len") from None
    return PreparedData(
        tokenizer,
        train_windows,
        heldout_windows,
        heldout,
        token_byte_lengths(tokenizer),
        skipped,
        mask,
    )
