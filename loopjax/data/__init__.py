"""loopjax.data: built-in tasks, local text, TFDS, tokenizers, and grain pipelines.

See pipeline.py for the stream layout and batch.py for the batch format.
"""

from loopjax.data.arithmetic import ARITH_VOCAB_SIZE, exact_match as arithmetic_exact_match
from loopjax.data.batch import BATCH_KEYS, validate_batch
from loopjax.data.iterator import DataIterator
from loopjax.data.pipeline import (SOURCES, DataSpec, data_vocab_size, default_data_config,
                                   make_eval_batches, make_train_iterator, tokenizer_for)
from loopjax.data.sudoku import (SUDOKU_LEN, SUDOKU_VOCAB_SIZE, check_board, sudoku_accuracy,
                                 valid_boards)
from loopjax.data.text import check_vocab, read_documents
from loopjax.data.tfds_source import open_tfds_source
from loopjax.data.tokenizers import (ByteTokenizer, CharTokenizer, HFTokenizer,
                                     SentencePieceTokenizer, Tokenizer, make_tokenizer,
                                     train_sentencepiece)

__all__ = [
    "ARITH_VOCAB_SIZE", "BATCH_KEYS", "ByteTokenizer", "CharTokenizer", "DataIterator", "DataSpec",
    "HFTokenizer", "SOURCES", "SUDOKU_LEN", "SUDOKU_VOCAB_SIZE", "SentencePieceTokenizer",
    "Tokenizer", "arithmetic_exact_match", "check_board", "check_vocab", "data_vocab_size",
    "default_data_config", "make_eval_batches", "make_tokenizer", "make_train_iterator",
    "open_tfds_source", "read_documents", "sudoku_accuracy", "tokenizer_for",
    "train_sentencepiece", "validate_batch", "valid_boards",
]
