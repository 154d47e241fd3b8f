"""Inference: a trained model bound to the samplers and the loop policies (denoiser.py), and the
driver that loads a run or an export, builds prompts, samples and decodes (generate.py), used by
`loopjax sample`, lm-eval, gen-PPL, the tasks and the Python API."""
