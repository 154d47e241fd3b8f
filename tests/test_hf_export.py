"""The export as a Hugging Face model repository: `transformers` loads it with remote code and
its PyTorch forward reproduces the JAX logits at S = 1, S_max and 2 S_max (plain MDM and
LoopMDM, packed documents and padding, bf16), adaptive loops stop where loopjax's do, the
tokenizer files round-trip text with [MASK] = vocab_size, the model card comes from the run's
own files, no absolute path is written, and the documented sampling snippet runs."""

import http.server
import json
import os
import re
import shutil
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the PyTorch export checks need the optional extra: pip install -e '.[torch]'")
transformers = pytest.importorskip(
    "transformers",
    reason="the PyTorch export checks need the optional extra: pip install -e '.[torch]'")
import transformers.dynamic_module_utils  # noqa: E402  (its module cache is redirected below)

from test_export import CONFIGS, _random_params, _run_config  # noqa: E402
from loopjax.io import export, load  # noqa: E402
from loopjax.cli import export as export_command  # noqa: E402
from loopjax.data import CharTokenizer, ByteTokenizer  # noqa: E402
from loopjax.loops import LoopPolicy  # noqa: E402
from loopjax.inference.denoiser import make_denoiser  # noqa: E402
from loopjax.hf import tokenizer_files  # noqa: E402
from loopjax.model import LoopedTransformer  # noqa: E402
from word_tokenizer import word_level_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["<unk>", "<pad>", "</s>", "a", "b", "c", "d", "e", "f"]  # 9 ids, as TINY's vocab_size
RNG = np.random.default_rng(5)
TOKENS = RNG.integers(0, 10, (3, 12))  # includes [MASK] = 9
# Row 0: two packed documents and padding; row 1: one document and padding; row 2: one document.
SEGMENTS = np.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 9 + [0] * 3, [1] * 12])


@pytest.fixture(scope="module", autouse=True)
def hf_offline(tmp_path_factory):
  """transformers copies remote code into its module cache: here a temporary folder, offline."""
  cache = str(tmp_path_factory.mktemp("hf_home"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("HF_HOME", cache)
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE",
               os.path.join(cache, "modules"))
    mp.setattr(sys, "path", list(sys.path))  # the cache folder is appended to sys.path
    yield


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  return word_level_tokenizer(tmp_path_factory.mktemp("tok"), WORDS)


def _load(d, **kw):
  return transformers.AutoModelForMaskedLM.from_pretrained(
      d, trust_remote_code=True, local_files_only=True, **kw).eval()


def _torch_logits(model, loops, *, segments=True, mask=False, **kw):
  ids = torch.as_tensor(TOKENS)
  extra = {}
  if segments:
    extra["segment_ids"] = torch.as_tensor(SEGMENTS)
  if mask:
    extra["attention_mask"] = torch.as_tensor((SEGMENTS > 0).astype(np.int64))
  with torch.no_grad():
    out = model(ids, loops=loops, **extra, **kw)
  return out.logits.float().numpy(), out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok_path):
  """name -> (JAX model, params, export folder) for random-weight plain MDM and LoopMDM
  exports (random adaLN gates: every layer changes the logits)."""
  out = {}
  for name in ("loopmdm", "mdm", "variant"):
    cfg = CONFIGS[name]
    params = _random_params(cfg, seed=3)
    d = str(tmp_path_factory.mktemp("hf") / name)
    export.export_params(d, cfg, params, run_config=_run_config(cfg, tok_path),
                         source={"params": "ema", "step": 7})
    out[name] = (LoopedTransformer(cfg), params, d)
  return out


_JITTED = {}


def _jax_logits(model, params, loops, segments, t=None):
  """model.apply at S = loops (traced: one program per architecture serves every S)."""
  if (model.cfg, t is None) not in _JITTED:
    _JITTED[model.cfg, t is None] = jax.jit(
        lambda p, x, s, seg, t: model.apply({"params": p}, x, s, t, seg))
  fn = _JITTED[model.cfg, t is None]
  return np.asarray(fn(params, jnp.asarray(TOKENS), jnp.int32(loops), jnp.asarray(segments),
                       None if t is None else jnp.asarray(t, jnp.float32)))


def _check_loops(jax_model, params, d, label, random_weights=True, factors=(0, 1, 2)):
  """HF logits vs JAX at S = 1 (factor 0), S_max, 2 S_max, with packed documents, padding and
  no mask."""
  hf = _load(d)
  cfg = jax_model.cfg
  s_max = cfg.max_loops if cfg.looped else 1
  ones = np.ones_like(SEGMENTS)
  for s in [max(1, f * s_max) for f in factors]:
    model, p = jax_model, params
    if s > cfg.max_loops and cfg.looped:  # the JAX model's static loop length, same weights
      model, p, _ = load.load_export(d, runtime={"max_loops": s})
    jax_s = min(s, model.cfg.max_loops)
    want = _jax_logits(model, p, jax_s, SEGMENTS)
    got, out = _torch_logits(hf, s)
    diff = np.abs(got - want).max()
    print(f"{label} S={s}: HF vs JAX max |diff| = {diff:.3g} (logit scale "
          f"{np.abs(want).max():.3g})")
    assert got.shape == (3, 12, cfg.vocab_size) and diff <= 1e-4
    assert out.loops.tolist() == [s if cfg.looped else 1] * 3
    # attention_mask alone = one document per row; no mask at all = every position sees all.
    pad = _jax_logits(model, p, jax_s, (SEGMENTS > 0).astype(np.int32))
    assert np.abs(_torch_logits(hf, s, segments=False, mask=True)[0] - pad).max() <= 1e-4
    full = _jax_logits(model, p, jax_s, ones)
    assert np.abs(_torch_logits(hf, s, segments=False)[0] - full).max() <= 1e-4
  if cfg.looped and random_weights:  # the loop count matters
    assert np.abs(_torch_logits(hf, 1)[0] - _torch_logits(hf, s_max)[0]).max() > 0.1
  return hf


@pytest.mark.parametrize("name", ["loopmdm", "mdm"])
def test_transformers_logits_match_jax_at_any_loop_count(exported, name):
  model, params, d = exported[name]
  conf = transformers.AutoConfig.from_pretrained(d, trust_remote_code=True, local_files_only=True)
  assert conf.model_type == "loopmdm" and conf.mask_id == 9 and conf.vocab_size == 9
  _check_loops(model, params, d, name)


def test_variant_time_conditioned_injected_loop_embedding_swiglu(exported):
  """Uniform looping (no head, no tail) with input injection, a learned loop embedding, SwiGLU
  and time conditioning; S > S_max is refused (the embedding has S_max rows)."""
  model, params, d = exported["variant"]
  hf = _load(d)
  t = np.array([0.3, 0.8, 0.55])
  for s in (1, model.cfg.max_loops):
    want = _jax_logits(model, params, s, SEGMENTS, t)
    got = _torch_logits(hf, s, timesteps=torch.as_tensor(t))[0]
    assert np.abs(got - want).max() <= 1e-4
  assert np.abs(got - _torch_logits(hf, s)[0]).max() > 1e-3  # t matters
  with pytest.raises(ValueError, match="learned loop embedding"):
    hf(torch.as_tensor(TOKENS), loops=model.cfg.max_loops + 1)


def test_adaptive_loops_stop_where_loopjax_stops(exported):
  """adaptive_tau: the same per-sequence stop as `--loops adaptive:TAU` (run_loops)."""
  model, params, d = exported["loopmdm"]
  hf = _load(d)
  s = 2 * model.cfg.max_loops
  _, out = _torch_logits(hf, s, output_hidden_states=True)
  hs = [h.float().numpy() for h in out.hidden_states]  # the loop input, then each iteration
  assert len(hs) == s + 1
  watch = (TOKENS == 9)[..., None]
  changes = [np.sqrt((watch * (b - a) ** 2).sum((1, 2)) / (watch * a ** 2).sum((1, 2)))
             for a, b in zip(hs[:-1], hs[1:])]
  changes_SxB = np.stack(changes)

  def stops(tau):  # iterations per row under the rule: the first change below tau ends it
    below = changes_SxB < tau
    return np.where(below.any(0), below.argmax(0) + 1, s)

  # tau halfway between two observed changes (none sits on the edge), chosen so that the rows
  # stop after different numbers of iterations.
  c = np.sort(changes_SxB.ravel())
  tau = max(((a + b) / 2 for a, b in zip(c[:-1], c[1:])),
            key=lambda t: (len(set(stops(t))), -abs(stops(t).mean() - s / 2)))
  tau = float(tau)
  assert len(set(stops(tau))) > 1
  policy = LoopPolicy.parse(f"adaptive:{tau}:1:{s}")
  denoise = make_denoiser(model, params, policy, jnp.asarray(SEGMENTS))
  want, want_loops = jax.jit(denoise)(jnp.asarray(TOKENS), jnp.zeros(3), jnp.ones(3))
  got, out = _torch_logits(hf, s, adaptive_tau=tau)
  print(f"tau {tau:.3g}: loops HF {out.loops.tolist()}, loopjax {np.asarray(want_loops)}")
  assert out.loops.tolist() == np.asarray(want_loops).tolist() == stops(tau).tolist()
  assert np.abs(got - np.asarray(want)).max() <= 1e-4


def test_bfloat16_export_loads_and_matches(exported, tmp_path):
  model, params, _ = exported["loopmdm"]
  d = str(tmp_path / "bf16")
  export.export_params(d, model.cfg, params, dtype="bfloat16")
  _, rounded, conf = load.load_export(d)  # the bf16 weights as float32
  assert conf["dtype"] == "bfloat16"
  want = _jax_logits(model, rounded, 3, SEGMENTS)
  got32 = _torch_logits(_load(d, dtype=torch.float32), 3)[0]
  assert np.abs(got32 - want).max() <= 1e-4  # the stored weights, computed in float32
  hf16 = _load(d)  # the stored dtype
  got16 = _torch_logits(hf16, 3)[0]
  diff, scale = np.abs(got16 - want).max(), np.abs(want).max()
  print(f"bf16 compute: max |diff| = {diff:.3g} (logit scale {scale:.3g}), "
        f"{hf16.dtype}")
  assert diff <= 0.05 * scale


def _sentencepiece(tmp_path, model_type):
  from loopjax.data.tokenizers import SentencePieceTokenizer, train_sentencepiece
  text = tmp_path / "corpus.txt"
  text.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog {i * 7}"
                             for i in range(200)))
  return SentencePieceTokenizer(train_sentencepiece(
      [str(text)], str(tmp_path / "spm" / "sp"), 60, model_type=model_type,
      hard_vocab_limit=False))


@pytest.mark.parametrize("kind", ["hf", "byte", "chars", "sentencepiece"])
def test_tokenizer_round_trips_and_knows_the_mask(tmp_path, tok_path, kind):
  from loopjax.data.tokenizers import HFTokenizer
  tok = {"hf": lambda: HFTokenizer(tok_path), "byte": ByteTokenizer,
         "chars": lambda: CharTokenizer("0123456789.", pad="."),
         "sentencepiece": lambda: _sentencepiece(tmp_path, "unigram")}[kind]()
  text = {"hf": "a b c f e", "byte": "héllo, wörld\n  ok", "chars": "12.3..907",
          "sentencepiece": "the lazy fox 12 jumps"}[kind]
  out = tmp_path / "out"
  out.mkdir()
  tokenizer_files.write_tokenizer_files(str(out), tok, max_length=16)
  hf = transformers.AutoTokenizer.from_pretrained(str(out))
  ids = hf(text, add_special_tokens=False)["input_ids"]
  assert ids == tok.encode(text) and hf.decode(ids) == tok.decode(ids) == text
  assert hf.mask_token == "[MASK]" and hf.mask_token_id == tok.vocab_size
  assert hf.convert_tokens_to_ids("[MASK]") == tok.vocab_size
  if kind == "sentencepiece":
    assert hf.eos_token == "</s>" and hf.pad_token == "<pad>"


def test_sentencepiece_bpe_gets_no_top_level_tokenizer(tmp_path):
  tok = _sentencepiece(tmp_path, "bpe")
  with pytest.warns(UserWarning, match="no tokenizer.json form"):
    assert tokenizer_files.write_tokenizer_files(str(tmp_path), tok, max_length=16) == []
  assert not (tmp_path / "tokenizer.json").exists()


@pytest.fixture(scope="module")
def trained_export(tiny_sudoku_run, tmp_path_factory):
  """(workdir, export) of the session's tiny Sudoku LoopMDM run (a copy of it, given an
  eval/summary.json as `loopjax eval` writes it)."""
  root = tmp_path_factory.mktemp("trained")
  wd = str(root / "run")
  shutil.copytree(tiny_sudoku_run[0], wd)
  os.makedirs(os.path.join(wd, "eval"), exist_ok=True)
  summary = {"workdir": wd, "checkpoint_step": 3, "tasks": [
      {"loops": 1, "steps": 8, "cell_accuracy": 0.25, "board_accuracy": 0.0, "nfe": 8},
      {"loops": 12, "steps": 8, "cell_accuracy": 0.375, "board_accuracy": 0.125, "nfe": 8}],
      "likelihood": [{"loops": 6, "bits_per_token": 2.5, "ppl_bound": 5.66}]}
  with open(os.path.join(wd, "eval", "summary.json"), "w") as f:
    json.dump(summary, f)
  out = str(root / "export")
  export.export_run(wd, out)
  return wd, out


def test_trained_run_export_loads_in_transformers(trained_export):
  _, out = trained_export
  loaded = load.load_model_dir(out)
  model, params = loaded.model, loaded.params
  # At the default S (the loop counts are covered on random weights above).
  _check_loops(model, params, out, "trained", random_weights=False, factors=(1,))
  tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True,
                                                   local_files_only=True)
  board = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"
  ids = tok(board, add_special_tokens=False)["input_ids"]  # Sudoku's vocabulary: "1".."9"
  assert ids == [int(ch) - 1 for ch in board] and tok.decode(ids) == board
  assert tok.mask_token == "[MASK]" and tok.mask_token_id == model.cfg.mask_id


def test_model_card_and_no_absolute_paths(trained_export, tmp_path_factory):
  _, out = trained_export
  conf = json.load(open(os.path.join(out, "config.json")))
  card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
  rep, (a, b), train_cfg = conf["parameter_report"], conf["loop"]["block"], \
      conf["training_config"]["train"]
  assert f"| unique parameters | {rep['unique_params']:,} |" in card
  assert f"Layers [{a}, {b}) of 3 form the looped block" in card and "default S = 3" in card
  seen = 3 * train_cfg["batch_size"] * 81  # steps x batch x seq_len
  assert f"| tokens seen | {seen:,} |" in card and "| data | sudoku |" in card
  assert re.search(r"\| training FLOPs \(analytic, 3x forward\) \| [0-9.e+]+ \|", card)
  assert "| 12 | 8 | 0.375 | 0.125 | 8 |" in card  # the run's eval/summary.json, tabled
  assert conf["auto_map"]["AutoModelForMaskedLM"] == "modeling_loopmdm.LoopMDMForMaskedLM"
  base = str(tmp_path_factory.getbasetemp())
  for name in os.listdir(out):
    path = os.path.join(out, name)
    if os.path.isfile(path) and not name.endswith(".safetensors"):
      text = open(path, encoding="utf-8").read()
      assert base not in text and os.path.expanduser("~") + "/" not in text, name
  assert conf["weights"]["workdir"] == "run"


def test_training_config_paths_become_file_names():
  got = export.relative_paths({"data": {"tokenizer": "hf:/data/tok/tokenizer.json",
                                        "paths": "/a/x.txt,rel/y.txt,~/z.jsonl",
                                        "template": "Question: {q}\nAnswer:"},
                               "train": {"init_from": "/runs/base/", "loops": "uniform:1:3"},
                               "url": "gs://bucket/dir/file", "list": ["/p/q.parquet", 3]})
  assert got == {"data": {"tokenizer": "hf:tokenizer.json", "paths": "x.txt,rel/y.txt,z.jsonl",
                          "template": "Question: {q}\nAnswer:"},
                 "train": {"init_from": "base", "loops": "uniform:1:3"},
                 "url": "gs://bucket/dir/file", "list": ["q.parquet", 3]}


def test_documented_sampling_snippet_runs(exported):
  """docs/hf_export.md's PyTorch snippet: MDLM ancestral sampling fills every [MASK]."""
  _, _, d = exported["loopmdm"]
  doc = open(os.path.join(ROOT, "docs", "hf_export.md"), encoding="utf-8").read()
  code = re.search(r"```python\n(.*?)```", doc, re.S).group(1).replace('"OUT"', repr(d))
  scope = {}
  torch.manual_seed(0)
  exec(compile(code, "hf_export.md", "exec"), scope)
  out = scope["out"]
  assert out.shape == (2, 16) and not bool((out == 9).any())
  assert out[:, :2].tolist() == [[3, 4]] * 2  # the prompt is kept


def _jax_noise(rng, method, padded_vocab):
  """noise(step, shape) for the PyTorch sampler: the numbers loopjax's sampler draws from rng."""
  from loopjax.diffusion.samplers import step_noise
  draw = jax.jit(step_noise, static_argnums=(2, 3))

  def noise(s, shape):
    key = rng
    if isinstance(s, tuple):  # semi-AR block k: the sampler's key for that block
      key, s = jax.random.fold_in(rng, 10_000 + s[0]), s[1]
    e, u = draw(key, s, (*shape[:-1], padded_vocab), method)
    return torch.tensor(np.asarray(e)), None if u is None else torch.tensor(np.asarray(u))
  return noise


# (export, method, steps, loops as a multiple of S_max or "adaptive", final_step, prompt length,
# sampler options)
SAMPLE_CASES = [("loopmdm", "ancestral", 6, 1, "sample", 2),
                ("loopmdm", "ancestral", 6, 1, "sample", 0, {"temperature": 0.7, "top_k": 5,
                                                             "top_p": 0.9}),
                ("loopmdm", "confidence", 6, 1, "sample", 1, {"block_len": 4,
                                                              "temperature": 1.0}),
                ("loopmdm", "ancestral", 5, 2, "argmax", 0),
                ("loopmdm", "confidence", 4, 0, "sample", 3),
                ("loopmdm", "ancestral", 6, "adaptive", "argmax", 1),
                ("variant", "ancestral", 5, 1, "argmax", 2),
                ("variant", "confidence", 3, 1, "sample", 0)]


@pytest.mark.parametrize("case", SAMPLE_CASES, ids=lambda c: "-".join(map(str, c[:6])) + (
    "-filtered" if len(c) > 6 else ""))
def test_sample_equals_loopjax_token_for_token(exported, case):
  """`model.sample(...)` fed loopjax's random numbers (`samplers.step_noise`) draws exactly the
  tokens of loopjax's jitted sampler: MDLM ancestral with either endpoint (the run's noise
  schedule, cosine here; time input for the time-conditioned variant), confidence decoding,
  S = 1, S_max, 2 S_max and adaptive loops, temperature with top-k / top-p, semi-AR blocks, a
  prompt kept."""
  from loopjax.diffusion import make_schedule
  from loopjax.inference.denoiser import loop_args, make_sampler
  from loopjax.loops import resolve_policy
  name, method, steps, mult, final_step, n_prompt, opts = (*case, {})[:7]
  model, params, d = exported[name]
  cfg = model.cfg
  hf = _load(d)
  assert hf.config.noise_schedule["schedule"] == "cosine"
  eps = 0.05
  kw = {}
  if mult == "adaptive":
    tau = 0.2
    policy = resolve_policy(cfg, f"adaptive:{tau}:1:{2 * cfg.max_loops}")
    kw = dict(loops=2 * cfg.max_loops, adaptive_tau=tau)
  else:
    policy = resolve_policy(cfg, max(1, mult * cfg.max_loops))
    kw = dict(loops=policy.loops)
  x = np.full((4, 12), cfg.mask_id, np.int32)
  x[:, :n_prompt] = TOKENS[0, :n_prompt] % cfg.vocab_size
  sampler = make_sampler(model, policy, steps=steps, method=method,
                         schedule=make_schedule({"schedule": "cosine"}), final_step=final_step,
                         eps=eps, **opts)
  got_by_seed = []
  for seed in (0, 1):
    rng = jax.random.PRNGKey(seed)
    want = sampler(params, rng, jnp.asarray(x), None, loop_args(policy))
    got, nfe = hf.sample(torch.as_tensor(x, dtype=torch.long), steps, method=method,
                         final_step=final_step, eps=eps,
                         noise=_jax_noise(rng, method, cfg.padded_vocab), **kw, **opts)
    want_tokens = np.asarray(want["tokens"])
    assert got.tolist() == want_tokens.tolist()
    assert nfe == int(want["nfe"])
    assert not (want_tokens == cfg.mask_id).any()
    assert (want_tokens[:, :n_prompt] == x[:, :n_prompt]).all()
    if mult == "adaptive":  # the stopping rule acted: calls ran different loop counts
      assert len(set(np.asarray(want["loops_TxB"]).ravel().tolist()) - {0}) > 1
    got_by_seed.append(got)
  if method == "ancestral" or opts.get("temperature"):  # another key, other samples
    assert not torch.equal(got_by_seed[0], got_by_seed[1])


def test_model_card_metadata_round_trips_through_huggingface_hub(trained_export):
  """README.md's metadata, read back by huggingface_hub (strict: a malformed model-index
  raises), holds the license, library, tags and one model-index result per number of the run's
  eval/summary.json; the text cites the paper."""
  from huggingface_hub import ModelCard, ModelCardData, metadata_load
  _, out = trained_export
  path = os.path.join(out, "README.md")
  card = ModelCard.load(path, ignore_metadata_errors=False)
  data = card.data
  assert (data.license, data.library_name, data.pipeline_tag) == ("other", "transformers",
                                                                  "fill-mask")
  assert {"loopjax", "masked-diffusion", "custom_code"} <= set(data.tags)
  got = {(r.task_name, r.metric_type, r.metric_name, r.metric_value, r.dataset_split)
         for r in data.eval_results}
  task, nll = "Task accuracy", "Held-out likelihood (NELBO bound)"
  assert got == {
      (task, "accuracy", "cell accuracy (S=1, 8 steps)", 0.25, "held-out"),
      (task, "accuracy", "board accuracy (S=1, 8 steps)", 0.0, "held-out"),
      (task, "accuracy", "cell accuracy (S=12, 8 steps)", 0.375, "held-out"),
      (task, "accuracy", "board accuracy (S=12, 8 steps)", 0.125, "held-out"),
      (nll, "bits_per_token", "NELBO bits per token (S=6)", 2.5, "held-out"),
      (nll, "perplexity", "perplexity bound (S=6)", 5.66, "held-out")}
  assert {(r.dataset_type, r.dataset_name) for r in data.eval_results} == {
      ("sudoku", "generated puzzles, 36-50 givens")}
  meta = metadata_load(path)
  assert meta["model-index"][0]["name"] == "export"
  again = ModelCardData(**meta, ignore_metadata_errors=False)  # the raw YAML parses strictly
  assert len(again.eval_results) == 6
  assert "arXiv 2605.26106" in card.text and "eprint        = {2605.26106}" in card.text
  assert "model.sample(x, steps=64" in card.text


class _Hub(http.server.BaseHTTPRequestHandler):
  """The few Hub API routes `create_repo` + `upload_folder` call; every request is recorded."""
  log: list = []

  def _reply(self, code, obj):
    body = json.dumps(obj).encode()
    self.send_response(code)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def do_POST(self):  # noqa: N802 (the http.server API)
    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
    path = self.path.split("?")[0]
    self.log.append(("POST", path, self.headers.get("authorization"), body))
    endpoint = f"http://127.0.0.1:{self.server.server_port}"
    if path == "/api/validate-yaml":  # the Hub checks README.md's metadata before the upload
      self._reply(200, {"errors": [], "warnings": []})
    elif path == "/api/repos/create":
      repo = json.loads(body)
      self._reply(200, {"url": f"{endpoint}/{repo['organization']}/{repo['name']}"})
    elif path.endswith("/preupload/main"):
      files = json.loads(body)["files"]
      self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                   "shouldIgnore": False} for f in files]})
    elif "/commit/" in path:
      repo = path.split("/api/models/")[1].split("/commit/")[0]
      self._reply(200, {"commitUrl": f"{endpoint}/{repo}/commit/{'a' * 40}",
                        "commitOid": "a" * 40, "pullRequestUrl": None})
    else:
      self._reply(404, {"error": "not served here"})

  def do_GET(self):  # noqa: N802
    self.log.append(("GET", self.path, self.headers.get("authorization"), b""))
    self._reply(404, {"error": "not served here"})

  def log_message(self, *args):
    pass


@pytest.fixture
def loopback_hub(monkeypatch):
  """A loopback HTTP server standing in for the Hub (HF_ENDPOINT), online, with a token."""
  from huggingface_hub import constants
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  endpoint = f"http://127.0.0.1:{server.server_port}"
  _Hub.log = []
  monkeypatch.setenv("HF_ENDPOINT", endpoint)
  monkeypatch.setattr(constants, "ENDPOINT", endpoint)
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setenv("HF_TOKEN", "hf_test_token")
  yield _Hub.log
  server.shutdown()
  server.server_close()


def test_push_to_hub_uploads_the_export_in_one_commit(trained_export, loopback_hub, tmp_path,
                                                      capsys):
  """`loopjax export --push-to-hub ORG/NAME` (no --out): the repository is created, then one
  commit carries every file of the export (the recorded upload holds the same bytes as a local
  export), with the card's license, language and datasets from the flags."""
  import base64
  from huggingface_hub import ModelCard
  wd, _ = trained_export
  args = ["--workdir", wd, "--license", "apache-2.0", "--language", "en",
          "--datasets", "org/sudoku-boards"]
  assert export_command.main(args + ["--push-to-hub", "org/loopmdm-sudoku", "--private"]) == 0
  assert "pushed to org/loopmdm-sudoku" in capsys.readouterr().out
  posts = [x for x in loopback_hub if x[0] == "POST"]  # GETs (the client's probes) get 404
  assert [p for _, p, _, _ in posts] == [
      "/api/repos/create", "/api/validate-yaml",
      "/api/models/org/loopmdm-sudoku/preupload/main", "/api/models/org/loopmdm-sudoku/commit/main"]
  assert all(auth == "Bearer hf_test_token" for _, _, auth, _ in posts)
  create = json.loads(posts[0][3])
  assert (create["name"], create["organization"], create["visibility"]) == (
      "loopmdm-sudoku", "org", "private")
  validated = json.loads(posts[1][3])
  assert validated["repoType"] == "model" and "model-index:" in validated["content"]
  lines = [json.loads(x) for x in posts[3][3].splitlines()]
  assert lines[0]["key"] == "header"
  sent = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
          for x in lines if x["key"] == "file"}
  local = str(tmp_path / "loopmdm-sudoku")
  export_command.main(args + ["--out", local])
  want = {os.path.relpath(os.path.join(d, f), local): open(os.path.join(d, f), "rb").read()
          for d, _, fs in os.walk(local) for f in fs}
  assert sorted(sent) == sorted(want) and "model.safetensors" in sent
  # safetensors writes its header metadata in hash-map order, so the bytes (and the sha256 in
  # config.json) may differ between two exports: the tensors and the rest must not.
  from safetensors.numpy import load as load_tensors
  got_t, want_t = load_tensors(sent["model.safetensors"]), load_tensors(want["model.safetensors"])
  assert sorted(got_t) == sorted(want_t)
  assert all(np.array_equal(got_t[k], want_t[k]) for k in want_t)
  unhashed = lambda b: {**json.loads(b), "weights": {
      k: v for k, v in json.loads(b)["weights"].items() if k != "sha256"}}
  assert unhashed(sent["config.json"]) == unhashed(want["config.json"])
  assert [k for k in want if k not in ("model.safetensors", "config.json")
          and sent[k] != want[k]] == []
  card = ModelCard(sent["README.md"].decode())
  assert (card.data.license, card.data.language, card.data.datasets) == (
      "apache-2.0", ["en"], ["org/sudoku-boards"])


def test_push_to_hub_refusals_come_before_any_work(tmp_path, monkeypatch):
  from huggingface_hub import constants
  from loopjax.errors import UserError
  wd = str(tmp_path / "no_run")  # never read: the refusals come first
  with pytest.raises(UserError, match="'bad/repo/id': not a repository id"):
    export_command.main(["--workdir", wd, "--push-to-hub", "bad/repo/id"])
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
    export_command.main(["--workdir", wd, "--push-to-hub", "org/name"])
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  monkeypatch.delenv("HF_TOKEN", raising=False)
  monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
  monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_tokens"))
  with pytest.raises(UserError, match="no Hugging Face token"):
    export_command.main(["--workdir", wd, "--push-to-hub", "org/name"])
