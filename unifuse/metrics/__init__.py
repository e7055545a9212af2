"""Sample-quality metrics: Frechet distance, precision/recall and class histograms on the features of shipped
classifiers (digits, mnist); sliced Wasserstein, MMD and exact cross-entropy for the 2-D toy sets."""
from .classifier import CLASSIFIER_SETS, FeatureNet, classifier_info, classify, load_classifier
from .frechet import evaluate_images, frechet_distance, frechet_from_stats, knn_radius, mean_cov, precision_recall, real_floor
from .toy import cross_entropy, evaluate_toy, mmd, sliced_wasserstein

__all__ = ["CLASSIFIER_SETS", "FeatureNet", "classifier_info", "classify", "load_classifier", "evaluate_images",
           "frechet_distance", "frechet_from_stats", "knn_radius", "mean_cov", "precision_recall", "real_floor",
           "cross_entropy", "evaluate_toy", "mmd", "sliced_wasserstein"]
