"""nfnets: Normalizer-Free Networks in JAX/Haiku."""
from setuptools import find_packages, setup

setup(
    name='nfnets',
    version='0.1.0',
    description='Normalizer-Free Networks (NFNets, NF-ResNets, NF-RegNets) '
                'with Adaptive Gradient Clipping, in JAX/Haiku.',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['nfnets', 'nfnets.*']),
    python_requires='>=3.10',
    # Lower bounds are the versions this project was tested with.
    install_requires=[
        'jax>=0.10.2',
        'jaxlib>=0.10.2',
        'dm-haiku>=0.0.17',
        'optax>=0.2.8',
        'chex>=0.1.92',
        'ml-collections>=1.1.0',
        'numpy>=2.0',
        # 0.11.36: the newest that jax2onnx (the 'onnx' extra) accepts; the
        # whole suite passed with it, the checkpoint tests also with 0.12.8.
        'orbax-checkpoint>=0.11.36',
        'tensorflow-cpu>=2.21.0',
        'tensorflow-datasets>=4.9.10',
        # tensorflow-datasets needs these but does not declare them.
        'importlib_resources>=7.1.0',
        'pillow>=13.0.0',
        # The embedded default dataset (handwritten digits) ships with sklearn.
        'scikit-learn>=1.9.1',
        'tensorboardX>=2.6.5',
        'matplotlib>=3.11.2',
        'absl-py>=2.5.1',
        # timm / Hugging Face model.safetensors (NumPy API; no torch).
        'safetensors>=0.8.0',
    ],
    extras_require={
        'test': ['pytest>=9.0.3', 'pytest-xdist>=3.8.0', 'hypothesis>=6.155.2',
                 'dill>=0.4.1'],
        # scripts/export.py --format onnx (jax2onnx), checked with onnxruntime;
        # jax2onnx 0.17 pins orbax-checkpoint < 0.11.37.
        'onnx': ['jax2onnx>=0.17.1', 'onnxruntime>=1.32.0'],
    },
)
