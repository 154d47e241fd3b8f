"""Zero-shot perplexity: the corpora's detokenizers, rows laid out as training lays them, document
isolation (a packed row scores as its documents one by one), and the corpus x S table of the
whole corpus on a tiny model with random weights."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from loopjax.data.detokenizers import CORPORA, corpus_recipe
from loopjax.data.tokenizers import ByteTokenizer
from loopjax.diffusion import Schedule
from loopjax.evaluate.likelihood import heldout_nelbo
from loopjax.evaluate.zero_shot import (corpus_batches, parse_corpus, read_corpus, run_layout,
                                        zero_shot_eval)
from loopjax.loops import resolve_policy
from loopjax.model import LoopedTransformer, ModelConfig

CFG = ModelConfig(kernels="reference",
                  vocab_size=257, max_length=32, width=32, num_layers=3, num_heads=2,
                  cond_dim=16, loop_start=1, loop_end=2, max_loops=3)


def random_params(model, length, scale=0.2, seed=0):
  """Random weights of every parameter (the init's zero adaLN gates would make blocks identity
  maps, and attention would not matter)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.int32),
                          1)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), shapes)


@pytest.mark.parametrize("name,text,want", [
    ("ptb", "the company 's shares were n't sold at $ N a share <unk> in N N \\/ N",
     "the company's shares weren't sold at $1 a share ? in 1 1 / N"),
    ("wikitext", " = = History = = \n The station 's 1 @,@ 000 km line ( built 1950 ) is 3 @.@ 5 "
     "m @-@ wide , \" fast \" .",
     ' == History ==\nThe station\'s 1,000 km line (built 1950) is 3.5 m-wide, "fast" .'),
    ("lm1b", "He said : \" it 's http : / / x.org , ok ? \" ( see ) $ 5",
     'He said: "it\'s http://x.org, ok?" (see) $5'),
    ("lambada", "  \u201cYes,\u201d he said.  ", '\n"Yes," he said.'),
    ("pubmed", "the rate ( @xmath0 ) was 3 @.@ 5 % , high .", "the rate (@xmath0) was 3.5 %, high."),
    ("arxiv", "we show that @xmath1 : it 's [ 12 ] .", "we show that @xmath1: it's [12] ."),
])
def test_each_detokenizer_on_an_example(name, text, want):
  assert corpus_recipe(name).detokenizer(text) == want


def test_corpus_names_and_recipes(tmp_path):
  assert sorted(CORPORA) == sorted(["ptb", "wikitext", "lm1b", "lambada", "ag_news", "pubmed",
                                    "arxiv"])
  assert corpus_recipe("AG_NEWS").detokenizer is None
  f = tmp_path / "ptb.jsonl"
  f.write_text('{"sentence": " it was n\'t N "}\n{"sentence": "b \'s"}\n')
  assert parse_corpus(f"ptb={f}") == ("ptb", str(f))
  assert parse_corpus(str(f)) == (None, str(f))
  assert read_corpus("ptb", str(f)) == ["it wasn't N", "b's"]  # documents are stripped first
  with pytest.raises(ValueError, match="unknown corpus name 'ptbx'"):
    parse_corpus(f"ptbx={f}")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    parse_corpus(f"ptb={tmp_path / 'missing.txt'}")


def test_layout_follows_the_run_data_config():
  c = lambda **kw: ml_collections.ConfigDict(kw)
  assert run_layout(c(source="prepared", wrap="mdlm")) == "mdlm"
  assert run_layout(c(source="prepared", wrap="document")) == "document"
  assert run_layout(c(source="text", packing=True, document_attention=True)) == "document"
  assert run_layout(c(source="tfds", packing=True, document_attention=False)) == "concat"
  assert run_layout(c(source="text", packing=False)) == "document"


def _content_fixed(batch):
  """Every real token whose id is divisible by 3 becomes a given (fixed, unscored) context
  token: a rule of token content, so it is the same whichever row a document lands in."""
  real = batch["segment_ids"] > 0
  given = real & (batch["tokens"] % 3 == 0)
  return {**batch, "fixed": batch["fixed"] | given, "loss_mask": real & ~given}


@pytest.fixture(scope="module")
def tiny():
  """A tiny looped byte-level model with random weights large enough that attention matters,
  and its NELBO at t = 1 on rows of one document (one compiled program for every test)."""
  model = LoopedTransformer(CFG)
  params = random_params(model, CFG.max_length, scale=0.5)
  score = lambda batches, loops=2: heldout_nelbo(
      model, params, [_content_fixed(b) for b in batches], schedule=Schedule("linear"),
      loops=resolve_policy(model.cfg, loops), time_points=(1.0,))
  return model, params, score


def test_isolated_documents_packed_score_as_one_by_one(tiny):
  """At t = 1 every non-given token is masked, so the NELBO draws no noise: a packed row of
  isolated documents must give exactly the bound of the documents scored one per row, and the
  same row with attention across documents must not."""
  _, _, score = tiny
  tok, docs = ByteTokenizer(), ["the cat sat", "on a mat", "at noon"]
  kw = dict(seq_len=CFG.max_length, batch_size=1)
  packed = corpus_batches(docs, tok, layout="document", **kw)
  assert len(packed) == 1 and packed[0]["segment_ids"].max() == 3
  alone = [score(corpus_batches([d], tok, layout="document", **kw)) for d in docs]
  got = score(packed)
  tokens = sum(r["tokens"] for r in alone)
  want = sum(r["nats_per_token"] * r["tokens"] for r in alone) / tokens
  assert got["tokens"] == tokens > 20
  assert got["nats_per_token"] == pytest.approx(want, rel=1e-5)
  crossed = score(corpus_batches(docs, tok, layout="concat", **kw))
  assert abs(crossed["nats_per_token"] / want - 1) > 1e-3


def test_zero_shot_scores_the_full_corpus_into_a_corpus_by_s_table(tiny, tmp_path):
  model, params, _ = tiny
  ptb = tmp_path / "ptb.test.txt"
  ptb.write_text(" it was n't black monday \n but while the new york stock exchange did n't fall"
                 " apart \n the dow fell N points \n")
  plain = tmp_path / "notes.txt"
  plain.write_text("first note\n\nsecond note, longer than the first\n")
  config = ml_collections.ConfigDict({"data": {"source": "text", "packing": True,
                                               "seq_len": CFG.max_length}})
  lines = []
  zs = zero_shot_eval(model, params, config, [f"ptb={ptb}", str(plain)],
                      [resolve_policy(CFG, 1), resolve_policy(CFG, 3)],
                      schedule=Schedule("linear"), tokenizer=ByteTokenizer(), batch_size=1,
                      time_points=(1.0,), log=lines.append)
  assert zs["layout"] == "document"
  assert zs["table"]["columns"] == ["1", "3"]
  assert list(zs["table"]["rows"]) == ["ptb", "notes.txt"]
  ptb_rows = [r for r in zs["rows"] if r["corpus"] == "ptb"]
  assert [r["documents"] for r in ptb_rows] == [3, 3] and ptb_rows[0]["detokenizer"] == "ptb"
  # every byte of the three detokenized lines and of their EOS is scored: the whole file
  text = "it wasn't black monday|but while the new york stock exchange didn't fall apart|" \
         "the dow fell 1 points|"
  assert ptb_rows[0]["tokens"] == len(text) > 3 * CFG.max_length
  assert zs["table"]["rows"]["ptb"] == [r["ppl_bound"] for r in ptb_rows]
  assert zs["rows"][0]["ppl_bound"] != zs["rows"][1]["ppl_bound"]  # S = 1 and 3 differ
  assert any(ln.startswith("corpus ptb") for ln in lines) and "zero-shot" in lines[-3]
  # --corpus-rows caps the rows scored
  capped = zero_shot_eval(model, params, config, [f"ptb={ptb}"], [resolve_policy(CFG, 1)],
                          schedule=Schedule(
      "linear"), tokenizer=ByteTokenizer(), batch_size=1, time_points=(1.0,), max_rows=2,
      log=lines.append)
  assert capped["rows"][0]["tokens"] == 2 * CFG.max_length


def test_corpus_rows_log_names_the_rows_scored_not_the_padded_batches(tiny, tmp_path):
  """Two rows in a batch of 4: the last batch is filled with rows that score nothing; the log
  says 2 rows, and 2 rows' tokens are what is scored."""
  model, params, _ = tiny
  doc = tmp_path / "doc.txt"
  doc.write_text("a long enough line of text to fill several rows of the tiny model\n" * 4)
  config = ml_collections.ConfigDict({"data": {"source": "text", "packing": True,
                                               "seq_len": CFG.max_length}})
  lines = []
  zs = zero_shot_eval(model, params, config, [str(doc)], [resolve_policy(CFG, 1)],
                      schedule=Schedule("linear"),
                      tokenizer=ByteTokenizer(), batch_size=4, time_points=(1.0,), max_rows=2,
                      log=lines.append)
  assert zs["rows"][0]["tokens"] == 2 * CFG.max_length
  (line,) = [ln for ln in lines if ln.startswith("corpus doc.txt:")]
  assert f"scoring 2 rows of {CFG.max_length}" in line and "--corpus-rows 2" in line, line
