"""Text corpora, token streams and calibration samples."""
from sparselm.data.calibration import calibration
from sparselm.data.corpus import Corpus, load_corpus
from sparselm.data.tokens import corpus_token_ids

__all__ = ["Corpus", "load_corpus", "corpus_token_ids", "calibration"]
