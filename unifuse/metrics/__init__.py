"""Sample-quality metrics: Frechet distance, precision/recall and class histograms on the features of shipped
classifiers (digits, mnist); for a user's image folder, FD, KID, precision/recall and pixel SWD on features made
from the folder itself (`evaluate_folder`); sliced Wasserstein, MMD and exact cross-entropy for the 2-D toy sets."""
from .classifier import CLASSIFIER_SETS, FeatureNet, classifier_info, classify, load_classifier
from .folder import evaluate_folder
from .frechet import evaluate_images, frechet_distance, frechet_from_stats, knn_radius, mean_cov, precision_recall, real_floor
from .kernel import kid, mmd2_unbiased
from .toy import cross_entropy, evaluate_toy, mmd, sliced_wasserstein

__all__ = ["CLASSIFIER_SETS", "FeatureNet", "classifier_info", "classify", "load_classifier", "evaluate_images",
           "frechet_distance", "frechet_from_stats", "knn_radius", "mean_cov", "precision_recall", "real_floor",
           "evaluate_folder", "kid", "mmd2_unbiased", "cross_entropy", "evaluate_toy", "mmd", "sliced_wasserstein"]
