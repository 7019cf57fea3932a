"""FID and Inception Score with a Flax port of pytorch-fid's InceptionV3.

`inception`: the network, `params_from_torch`, `pool_features`, `features_and_logits`;
`weights`: the released weights, read without PyTorch; `fid`: `frechet_distance`,
streaming statistics, Inception Score.

    variables = load_inception_variables(config.eval.inception_path, config.eval.cache_dir)
    feats = pool_features(variables, images_uint8)  # [N, 2048]
"""

from evaluation.fid import (
    FeatureStats,
    RunningStats,
    feature_stats,
    frechet_distance,
    inception_score,
    load_stats,
    save_stats,
)
from evaluation.inception import (
    InceptionV3,
    features_and_logits,
    init_params,
    params_from_torch,
    pool_features,
)
from evaluation.weights import WeightsError, load_inception_variables, read_weights

__all__ = [
    "FeatureStats",
    "InceptionV3",
    "RunningStats",
    "WeightsError",
    "feature_stats",
    "features_and_logits",
    "frechet_distance",
    "inception_score",
    "init_params",
    "load_inception_variables",
    "load_stats",
    "params_from_torch",
    "pool_features",
    "read_weights",
    "save_stats",
]
