"""The board cost model: board profiles (data), segment features, the estimator, board calibration.

Every figure it produces is a PREDICTION from a board profile (published figures and judgement, or a user's
calibration file), never a measurement. See rwkv2rknn/cost/profiles/*.toml for each constant and its source.
"""

from rwkv2rknn.cost.estimate import CATEGORIES, LABEL, Estimate, estimate, price_segment
from rwkv2rknn.cost.features import CPU_FALLBACK, MULTICORE_OPS, segment_features
from rwkv2rknn.cost.profile import CONSTANTS, BoardProfile, load_profile, shipped_profiles

__all__ = ["CATEGORIES", "CONSTANTS", "CPU_FALLBACK", "LABEL", "MULTICORE_OPS", "BoardProfile", "Estimate",
           "estimate", "load_profile", "price_segment", "segment_features", "shipped_profiles"]
