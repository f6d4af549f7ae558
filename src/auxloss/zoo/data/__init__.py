"""Built-in datasets whose items are ``dict[str, Tensor]``: a main ``"target"`` plus auxiliary labels.

Every dataset here is a :class:`DictDataset`. Each item is a dict with ``"input"`` (what the model sees),
``"target"`` (the main label, int64) and any number of auxiliary attribute keys, so PyTorch's default
collate turns a list of items into a dict batch that auxiliary heads can read their targets from.

Sources, one module each, none of which downloads anything at run time:

* ``shapes`` -- :func:`make_shapes`, a generated image set ("recognise the shape; as an auxiliary task predict
  its colour, size, position, texture or mask"), with knobs for data size, pixel noise and label noise.
* ``digits`` -- :func:`load_digits_dataset`, scikit-learn's bundled 8x8 handwritten digits, and
  :func:`load_digit_sequences`, the same digits read pixel by pixel.
* ``idx`` -- :func:`read_idx` and :func:`load_idx_dataset` for MNIST, Fashion-MNIST, KMNIST and EMNIST IDX
  files already on disk; :func:`load_fashion_mnist` adds Fashion-MNIST's garment groups.
* ``multi_fashion`` -- :func:`load_multi_fashion`, two Fashion-MNIST garments overlaid with an offset (left: the
  main task, right: the auxiliary one), the Multi-Fashion multi-task benchmark.
* ``folder`` -- :func:`load_image_folder`, a user's own ``root/<class_name>/*.png`` folder, decoded as read.
* ``cifar`` -- :func:`load_cifar10` and :func:`load_cifar100` from the python batch folders, read with a
  restricted unpickler that runs no code.
* ``hf`` -- :func:`load_hf_dataset`, a Hugging Face dataset saved to disk or as parquet files (the ``hf`` extra),
  read from its memory-mapped Arrow files.

``common`` holds :class:`DictDataset`, the columns decoded on demand (:class:`LazyColumn`) and the splits;
``registry`` holds :data:`DATASETS`, the one registry of sources, which ``auxloss run`` looks ``data.name`` up
in; :func:`available_datasets` says which can be loaded here.
"""

from auxloss.zoo.data.cifar import (
    CIFAR10_CLASSES,
    CIFAR10_VEHICLES,
    load_cifar10,
    load_cifar100,
    read_cifar_pickle,
)
from auxloss.zoo.data.common import SPLITS, DataRequest, DictDataset, LazyColumn, UInt8Images, split_dataset
from auxloss.zoo.data.digits import DIGIT_LOOPS, load_digit_sequences, load_digits_dataset, pixel_sequences
from auxloss.zoo.data.folder import IMAGE_EXTENSIONS, ImageFiles, image_to_tensor, load_image_folder
from auxloss.zoo.data.hf import HF_SPLIT_NAMES, HFArrays, HFImages, load_hf_dataset
from auxloss.zoo.data.idx import (
    EMNIST_SPLITS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEFAULT_ROOT,
    FASHION_MNIST_GROUP_OF_LABEL,
    FASHION_MNIST_GROUPS,
    fashion_mnist_available,
    load_fashion_mnist,
    load_idx_dataset,
    read_idx,
)
from auxloss.zoo.data.multi_fashion import load_multi_fashion, overlay_pairs
from auxloss.zoo.data.registry import (
    DATASETS,
    DatasetSpec,
    available_datasets,
    build_splits,
    get_dataset,
    load_dataset,
)
from auxloss.zoo.data.shapes import (
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    make_shapes,
    make_shapes_splits,
)

__all__ = [
    "BACKGROUNDS",
    "CIFAR10_CLASSES",
    "CIFAR10_VEHICLES",
    "COLOURS",
    "COLOUR_RGB",
    "DATASETS",
    "DIGIT_LOOPS",
    "EMNIST_SPLITS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_ROOT",
    "FASHION_MNIST_GROUPS",
    "FASHION_MNIST_GROUP_OF_LABEL",
    "HF_SPLIT_NAMES",
    "IMAGE_EXTENSIONS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TEXTURES",
    "DataRequest",
    "DatasetSpec",
    "DictDataset",
    "HFArrays",
    "HFImages",
    "ImageFiles",
    "LazyColumn",
    "UInt8Images",
    "available_datasets",
    "build_splits",
    "fashion_mnist_available",
    "get_dataset",
    "image_to_tensor",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digit_sequences",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_hf_dataset",
    "load_idx_dataset",
    "load_image_folder",
    "load_multi_fashion",
    "make_shapes",
    "make_shapes_splits",
    "overlay_pairs",
    "pixel_sequences",
    "read_cifar_pickle",
    "read_idx",
    "split_dataset",
]
