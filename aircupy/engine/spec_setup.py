"""Engine(speculative=...): the Speculator of a draft source, its arguments checked and its draft built at load.

    check_spec_args(speculative, draft_model, draft_k)      # before the (slow) load: cheap argument checks
    setup = build_speculator(speculative, model=..., tokenizer=..., backend=..., n_ctx=..., draft_model=...,
                             draft_k=...)                 # after the target's load
    setup.speculator      the runner's Speculator (engine/speculative.py); setup.close() frees a draft model

Sources (engine/drafters.py):
  "ngram"  prompt lookup, no model.
  "draft"  a second GGUF (draft_model), loaded with the target's backend and kept resident; its tokenizer
           must match the target's (check_draft_vocab: an InvalidParameterError naming the first difference).
  "self"   the target with layers skipped (model.draft_view): every second layer of the upper half, a
           choice that keeps the lower layers (the ones that shape the residual stream most) and halves
           the draft's cost of the top. Only the numpy model has draft_view so far; on the CUDA backend
           "self" is an InvalidParameterError.
draft_k is the largest number of drafts per pass (adaptive k, engine/speculative.py AdaptiveK, picks
fewer while the acceptance rate is low); default DEFAULT_DRAFT_K.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aircupy.engine.drafters import (
    ModelProposer,
    NgramProposer,
    check_draft_vocab,
    self_draft,
)
from aircupy.engine.speculative import Speculator
from aircupy.errors import AircupyError, InvalidParameterError

SOURCES = ("ngram", "draft", "self")
DEFAULT_DRAFT_K = 8
MAX_DRAFT_K = 64          # a verification chunk is 1 + k rows of one step's token budget


def check_spec_args(speculative, draft_model, draft_k) -> None:
    """InvalidParameterError for arguments that cannot work, before anything is loaded."""
    if speculative is not None and speculative not in SOURCES:
        raise InvalidParameterError("speculative", f"must be one of {', '.join(SOURCES)} (or None), got {speculative!r}")
    if speculative == "draft" and draft_model is None:
        raise InvalidParameterError("draft_model", "speculative='draft' needs a draft model (a GGUF path)")
    if draft_model is not None and speculative != "draft":
        raise InvalidParameterError("draft_model", f"is used by speculative='draft' only, got speculative={speculative!r}")
    if draft_k is not None:
        if speculative is None:
            raise InvalidParameterError("draft_k", "is used with speculative decoding only (speculative is None)")
        if isinstance(draft_k, bool) or not isinstance(draft_k, int) or not 1 <= draft_k <= MAX_DRAFT_K:
            raise InvalidParameterError("draft_k", f"must be an integer in [1, {MAX_DRAFT_K}], got {draft_k!r}")
    if draft_model is not None:
        p = Path(draft_model)
        if not p.is_file():
            raise InvalidParameterError("draft_model", f"{p}: no such file" if not p.exists() else f"{p}: not a file")


@dataclass
class SpecSetup:
    name: str
    speculator: Speculator
    draft: object = None          # (GGUFFile, model) of a draft GGUF, closed by close()

    def close(self) -> None:
        if self.draft is not None:
            g, model = self.draft
            self.draft = None
            model.close()
            g.close()


def default_skip_layers(n_layers: int) -> list[int]:
    """Every second layer of the upper half, the last layer kept (see the module docstring)."""
    return list(range(n_layers // 2, n_layers - 1, 2))


def build_speculator(speculative: str, *, model, tokenizer, backend: str, n_ctx: int, draft_model=None,
                     draft_k: int | None = None) -> SpecSetup:
    """The Speculator for a checked source (check_spec_args) over the loaded target model."""
    k = draft_k if draft_k is not None else DEFAULT_DRAFT_K
    vocab = model.config.vocab_size
    if speculative == "ngram":
        return SpecSetup("ngram", Speculator(NgramProposer(), k_max=k))
    if speculative == "self":
        if not hasattr(model, "draft_view"):
            raise InvalidParameterError("speculative", f"'self' needs a model that can skip layers (draft_view); the "
                                                       f"{backend} backend's model has none: use 'ngram' or 'draft'")
        proposer = self_draft(model, default_skip_layers(model.config.n_layers), n_ctx)
        return SpecSetup("self", Speculator(proposer, k_max=k))
    g, draft = _load_draft(Path(draft_model), tokenizer, backend, n_ctx)
    proposer = ModelProposer(draft, vocab, min(n_ctx, draft.config.n_ctx_train))
    return SpecSetup("draft", Speculator(proposer, k_max=k), (g, draft))


def _load_draft(path: Path, target_tokenizer, backend: str, n_ctx: int):
    """Open, check (vocabulary first: no weights read for a mismatched draft) and load a draft GGUF."""
    from aircupy.config import ModelConfig
    from aircupy.engine.backend import load_model
    from aircupy.gguf.reader import GGUFFile
    from aircupy.gguf.tokenizer import Tokenizer
    try:
        g = GGUFFile(path)
    except (AircupyError, OSError, ValueError) as e:
        raise InvalidParameterError("draft_model", f"{path} cannot be read as a GGUF model: {e}") from None
    try:
        try:
            config = ModelConfig.from_gguf(g)
            draft_tok = Tokenizer.from_gguf(g)
        except (AircupyError, ValueError, KeyError) as e:
            raise InvalidParameterError("draft_model", f"{path} is not a usable model: {e}") from None
        check_draft_vocab(target_tokenizer, draft_tok)
        return g, load_model(backend, g, config, n_ctx=min(n_ctx, config.n_ctx_train), max_num_seqs=1)
    except BaseException:
        g.close()
        raise
