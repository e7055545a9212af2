"""Data sets: the bundled digits and MNIST images, folders of images, and 2-D toy sets with exact densities."""
from .images import DATASETS, SPLITS, Dataset, from_uint8, load_dataset, split_indices, to_uint8
from .toy import TOY_CLASSES, TOY_ENTROPY, TOYS, Checkerboard, MixtureDensity, sample_toy, toy_density, toy_entropy

__all__ = ["DATASETS", "SPLITS", "Dataset", "load_dataset", "split_indices", "to_uint8", "from_uint8",
           "TOYS", "TOY_CLASSES", "TOY_ENTROPY", "Checkerboard", "MixtureDensity", "sample_toy", "toy_density",
           "toy_entropy"]
