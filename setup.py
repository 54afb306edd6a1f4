"""variator_jax: plug-and-play compression plugins for T5 in JAX (Variator, EMNLP 2023)."""
import setuptools

_RUNTIME = [
    "jax>=0.4.30",
    "flax>=0.8.5",
    "optax>=0.2.2",
    "orbax-checkpoint>=0.5.20",
    "transformers>=4.40",
    "safetensors>=0.4.3",
    "ml_collections>=0.1.1",
    "absl-py>=1.4",
    "tensorboard>=2.14",
    "numpy>=1.24",
    "grain>=0.2.10",  # The training input pipeline (pipeline.py).
    "matplotlib>=3.7",
]
_EXTRAS = {
    # PyTorch: HF parity tests, .bin checkpoints, the attach_plugin export path.
    "torch": ["torch>=2.1"],
    # tfds datasets (GLUE, SQuAD): their builders need TensorFlow.
    "tfds": ["tensorflow-datasets>=4.9.3", "tensorflow>=2.15"],
    # variator-serve: the plugin bank behind Ray Serve (serve_app.py); BackpressureConfig
    # (503 with Retry-After) needs Ray 2.60.
    "serve": ["ray[serve]>=2.60"],
    # ONNX export of the encoder (`python -m variator_jax.convert onnx`): torch.export's
    # exporter needs onnxscript; the written graph is checked with ONNX Runtime.
    "onnx": ["torch>=2.6", "onnx>=1.17", "onnxscript>=0.2", "onnxruntime>=1.20"],
    # `hf:` sources: datasets saved by HF datasets, or data files it reads.
    "hf": ["datasets>=2.14"],
    "dev": ["pytest>=7.4", "pytest-xdist>=3.5", "ruff>=0.5"],
}
_EXTRAS["all"] = sorted({req for reqs in _EXTRAS.values() for req in reqs})

setuptools.setup(
    name="variator_jax",
    version="0.1.0",
    description=__doc__,
    packages=setuptools.find_packages(include=["variator_jax", "variator_jax.*"]),
    python_requires=">=3.10",
    install_requires=_RUNTIME,
    extras_require=_EXTRAS,
    # `pip install .` gives both entry points; configs ship in variator_jax/configs.
    entry_points={"console_scripts": ["variator-train = variator_jax.train:run",
                                      "variator-eval = variator_jax.evaluate:run",
                                      "variator-serve = variator_jax.serve_app:run"]},
)
